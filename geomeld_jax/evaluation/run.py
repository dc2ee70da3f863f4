r"""Evaluates checkpoints on GEO-Bench tasks with several seeds; writes a markdown + JSON table.

  python -m geomeld_jax.evaluation.run --config=configs/eval.py:smoke \
      --checkpoints=random,imagenet:/w/convnextv2_atto.safetensors,runs/atto_full/export/300 \
      --tasks=m-bigearthnet,m-so2sat --geobench_dir=$GEO_BENCH_DIR --out=results/geobench

A checkpoint is ``random`` (a fresh encoder built from ``config.baseline``, one init per seed),
``imagenet:<weights file>`` (timm/official ConvNeXt-V2 weights through
``geomeld_jax.models.convert``; with the 'patch' stem the stem stays random) or a GeoMeld-FM
export directory (``geomeld_jax.export``). Modes (``config.modes``): ``probe`` (linear probe
with an lr sweep, plus the same probe scored with ``config.drop_bands`` invalid at test time)
and ``finetune``. Cells are mean ± std over ``config.seeds``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import nnx
from ml_collections import config_flags

from geomeld_jax import modalities as mod
from geomeld_jax.evaluation import finetune
from geomeld_jax.evaluation import geobench
from geomeld_jax.evaluation import metrics
from geomeld_jax.evaluation import probe
from geomeld_jax.evaluation import retrieval
from geomeld_jax.models import convnextv2


def load_checkpoint(spec: str, baseline: Any, seed: int = 0) -> tuple[convnextv2.ConvNeXtV2, str]:
  """(encoder, id for caches/tables) of a checkpoint spec; errors name the offending file."""
  in_chans = mod.SENTINEL2.num_bands
  b = dict(baseline)
  if spec == "random":
    enc = convnextv2.ConvNeXtV2(b["variant"], in_chans, stem=b["stem"], patch_size=b["patch_size"],
                                rngs=nnx.Rngs(seed))
    return enc, f"random[{b['variant']},{b['stem']},{b['patch_size']}]:seed{seed}"
  if spec.startswith("imagenet:"):
    from geomeld_jax.models import convert  # pylint: disable=g-import-not-at-top

    path = spec[len("imagenet:"):]
    enc = convnextv2.ConvNeXtV2(b["variant"], in_chans, stem=b["stem"], patch_size=b["patch_size"],
                                rngs=nnx.Rngs(seed))
    convert.convert_to_flax(convert.load_torch_state_dict(path), enc)
    st = pathlib.Path(path).stat()  # the baseline shapes the features, the file's state its weights
    return enc, (f"imagenet[{b['variant']},{b['stem']},{b['patch_size']}]:"
                 f"{pathlib.Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}:seed{seed}")
  from geomeld_jax import export  # pylint: disable=g-import-not-at-top

  export_dir = pathlib.Path(spec)
  cfg_path = export_dir / "model_config.json"
  if not cfg_path.is_file():
    raise FileNotFoundError(f"{cfg_path} is missing: {spec!r} is not 'random', "
                            "'imagenet:<file>' or a GeoMeld-FM export directory")
  info = json.loads(cfg_path.read_text())
  if list(info.get("input_bands", [])) != list(mod.SENTINEL2.bands):
    raise ValueError(f"{cfg_path}: the encoder expects input bands {info.get('input_bands')}, "
                     f"but GEO-Bench tasks are mapped onto {list(mod.SENTINEL2.bands)} "
                     f"({mod.SENTINEL2.num_bands} channels)")
  enc, _ = export.load_encoder(export_dir)
  if enc.in_chans != in_chans:
    raise ValueError(f"{cfg_path}: encoder has {enc.in_chans} input channels, tasks give {in_chans}")
  st = cfg_path.stat()  # exported again (another run, another step): other features
  return enc, f"export:{export_dir.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _max(v: int) -> int | None:
  return None if v is None or v < 0 else int(v)


def evaluate(config, checkpoints: list[str], tasks: list[str], geobench_dir: str,
             out_dir: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
  """Runs the table; returns {checkpoint: {task: {column: {metric, values, mean, std}}}}."""
  modes = (tuple(m.strip() for m in config.modes.split(",")) if isinstance(config.modes, str)
           else tuple(config.modes))
  unknown = sorted(set(modes) - {"probe", "finetune"})
  if not modes or unknown:
    raise ValueError(f"config.modes must name probe and/or finetune, got {config.modes!r} "
                     "(pass a tuple: --config.modes=\"('probe','finetune')\")")
  pcfg = probe.ProbeConfig.from_config(config.probe)
  fcfg = finetune.FinetuneConfig.from_config(config.finetune)
  max_samples = _max(config.max_samples)
  cache = probe.FeatureCache(cache_dir or (pathlib.Path(out_dir) / "features" if out_dir else None))
  table: dict[str, Any] = {}
  for ckpt in checkpoints:
    table[ckpt] = {}
    for task_name in tasks:
      info = geobench.task_info(task_name)
      divisor = config.so2sat_stats_divisor if task_name == "m-so2sat" else None
      task = geobench.GeoBenchTask(geobench_dir, task_name, partition=config.partition,
                                   fill_missing=config.fill_missing, stats_divisor=divisor)
      cols: dict[str, dict[str, Any]] = {}
      if info.is_segmentation and "finetune" not in modes:
        logging.warning("%s is a segmentation task: a linear probe does not apply and "
                        "config.modes %s has no 'finetune', so it gets no result", task_name,
                        modes)
      for seed in config.seeds:
        encoder, ckpt_id = load_checkpoint(ckpt, config.baseline, seed)
        if "probe" in modes and not info.is_segmentation:
          feats = {s: probe.task_features(encoder, task, s, cache=cache, checkpoint_id=ckpt_id,
                                          batch_size=pcfg.feature_batch_size,
                                          max_samples=max_samples)
                   for s in geobench.SPLITS}
          res = probe.linear_probe(feats["train"], feats["valid"], feats["test"], kind=info.kind,
                                   num_classes=info.num_classes, cfg=pcfg, seed=seed)
          cols.setdefault("LP", {"metric": res.metric, "values": [], "best_lr": [],
                                 "best_lr_at_grid_edge": []})
          cols["LP"]["values"].append(res.test)
          cols["LP"]["best_lr"].append(res.best_lr)
          cols["LP"]["best_lr_at_grid_edge"].append(res.best_lr_at_grid_edge)
          if res.best_lr_at_grid_edge:
            logging.warning("%s %s seed %d: the best probe lr %g is at the edge of "
                            "config.probe.lrs %s; the optimum may lie beyond it: widen the grid",
                            ckpt, task_name, seed, res.best_lr, sorted(res.val_by_lr))
          if config.drop_bands:
            name = "LP drop " + "+".join(config.drop_bands)
            score = retrieval.probe_with_dropped_bands(
                encoder, task, res, drop_bands=tuple(config.drop_bands), cache=cache,
                checkpoint_id=ckpt_id, batch_size=pcfg.feature_batch_size, max_samples=max_samples)
            cols.setdefault(name, {"metric": res.metric, "values": []})["values"].append(score)
        if "finetune" in modes:
          tr = task.load_split("train", max_samples=max_samples)
          te = task.load_split("test", max_samples=max_samples)
          name, score = finetune.finetune_task(encoder, tr, te, kind=info.kind,
                                               num_classes=info.num_classes, cfg=fcfg, seed=seed)
          cols.setdefault("FT", {"metric": name, "values": []})["values"].append(score)
        logging.info("%s %s seed %d: %s", ckpt, task_name, seed,
                     {k: v["values"][-1] for k, v in cols.items()})
      for col in cols.values():
        col["mean"], col["std"] = metrics.mean_std(col["values"])
      table[ckpt][task_name] = cols
  result = {"config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
            "geobench_dir": str(geobench_dir), "results": table}
  if out_dir:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=_json_default))
    (out / "results.md").write_text(markdown_table(table, len(config.seeds)))
  return result


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, (tuple, set)):
    return list(o)
  return str(o)


def markdown_table(table: dict[str, Any], num_seeds: int) -> str:
  """Rows = checkpoints; columns = task / mode (metric); cells = mean ± std (%)."""
  columns: list[tuple[str, str, str]] = []
  for per_task in table.values():
    for task, cols in per_task.items():
      for col, v in cols.items():
        key = (task, col, v["metric"])
        if key not in columns:
          columns.append(key)
  head = "| checkpoint | " + " | ".join(f"{t} {c} ({m})" for t, c, m in columns) + " |"
  lines = [head, "|" + " --- |" * (len(columns) + 1)]
  edges = False
  for ckpt, per_task in table.items():
    cells = []
    for task, col, _ in columns:
      v = per_task.get(task, {}).get(col)
      edge = "†" if v and any(v.get("best_lr_at_grid_edge", ())) else ""
      edges = edges or bool(edge)
      cells.append(f"{v['mean']:.1f} ± {v['std']:.1f}{edge}" if v else "–")
    lines.append(f"| {ckpt} | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append(f"mean ± std over {num_seeds} seed(s); values in %.")
  if edges:
    lines.append("† the best probe lr of some seed is at the edge of config.probe.lrs: the "
                 "optimum may lie beyond the grid.")
  return "\n".join(lines) + "\n"


def _define_flags() -> None:
  """Defines the CLI flags; only when run as a program (these modules share a process in
  tests, and absl allows each flag name once)."""
  global _CONFIG, _CHECKPOINTS, _TASKS, _GEOBENCH_DIR, _OUT
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/eval.py:<full|smoke>")
  _CHECKPOINTS = flags.DEFINE_list("checkpoints", None, "random | imagenet:<file> | export dir")
  _TASKS = flags.DEFINE_list("tasks", ["m-bigearthnet", "m-so2sat"], "GEO-Bench task names.")
  _GEOBENCH_DIR = flags.DEFINE_string("geobench_dir", None, "GEO-Bench root (or a task folder).")
  _OUT = flags.DEFINE_string("out", None, "Output folder for results.md / results.json / features.")


def main(argv):
  del argv
  result = evaluate(_CONFIG.value, _CHECKPOINTS.value, _TASKS.value, _GEOBENCH_DIR.value, _OUT.value)
  print(markdown_table(result["results"], len(_CONFIG.value.seeds)))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "checkpoints", "geobench_dir", "out"])
  app.run(main)
