r"""Visual report of a training run: PNGs written into ``<workdir>/report/``.

  python -m geomeld_jax.evaluation.report --workdir=/tmp/geomeld_smoke [--split=val]

* ``reconstruction_<modality>.png``: masked input, reconstruction and truth per modality
  (Sentinel-2 true colour B4/B3/B2 and false colour B8/B4/B3, Sentinel-1, DEM, canopy
  height, land-cover maps with a class legend) for a few validation tiles;
* ``jepa_similarity.png`` (runs with JEPA): per-cell cosine similarity between the
  predictor's output and the EMA teacher's features, target blocks outlined;
* ``retrieval_examples.png`` (runs with ITC): a caption as query and its top tiles;
* ``training_curves.png``: every scalar in ``<workdir>/tensorboard`` (tensorboardX event
  files, parsed with the protobufs tensorboardX ships).

Needs matplotlib (Agg backend).
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from geomeld_jax import export
from geomeld_jax import modalities as mod

REPORT_SUBDIR = "report"


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


# ----------------------------------------------------------------------------------------
# TensorBoard events.
# ----------------------------------------------------------------------------------------


def read_scalars(tb_dir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from every events file in a folder (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  out: dict[str, list[tuple[int, float]]] = {}
  files = sorted(pathlib.Path(tb_dir).glob("**/events.out.tfevents.*"))
  for path in files:
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      start = pos + 12  # u64 length + u32 masked crc of the length
      if start + length + 4 > len(data):
        break  # a record still being written
      event = event_pb2.Event.FromString(data[start:start + length])
      pos = start + length + 4
      for v in event.summary.value:
        if v.HasField("simple_value"):
          value = v.simple_value
        elif v.HasField("tensor") and v.tensor.float_val:
          value = v.tensor.float_val[0]
        else:
          continue
        out.setdefault(v.tag, []).append((int(event.step), float(value)))
  for tag in out:
    out[tag].sort()
  return out


def plot_curves(scalars: Mapping[str, list[tuple[int, float]]], path: pathlib.Path,
                max_panels: int = 24) -> pathlib.Path:
  if not scalars:
    raise ValueError("no scalars to plot (no TensorBoard events found)")
  plt = _plt()
  tags = sorted(scalars)[:max_panels]
  cols = 4
  rows = -(-len(tags) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
  for ax, tag in zip(axes.ravel(), tags):
    steps, values = zip(*scalars[tag])
    ax.plot(steps, values, marker="." if len(steps) < 30 else None)
    ax.set_title(tag, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in axes.ravel()[len(tags):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------
# Images.
# ----------------------------------------------------------------------------------------


def _stretch(img: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
  """Per-channel 2-98 % stretch to [0, 1] (over valid pixels)."""
  img = np.asarray(img, np.float32)
  out = np.zeros_like(img)
  for c in range(img.shape[-1]):
    ch = img[..., c]
    sel = ch[valid[..., c]] if valid is not None and valid[..., c].any() else ch.ravel()
    lo, hi = np.percentile(sel, [2, 98]) if sel.size else (0.0, 1.0)
    out[..., c] = np.clip((ch - lo) / max(hi - lo, 1e-6), 0, 1)
  return out


def _unpatchify(pred: np.ndarray, patch: int, channels: int) -> np.ndarray:
  b, gh, gw, _ = pred.shape
  x = pred.reshape(b, gh, gw, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * patch, gw * patch, channels)


def _denorm_patches(recon: np.ndarray, truth: np.ndarray, valid: np.ndarray, patch: int) -> np.ndarray:
  """Undo the per-patch normalisation of a norm_pix target with the truth's patch stats."""
  b, h, w, c = truth.shape
  shape = (b, h // patch, patch, w // patch, patch, c)
  t = np.where(valid, truth, np.nan).reshape(shape)
  mean = np.nanmean(t, axis=(2, 4, 5), keepdims=True)
  std = np.nanstd(t, axis=(2, 4, 5), keepdims=True)
  r = recon.reshape(shape) * np.nan_to_num(std, nan=1.0) + np.nan_to_num(mean)
  return r.reshape(b, h, w, c)


def _mask_pixels(mask: np.ndarray, patch: int) -> np.ndarray:
  return np.repeat(np.repeat(mask, patch, axis=1), patch, axis=2)


def _views(name: str) -> list[tuple[str, list[int]]]:
  """(title, channel indices) panels per regression modality."""
  m = mod.pixel_modality(name)
  if name == mod.SENTINEL2.name:
    idx = lambda *bs: [m.band_index(b) for b in bs]  # noqa: E731
    return [("true colour B4/B3/B2", idx("B4", "B3", "B2")),
            ("false colour B8/B4/B3", idx("B8", "B4", "B3"))]
  return [(m.bands[0], [0])]


def plot_reconstructions(batch: Mapping[str, np.ndarray], preds: Mapping[str, np.ndarray],
                         mask: np.ndarray, patch: int, out_dir: pathlib.Path, *,
                         norm_pix_s2: bool = True, num_tiles: int = 3) -> list[pathlib.Path]:
  """One PNG per pixel modality: rows = tiles x views, columns = masked input / recon / truth."""
  plt = _plt()
  from matplotlib import colors as mcolors  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top

  paths = []
  n = min(num_tiles, mask.shape[0])
  pix_mask = _mask_pixels(np.asarray(mask), patch)[:n]
  for name, pred in preds.items():
    if name not in mod.PIXEL_MODALITIES or name not in batch:
      continue
    m = mod.pixel_modality(name)
    if m.is_classes:
      k = m.num_classes
      logits = _unpatchify(np.asarray(pred)[:n], patch, k)
      recon = np.argmax(logits, -1)
      truth = np.asarray(batch[name])[:n]
      cmap = plt.get_cmap("tab20", k)
      norm = mcolors.BoundaryNorm(np.arange(-1.5, k), k + 1)
      colors = ["#000000"] + [cmap(i) for i in range(k)]
      cm = mcolors.ListedColormap(colors)
      fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n + 1), squeeze=False)
      for i in range(n):
        for j, (title, img) in enumerate((("masked truth", np.where(pix_mask[i], -1, truth[i])),
                                          ("prediction", recon[i]), ("truth", truth[i]))):
          axes[i, j].imshow(img, cmap=cm, norm=norm, interpolation="nearest")
          axes[i, j].set_title(title, fontsize=9)
          axes[i, j].axis("off")
      handles = [Patch(color=colors[0], label="no data / masked")] + [
          Patch(color=colors[c + 1], label=cname) for c, cname in enumerate(m.class_names)]
      fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7)
      fig.suptitle(name)
      fig.tight_layout(rect=(0, 0.12, 1, 0.96))
    else:
      c = m.num_bands
      truth = np.asarray(batch[name])[:n]
      valid = np.asarray(batch[f"{name}_valid"])[:n]
      recon = _unpatchify(np.asarray(pred)[:n], patch, c)
      if name == mod.SENTINEL2.name and norm_pix_s2:
        recon = _denorm_patches(recon, truth, valid, patch)
      views = _views(name)
      fig, axes = plt.subplots(n * len(views), 3, figsize=(9, 3 * n * len(views)), squeeze=False)
      for i in range(n):
        for v, (title, idx) in enumerate(views):
          row = i * len(views) + v
          vis = valid[i][..., idx]
          t = _stretch(truth[i][..., idx], vis)
          r = _stretch(recon[i][..., idx], vis)
          masked = np.where(pix_mask[i][..., None], 0.5, t)
          for j, (lbl, img) in enumerate((("masked input", masked), ("reconstruction", r),
                                          ("truth", t))):
            img = img[..., 0] if img.shape[-1] == 1 else img
            axes[row, j].imshow(img, cmap="viridis" if img.ndim == 2 else None)
            axes[row, j].set_title(f"{lbl}: {title}", fontsize=8)
            axes[row, j].axis("off")
      fig.suptitle(name)
      fig.tight_layout()
    path = out_dir / f"reconstruction_{name}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    paths.append(path)
  return paths


