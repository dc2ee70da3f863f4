"""The train loop end to end on the demo dataset (8 forced CPU devices, tiny smoke model)."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from geomeld_jax import checkpointing
from geomeld_jax import export
from geomeld_jax import train
from geomeld_jax import train_step as ts

TOTAL_STEPS = 8
STOP_AT = 4


def _config(data_dir, **overrides):
  config = pretrain.get_config("smoke")
  with config.unlocked():
    config.input.data_dir = str(data_dir)
    config.input.build_demo_if_missing = False
    config.input.eval_batches = 1
    config.total_steps = TOTAL_STEPS
    config.optim.warmup_steps = 2
    config.log_every = 1
    config.eval_every = STOP_AT
    config.checkpoint_every = STOP_AT
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


@pytest.fixture(scope="module")
def full_run(demo_dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full_run")
  history = train.train_and_evaluate(_config(demo_dataset), workdir)
  return workdir, history


def test_smoke_run_logs_every_step_and_loss_falls(full_run):
  workdir, history = full_run
  assert sorted(history) == list(range(1, TOTAL_STEPS + 1))
  losses = [history[s]["loss"] for s in sorted(history)]
  assert all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  for term in ("sentinel2", "sentinel1", "esa_worldcover", "location", "jepa", "itc"):
    assert f"loss/{term}" in history[1]
  assert (workdir / "config.json").is_file() and (workdir / "run_info.json").is_file()
  assert list((workdir / "tensorboard").iterdir())
  from geomeld_jax.evaluation import report

  scalars = report.read_scalars(workdir / "tensorboard")
  # Held-out ITC top-1 with the training view (visible cells) and with the whole image.
  assert {"eval/itc/i2t_top1", "eval/itc/i2t_top1_unmasked"} <= set(scalars)
  assert [s for s, _ in scalars["eval/itc/i2t_top1_unmasked"]] == [STOP_AT, TOTAL_STEPS]


def _sigterm_after(monkeypatch, num_steps: int) -> None:
  """The next run gets SIGTERM (a job scheduler's preemption) right after its num_steps-th step."""
  real_setup = ts.setup

  def setup_with_sigterm(*args, **kwargs):
    setup = real_setup(*args, **kwargs)
    calls = []

    def step(state, batch):
      out = setup.train_step(state, batch)
      calls.append(1)
      if len(calls) == num_steps:
        os.kill(os.getpid(), signal.SIGTERM)
      return out

    return ts.TrainSetup(**{**setup.__dict__, "train_step": step})

  monkeypatch.setattr(ts, "setup", setup_with_sigterm)


def test_resume_continues_bit_for_bit(full_run, demo_dataset, tmp_path, monkeypatch):
  workdir, reference = full_run
  config = _config(demo_dataset)
  # Three legs: stopped by stop_after, then by a SIGTERM off the checkpoint interval, then to the end.
  first = train.train_and_evaluate(config, tmp_path, stop_after=STOP_AT)
  assert max(first) == STOP_AT
  preempted_at = STOP_AT + 3
  with monkeypatch.context() as patch:
    _sigterm_after(patch, preempted_at - STOP_AT)
    second = train.train_and_evaluate(config, tmp_path)
  assert sorted(second) == list(range(STOP_AT + 1, preempted_at + 1))
  assert preempted_at % config.checkpoint_every  # so only the signal can have saved it
  assert checkpointing.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1
                                    ).latest_step() == preempted_at
  # The last leg stops at the last step, before its evaluation and export; a fourth call
  # trains nothing but runs both (and the eval at STOP_AT, cut off by the first stop, ran
  # first thing in the second leg).
  third = train.train_and_evaluate(config, tmp_path, stop_after=TOTAL_STEPS)
  assert sorted(third) == list(range(preempted_at + 1, TOTAL_STEPS + 1))
  assert not export.is_exported(tmp_path, TOTAL_STEPS)
  assert json.loads((tmp_path / train.LAST_EVAL_FILENAME).read_text())["step"] == STOP_AT
  assert train.train_and_evaluate(config, tmp_path) == {}
  assert export.is_exported(tmp_path, TOTAL_STEPS)
  last_eval = json.loads((tmp_path / train.LAST_EVAL_FILENAME).read_text())
  from geomeld_jax.evaluation import report

  ran = report.read_scalars(tmp_path / "tensorboard")["eval/loss"]
  assert [s for s, _ in ran] == [STOP_AT, TOTAL_STEPS] and last_eval["step"] == TOTAL_STEPS
  reference_eval = report.read_scalars(workdir / "tensorboard")["eval/loss"]
  assert [v for _, v in ran] == [v for _, v in reference_eval]  # the same held-out losses
  legs = {**first, **second, **third}
  for step in range(1, TOTAL_STEPS + 1):
    assert legs[step]["loss"] == reference[step]["loss"], step  # bit for bit, not approximately
    assert legs[step]["grad_norm"] == reference[step]["grad_norm"], step


