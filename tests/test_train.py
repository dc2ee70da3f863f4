"""The train loop end to end on the demo dataset (8 forced CPU devices, tiny smoke model)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from geomeld_jax import checkpointing
from geomeld_jax import export
from geomeld_jax import input_pipeline
from geomeld_jax import records
from geomeld_jax import sharding
from geomeld_jax import train
from geomeld_jax import train_step as ts

from tests.conftest import REPO_ROOT

TOTAL_STEPS = 12
STOP_AT = 6


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


def test_resume_continues_bit_for_bit(full_run, demo_dataset, tmp_path):
  _, reference = full_run
  config = _config(demo_dataset)
  first = train.train_and_evaluate(config, tmp_path, stop_after=STOP_AT)
  assert max(first) == STOP_AT
  resumed = train.train_and_evaluate(config, tmp_path)
  assert sorted(resumed) == list(range(STOP_AT + 1, TOTAL_STEPS + 1))
  for step in range(1, TOTAL_STEPS + 1):
    got = (first if step <= STOP_AT else resumed)[step]
    assert got["loss"] == reference[step]["loss"], step  # bit for bit, not approximately
    assert got["grad_norm"] == reference[step]["grad_norm"], step


def test_export_loads_and_retrieval_runs(full_run, demo_dataset):
  workdir, _ = full_run
  out = workdir / export.EXPORT_SUBDIR / str(TOTAL_STEPS)
  info = json.loads((out / "model_config.json").read_text())
  assert info["encoders"] == ["ema_encoder", "encoder", "itc"]
  encoder, _ = export.load_encoder(out)
  x = jnp.zeros((1, 32, 32, 12))
  assert encoder(x)[0].shape == (1, 4, 4, 320)
  from geomeld_jax.evaluation import retrieval

  model, _ = export.load_itc_model(out)
  files = input_pipeline.locate_dataset(demo_dataset)
  result = retrieval.evaluate_retrieval(model, files, "val", crop_size=32, text_len=32,
                                        drop_bands=[["B2", "B3", "B4"]])
  assert set(result) == {"all_bands", "drop_B2+B3+B4"}
  recalls = result["all_bands"]
  assert recalls["num_images"] > 0 and recalls["num_captions"] >= recalls["num_images"]
  for name, value in recalls.items():
    if name.startswith(("i2t", "t2i")):
      assert 0.0 <= value <= 100.0, (name, value)


def test_incompatible_checkpoint_is_refused_by_key(full_run, demo_dataset):
  workdir, _ = full_run
  config = _config(demo_dataset, **{"model.decoder_width": 32})
  with pytest.raises(ValueError, match="model.decoder_width"):
    train.train_and_evaluate(config, workdir)


def test_missing_dataset_names_the_build_command(tmp_path):
  config = _config(tmp_path / "nothing_here")
  with pytest.raises(FileNotFoundError, match="python -m data_prep"):
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


def test_step_on_2x4_mesh_equals_single_device(demo_dataset):
  config = _config(demo_dataset)
  files = input_pipeline.locate_dataset(demo_dataset)
  normalizer = input_pipeline.normalizer(files)
  host = next(iter(input_pipeline.make_dataset(
      files, "train", global_batch_size=8, crop_size=32, text_len=32, seed=0, train=True)))
  results = []
  for spec, devices in (((("data", 2), ("fsdp", 4)), jax.devices()),
                        ((("data", 1), ("fsdp", 1)), jax.devices()[:1])):
    with config.unlocked():
      config.mesh = spec
      config.min_size_to_shard_mb = 0.0  # shard every parameter that can be: exercise fsdp
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    setup = ts.setup(config, mesh, normalizer)
    state, metrics = setup.train_step(setup.init_state(), sharding.put_batch(host, mesh))
    results.append(jax.device_get((state["params"], metrics)))
  (p8, m8), (p1, m1) = results
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_normalisation_on_device_equals_host(demo_dataset):
  files = input_pipeline.locate_dataset(demo_dataset)
  normalizer = input_pipeline.normalizer(files)
  batch = next(iter(input_pipeline.make_dataset(
      files, "val", global_batch_size=4, crop_size=32, text_len=32, seed=0, train=False)))
  host = records.model_inputs(batch, normalizer)
  device = jax.jit(lambda b: records.model_inputs(b, normalizer, jnp))(batch)
  for key in host:
    # XLA fuses the multiply-add (FMA): equal up to float32 rounding.
    np.testing.assert_allclose(np.asarray(device[key]), host[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)


@pytest.mark.parametrize("args, message", [
    (["--config.no_such_key=1"], "no_such_key"),
    (["--config.total_steps=many"], "total_steps"),
])
def test_config_override_errors_name_the_key(tmp_path, args, message):
  cmd = [sys.executable, "-m", "geomeld_jax.main", "--config=configs/pretrain.py:smoke",
         f"--workdir={tmp_path}", *args]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr


def test_unknown_variant_lists_the_choices():
  with pytest.raises(ValueError, match="objective: s2_mae"):
    pretrain.get_config("smoke,bogus")