def plot_jepa_similarity(pred: np.ndarray, target: np.ndarray, target_mask: np.ndarray,
                         path: pathlib.Path, num_tiles: int = 3) -> pathlib.Path:
  """Cosine similarity per grid cell between predictor output and teacher features."""
  plt = _plt()
  p = np.asarray(pred, np.float32)
  t = np.asarray(target, np.float32)
  t = (t - t.mean(-1, keepdims=True)) / (t.std(-1, keepdims=True) + 1e-6)  # as the loss: LN
  sim = np.sum(p * t, -1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1) + 1e-6)
  n = min(num_tiles, sim.shape[0])
  tm = np.asarray(target_mask)
  tm = tm.any(axis=1) if tm.ndim == 4 else tm  # (B, targets, h, w) -> union
  fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
  for i in range(n):
    im = axes[0, i].imshow(sim[i], vmin=-1, vmax=1, cmap="RdBu_r")
    axes[0, i].contour(tm[i].astype(float), levels=[0.5], colors="k", linewidths=1)
    axes[0, i].set_title(f"tile {i}: mean cos in targets "
                         f"{float(sim[i][tm[i]].mean()) if tm[i].any() else float('nan'):.2f}",
                         fontsize=8)
    axes[0, i].axis("off")
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
  fig.suptitle("JEPA: cos(prediction, EMA target) per cell (targets outlined)", fontsize=9)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def plot_retrieval(examples: Sequence[Mapping[str, Any]], path: pathlib.Path) -> pathlib.Path:
  plt = _plt()
  import textwrap  # pylint: disable=g-import-not-at-top

  k = max(len(e["top"]) for e in examples)
  fig, axes = plt.subplots(len(examples), k, figsize=(3.4 * k, 3.8 * len(examples)), squeeze=False)
  idx = [mod.SENTINEL2.band_index(b) for b in ("B4", "B3", "B2")]
  for r, e in enumerate(examples):
    for j in range(k):
      ax = axes[r, j]
      ax.axis("off")
      if j >= len(e["top"]):
        continue
      ax.imshow(_stretch(e["x"][j][..., idx], e["valid"][j][..., idx]))
      hit = " (the query's tile)" if e["top"][j] == e["true_image"] else ""
      ax.set_title(f"#{j + 1} score {e['scores'][j]:.2f}{hit}\n" +
                   "\n".join(textwrap.wrap(e["captions"][j], 40)[:3]), fontsize=7)
    axes[r, 0].text(0, -0.35, "query: " + "\n".join(textwrap.wrap(e["query"], 90)[:2]),
                    transform=axes[r, 0].transAxes, fontsize=8, va="top")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------