def test_export_loads_and_retrieval_runs(full_run, tmp_path):
  workdir, _ = full_run
  out = workdir / export.EXPORT_SUBDIR / str(TOTAL_STEPS)
  info = json.loads((out / "model_config.json").read_text())
  assert info["encoders"] == ["ema_encoder", "encoder", "itc"]
  encoder, _ = export.load_encoder(out)
  x = jnp.zeros((1, 32, 32, 12))
  assert encoder(x)[0].shape == (1, 4, 4, 320)
  # The export records the input bands the run was fed (its dataset.json), not today's registry.
  assert info["input_bands"] == json.loads((workdir / "dataset.json").read_text())["input_bands"]
  renamed = tmp_path / "renamed_bands_run"
  shutil.copytree(workdir, renamed, ignore=shutil.ignore_patterns(export.EXPORT_SUBDIR))
  fingerprint = json.loads((renamed / "dataset.json").read_text())
  fingerprint["input_bands"] = fingerprint["input_bands"][::-1]
  (renamed / "dataset.json").write_text(json.dumps(fingerprint))
  renamed_info = json.loads((export.export_encoder(renamed) / "model_config.json").read_text())
  assert renamed_info["input_bands"] == fingerprint["input_bands"]
  # Both loaders give the same float32 features, also for a run that trained in bfloat16.
  bf16_export = tmp_path / "bf16_export"
  shutil.copytree(out, bf16_export)
  info["model"]["compute_dtype"] = "bfloat16"
  (bf16_export / "model_config.json").write_text(json.dumps(info))
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 12))
  itc_model, _ = export.load_itc_model(bf16_export)
  features = itc_model.encoder(x)[0]
  assert features.dtype == jnp.float32
  np.testing.assert_allclose(features, export.load_encoder(bf16_export)[0](x)[0], rtol=1e-5, atol=1e-5)
  from geomeld_jax.evaluation import retrieval

  # The retrieval command's path: the run's export, dataset, crop and caption length.
  result = retrieval.evaluate_run(workdir, split="val", drop_bands=[["B2", "B3", "B4"]])
  assert result["step"] == TOTAL_STEPS
  assert json.loads((out / "retrieval_val.json").read_text()) == result
  assert set(result) == {"workdir", "step", "split", "all_bands", "drop_B2+B3+B4"}
  recalls = result["all_bands"]
  assert recalls["num_images"] > 0 and recalls["num_captions"] > 0  # distinct strings
  assert 0 <= recalls["num_captions_shared"] <= recalls["num_captions"]
  for name, value in recalls.items():
    if name.startswith(("i2t", "t2i")):
      assert 0.0 <= value <= 100.0, (name, value)


