r"""Export the pretrained encoder for evaluation: an encoder-only Orbax checkpoint + config JSON.

  python -m geomeld_jax.export --workdir=DIR [--step=N]

writes `DIR/export/<step>/` with `encoder/` (Orbax, the online encoder params),
`ema_encoder/` (the JEPA teacher, when the run had one), `itc/` (text encoder, vision
projection and temperature, when the run had ITC: what retrieval needs) and
`model_config.json` (every GeoMeldFMConfig field plus the band order the encoder expects).
`load_encoder` reads an encoder back; `load_itc_model` the whole GeoMeldFM with those towers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app
from absl import flags
from absl import logging
from etils import epath
from flax import nnx

from geomeld_jax import checkpointing
from geomeld_jax.models import convnextv2
from geomeld_jax.models import geomeld

EXPORT_SUBDIR = "export"
ITC_PARAMS = ("text_encoder", "vision_norm", "vision_proj", "logit_scale", "logit_bias")


def _model_config_from_workdir(workdir: epath.Path) -> geomeld.GeoMeldFMConfig:
  path = workdir / checkpointing.CONFIG_FILENAME
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: is {workdir} a geomeld_jax training workdir?")
  return geomeld.GeoMeldFMConfig.from_dict(json.loads(path.read_text())["model"])


def _input_bands_of_run(workdir: epath.Path) -> list[str]:
  """The encoder's input bands as the run fed them (recorded in the dataset fingerprint), not
  as this code's registry lists them: evaluation checks them against its own order."""
  path = workdir / checkpointing.DATASET_FILENAME
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: the run's input bands are unknown")
  return list(json.loads(path.read_text())["input_bands"])


def is_exported(workdir: str | epath.PathLike, step: int) -> bool:
  """Whether `export_encoder` finished for `step`: model_config.json is written last."""
  return (epath.Path(workdir) / EXPORT_SUBDIR / str(step) / "model_config.json").exists()


def export_encoder(workdir: str | epath.PathLike, step: int | None = None) -> epath.Path:
  """Writes the encoder-only export of checkpoint `step` (default: the newest); returns its dir."""
  workdir = epath.Path(workdir)
  mcfg = _model_config_from_workdir(workdir)
  manager = ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir),
                                  item_names=(checkpointing.STATE_ITEM,))
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint in {checkpointing.checkpoint_dir(workdir)}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise ValueError(f"no checkpoint of step {step} in {workdir}; steps: {sorted(steps)}")
  # Restored on the host as numpy into the params' own structure: no devices, no mesh.
  captured = {}

  def init_params():
    _, params = geomeld.init(mcfg, jax.random.key(0))
    captured["encoder"] = geomeld.encoder_params(params)
    return params

  abstract = jax.eval_shape(init_params)
  as_numpy = lambda tree: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)  # noqa: E731
  target = {"params": as_numpy(abstract)}
  if mcfg.jepa:
    target["ema_params"] = as_numpy(jax.eval_shape(lambda: captured["encoder"]))
  state = manager.restore(step, args=ocp.args.Composite(**{
      checkpointing.STATE_ITEM: ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)}))[
          checkpointing.STATE_ITEM]
  out = workdir / EXPORT_SUBDIR / str(step)
  if jax.process_index() == 0:  # incomplete until it is written again (`is_exported`)
    (out / "model_config.json").unlink(missing_ok=True)
  trees = {"encoder": nnx.to_pure_dict(geomeld.encoder_params(state["params"]))}
  if mcfg.jepa:
    trees["ema_encoder"] = nnx.to_pure_dict(state["ema_params"])
  if mcfg.itc:  # the towers retrieval needs: text encoder, vision projection, temperature
    pure = nnx.to_pure_dict(state["params"])  # scalars (logit_scale, SigLIP's logit_bias) too
    trees["itc"] = {k: pure[k] for k in ITC_PARAMS if k in pure}
  saver = ocp.StandardCheckpointer()
  for name, tree in trees.items():
    saver.save((out / name).resolve(), tree, force=True)
  saver.wait_until_finished()
  info = {"step": step, "model": dataclasses.asdict(mcfg),
          "input_bands": _input_bands_of_run(workdir), "encoder_stride": mcfg.stride,
          "encoders": sorted(trees)}
  if jax.process_index() == 0:  # the saves above are collective; this file is written once
    (out / "model_config.json").write_text(json.dumps(info, indent=2))
  logging.info("exported %s of step %d to %s", sorted(trees), step, out)
  return out


def load_encoder(export_dir: str | epath.PathLike, which: str = "encoder"
                 ) -> tuple[convnextv2.ConvNeXtV2, dict[str, Any]]:
  """An exported encoder as an nnx ConvNeXtV2 (float32 params) plus its export info."""
  export_dir = epath.Path(export_dir)
  info = json.loads((export_dir / "model_config.json").read_text())
  if which not in info["encoders"]:
    raise ValueError(f"{export_dir} has encoders {info['encoders']}, not {which!r}")
  m = info["model"]
  encoder = convnextv2.ConvNeXtV2(m["variant"], len(info["input_bands"]), stem=m["stem"],
                                  patch_size=m["patch_size"], rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
  target = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  restored = ocp.StandardCheckpointer().restore((export_dir / which).resolve(), target)
  nnx.replace_by_pure_dict(params, restored)
  return nnx.merge(graphdef, params, rest), info


def load_itc_model(export_dir: str | epath.PathLike) -> tuple[geomeld.GeoMeldFM, dict[str, Any]]:
  """A GeoMeldFM whose encoder and ITC towers come from an export (for retrieval/embedding).

  Decoders and the JEPA predictor stay at their (unused) initial values. It computes in
  float32, as `load_encoder` does, whatever the run trained in: every evaluation of an export
  (GEO-Bench, retrieval, embeddings) sees the same numbers.
  """
  export_dir = epath.Path(export_dir)
  info = json.loads((export_dir / "model_config.json").read_text())
  if "itc" not in info["encoders"]:
    raise ValueError(f"{export_dir} was exported from a run without ITC: no text tower")
  mcfg = dataclasses.replace(geomeld.GeoMeldFMConfig.from_dict(info["model"]),
                             compute_dtype="float32")
  model = geomeld.build(mcfg, jax.random.key(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pure = nnx.to_pure_dict(params)
  checkpointer = ocp.StandardCheckpointer()
  pure["encoder"] = checkpointer.restore((export_dir / "encoder").resolve(),
                                         jax.tree.map(np.asarray, pure["encoder"]))
  itc_target = {k: jax.tree.map(np.asarray, pure[k]) for k in ITC_PARAMS if k in pure}
  pure.update(checkpointer.restore((export_dir / "itc").resolve(), itc_target))
  nnx.replace_by_pure_dict(params, pure)
  return nnx.merge(graphdef, params, rest), info


def main(argv):
  del argv
  print(export_encoder(flags.FLAGS.workdir, flags.FLAGS.step))


if __name__ == "__main__":
  # Defined here, not at import: train.py imports this module under main.py's own flags.
  flags.DEFINE_string("workdir", None, "Training workdir to export from.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