# From a workdir.
# ----------------------------------------------------------------------------------------


def restore_run(workdir: pathlib.Path):
  """(GeoMeldFM with the newest checkpoint's params, EMA encoder params or None, step)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from geomeld_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from geomeld_jax.models import geomeld  # pylint: disable=g-import-not-at-top

  mcfg = export._model_config_from_workdir(workdir)  # pylint: disable=protected-access
  manager = ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir),
                                  item_names=(checkpointing.STATE_ITEM,))
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint in {checkpointing.checkpoint_dir(workdir)}")
  step = max(steps)
  model_def, params = geomeld.init(mcfg, jax.random.key(0))
  as_numpy = lambda tree: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)  # noqa: E731
  target = {"params": as_numpy(params)}
  if mcfg.jepa:
    target["ema_params"] = as_numpy(geomeld.encoder_params(params))
  state = manager.restore(step, args=ocp.args.Composite(**{
      checkpointing.STATE_ITEM: ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)}))[checkpointing.STATE_ITEM]
  return model_def, state["params"], state.get("ema_params"), step


def write_report(workdir: str | pathlib.Path, *, split: str = "val", num_tiles: int = 3,
                 seed: int = 0) -> list[pathlib.Path]:
  """Writes every PNG the run supports into <workdir>/report; returns their paths."""
  from geomeld_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from geomeld_jax.evaluation import retrieval  # pylint: disable=g-import-not-at-top
  from geomeld_jax.models import convnextv2  # pylint: disable=g-import-not-at-top
  from geomeld_jax.models import geomeld  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  out = workdir / REPORT_SUBDIR
  out.mkdir(parents=True, exist_ok=True)
  paths: list[pathlib.Path] = []
  tb = workdir / "tensorboard"
  if tb.is_dir():
    paths.append(plot_curves(read_scalars(tb), out / "training_curves.png"))
  model_def, params, ema, step = restore_run(workdir)
  cfg = model_def.config
  run_cfg = json.loads((workdir / "config.json").read_text())
  files = input_pipeline.locate_dataset(run_cfg["input"]["data_dir"])
  crop = int(run_cfg["input"]["crop_size"])
  text_len = int(run_cfg["input"]["text_len"])
  ds = input_pipeline.make_dataset(files, split, global_batch_size=num_tiles, crop_size=crop,
                                   text_len=text_len, seed=seed, train=False, max_eval_batches=1)
  from geomeld_jax import records  # pylint: disable=g-import-not-at-top

  # The pipeline ships stored arrays; model_inputs normalises them (numpy, on the host).
  batch = records.model_inputs(next(iter(ds)), input_pipeline.normalizer(files))
  model = geomeld.merge(model_def, params)
  x = geomeld.input_image(batch, jnp.float32)
  b, h, w, _ = x.shape
  gh, gw = model.encoder.grid_shape(h, w)
  k_mask, k_jepa = jax.random.split(jax.random.key(seed))
  mask = convnextv2.random_patch_mask(k_mask, b, gh, gw, cfg.mask_ratio)
  feats, _ = model.encoder(x, mask)
  preds = jax.device_get(model.decoder(feats, mask))
  paths += plot_reconstructions(batch, preds, np.asarray(mask), model.encoder.stride, out,
                                norm_pix_s2=cfg.norm_pix_loss, num_tiles=num_tiles)
  if cfg.jepa and ema is not None:
    masks, _ = geomeld.jepa_masks(cfg, k_jepa, b, gh, gw)
    ctx, _ = model.encoder(x, ~masks.context)
    pred = model.jepa_predictor(ctx, masks.context)
    g, _, rest = nnx.split(model.encoder, nnx.Param, ...)
    teacher_feats, _ = nnx.merge(g, ema, rest)(x, None)
    paths.append(plot_jepa_similarity(np.asarray(pred), np.asarray(teacher_feats),
                                      np.asarray(masks.target), out / "jepa_similarity.png",
                                      num_tiles))
  if cfg.itc and files.tokenizer.is_file():
    examples = retrieval.retrieval_examples(model, files, split, crop_size=crop,
                                            text_len=text_len, k=3, num_queries=2)
    paths.append(plot_retrieval(examples, out / "retrieval_examples.png"))
  (out / "report.json").write_text(json.dumps({"step": step, "files": [p.name for p in paths]},
                                              indent=2))
  return paths




def main(argv):
  del argv
  f = flags.FLAGS
  for p in write_report(f.workdir, split=f.split, num_tiles=f.num_tiles):
    print(p)


if __name__ == "__main__":
  # Flags exist only when run as a program (the evaluation modules share one process in
  # tests); --workdir is the one geomeld_jax.export defines (imported above).
  flags.DEFINE_string("split", "val", "Dataset split the tiles come from.")
  flags.DEFINE_integer("num_tiles", 3, "Tiles per figure.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