@pytest.mark.parametrize("key, value", [
    ("model.decoder_width", 32),
    ("input.train_split", "val"),  # the saved position indexes the train split's records
])
def test_incompatible_checkpoint_is_refused_by_key(full_run, demo_dataset, key, value):
  workdir, _ = full_run
  config = _config(demo_dataset, **{key: value})
  with pytest.raises(ValueError, match=key):
    train.train_and_evaluate(config, workdir)


def test_missing_dataset_names_the_build_command(tmp_path):
  config = _config(tmp_path / "nothing_here")
  with pytest.raises(FileNotFoundError, match="python -m data_prep.build"):
    train.train_and_evaluate(config, tmp_path / "wd")


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(demo_dataset, tmp_path, monkeypatch):
  config = _config(demo_dataset, checkpoint_every=3)
  real_setup = ts.setup

  # From step 5 on the loss is NaN, as after a divergence (jitted: the step runs under the
  # transfer guard, which forbids the eager constant).
  poison = jax.jit(lambda step, loss: jnp.where(step >= 5, jnp.nan, loss))

  def poisoned_setup(*args, **kwargs):
    setup = real_setup(*args, **kwargs)

    def step(state, batch):
      state, metrics = setup.train_step(state, batch)
      metrics["loss"] = poison(state["step"], metrics["loss"])
      return state, metrics

    return ts.TrainSetup(**{**setup.__dict__, "train_step": step})

  monkeypatch.setattr(ts, "setup", poisoned_setup)
  with pytest.raises(FloatingPointError, match="step 5"):
    train.train_and_evaluate(config, tmp_path)
  diagnostics = json.loads((tmp_path / "nonfinite_diagnostics.json").read_text())
  assert diagnostics["step"] == 5 and "loss" in diagnostics["nonfinite"]
  checkpointer = checkpointing.Checkpointer(tmp_path, save_interval_steps=3, max_to_keep=2)
  assert checkpointer.all_steps() == [3]


def test_export_of_a_siglip_run_keeps_its_bias(tmp_path):
  """SigLIP's logit_bias is a scalar parameter, like the temperature (the export once failed
  on it). The checkpoint is written directly: no training needed."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from geomeld_jax import modalities as mod  # pylint: disable=g-import-not-at-top
  from geomeld_jax.models import geomeld  # pylint: disable=g-import-not-at-top

  config = _config(tmp_path, **{"model.itc_loss": "siglip"})
  checkpointing.save_config(tmp_path, config)
  (tmp_path / checkpointing.DATASET_FILENAME).write_text(
      json.dumps({"input_bands": list(mod.SENTINEL2.bands)}))
  mcfg = geomeld.GeoMeldFMConfig.from_dict(config.model.to_dict())
  _, params = geomeld.init(mcfg, jax.random.key(0))
  params["logit_bias"][...] = jnp.float32(-7.5)
  manager = ocp.CheckpointManager(checkpointing.checkpoint_dir(tmp_path),
                                  item_names=(checkpointing.STATE_ITEM,))
  manager.save(3, args=ocp.args.Composite(**{checkpointing.STATE_ITEM: ocp.args.PyTreeSave(
      {"params": params, "ema_params": geomeld.encoder_params(params)})}))
  manager.wait_until_finished()
  out = export.export_encoder(tmp_path)
  assert export.is_exported(tmp_path, 3)
  model, info = export.load_itc_model(out)
  assert info["model"]["itc_loss"] == "siglip" and float(model.logit_bias[...]) == -7.5


@pytest.mark.parametrize("overrides, match", [
    ({"input.eval_split": "nope"}, "no split 'nope'"),
    ({"input.global_batch_size": 64}, "split 'val' has .* records, fewer than one global batch"),
    ({"eval_every": 0}, "config.eval_every must be positive"),
])
def test_bad_eval_settings_fail_before_any_step(demo_dataset, tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(_config(demo_dataset, **overrides), tmp_path)
  assert not (tmp_path / checkpointing.CHECKPOINT_SUBDIR).exists()
