"""Checkpointer: sharded round trip, iterator state, keep-last-K, config check, SIGKILL mid-save."""

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from geomeld_jax import checkpointing
from geomeld_jax import sharding
from geomeld_jax import train
from geomeld_jax.models import geomeld

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh([("data", 2), ("fsdp", 4)])


def _state(mesh, seed: int):
  """A small train state, FSDP-sharded (threshold lowered so the tiny kernel is sharded)."""
  rng = np.random.default_rng(seed)
  host = {"params": {"conv": {"kernel": rng.normal(size=(3, 3, 8, 16)).astype(np.float32),
                              "bias": rng.normal(size=(16,)).astype(np.float32)}},
          "opt_state": {"mu": {"conv": {"kernel": rng.normal(size=(3, 3, 8, 16)).astype(np.float32)}}},
          "ema_params": {"conv": {"kernel": rng.normal(size=(3, 3, 8, 16)).astype(np.float32)}},
          "step": np.int32(seed)}
  shardings = sharding.state_sharding(host, mesh, min_size_to_shard_mb=0.001)
  return jax.device_put(host, shardings), shardings


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _iterator():
  return iter(grain.MapDataset.range(1000).shuffle(seed=3).to_iter_dataset())


def test_round_trip_restores_arrays_shardings_and_iterator(tmp_path, mesh):
  state, shardings = _state(mesh, seed=7)
  assert shardings["params"]["conv"]["kernel"].spec == P(None, None, None, "fsdp")
  it = _iterator()
  _ = [next(it) for _ in range(5)]
  ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=10, max_to_keep=2)
  assert ckpt.restore_latest(_abstract(state)) is None  # empty directory
  assert not ckpt.maybe_save(5, state, it)  # not on the interval
  assert ckpt.maybe_save(10, state, it)
  ckpt.wait_until_finished()
  expected_next = [next(it) for _ in range(3)]

  fresh_it = _iterator()
  restored, step = checkpointing.Checkpointer(tmp_path, save_interval_steps=10, max_to_keep=2).restore_latest(
      _abstract(state), fresh_it)
  assert step == 10
  for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == want.sharding
  assert [next(fresh_it) for _ in range(3)] == expected_next

  # Restoring onto a different layout (fully replicated) also works: shardings come from the target.
  replicated = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
                            state)
  restored_repl, _ = ckpt.restore_latest(replicated)
  assert restored_repl["params"]["conv"]["kernel"].sharding.spec == P()
  ckpt.close()


def test_data_iter_is_optional(tmp_path, mesh):
  state, _ = _state(mesh, seed=1)
  ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1, async_save=False)
  assert ckpt.maybe_save(1, state)
  restored, step = ckpt.restore_latest(_abstract(state))
  assert step == 1
  np.testing.assert_array_equal(np.asarray(restored["ema_params"]["conv"]["kernel"]),
                                np.asarray(state["ema_params"]["conv"]["kernel"]))
  with pytest.raises(ValueError, match="holds no data iterator state"):
    ckpt.restore_latest(_abstract(state), _iterator())
  unsharded = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with pytest.raises(ValueError, match="need a target sharding"):
    ckpt.restore_latest(unsharded)
  ckpt.close()


def test_keeps_the_last_k(tmp_path, mesh):
  state, _ = _state(mesh, seed=2)
  ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2)
  saved = [step for step in range(1, 9) if ckpt.maybe_save(step, state)]
  ckpt.wait_until_finished()
  assert saved == [2, 4, 6, 8]
  assert list(ckpt.all_steps()) == [6, 8]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["6", "8"]
  assert ckpt.maybe_save(9, state, force=True)  # e.g. the final step, off the interval
  ckpt.wait_until_finished()
  assert list(ckpt.all_steps()) == [8, 9]
  ckpt.close()


def test_config_saved_and_incompatible_config_refused(tmp_path, mesh):
  config = {"model": {"variant": "atto", "width": 40}, "optim": {"lr": 1e-3}, "total_steps": 100}
  checkpointing.check_compatible(tmp_path, json.dumps(config), ["model"])  # nothing saved yet
  checkpointing.save_config(tmp_path, json.dumps(config))
  assert json.loads((tmp_path / "config.json").read_text()) == config
  checkpointing.check_compatible(tmp_path, config, ["model"])  # no checkpoint yet: anything goes
  state, _ = _state(mesh, seed=3)
  ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1, async_save=False)
  ckpt.maybe_save(1, state)
  ckpt.close()

  # Keys outside keys_that_matter may change on resume.
  checkpointing.check_compatible(tmp_path, {**config, "total_steps": 500, "optim": {"lr": 5e-4}}, ["model"])
  changed = {**config, "model": {"variant": "tiny", "width": 40, "depth": 3}}
  with pytest.raises(ValueError, match="incompatible config") as error:
    checkpointing.check_compatible(tmp_path, changed, ["model", "mesh"])
  message = str(error.value)
  assert "model.variant: checkpoint has 'atto', config has 'tiny'" in message
  assert "model.depth: checkpoint has <absent>, config has 3" in message
  assert "model.width" not in message
  # Exempt keys (how the step computes, not what) may differ or be new, even under 'model'.
  checkpointing.check_compatible(tmp_path, {**config, "model": {**config["model"], "impl": "taps"}},
                                 ["model"], keys_exempt=["model.impl"])
  with pytest.raises(ValueError, match="model.impl: checkpoint has <absent>"):
    checkpointing.check_compatible(
        tmp_path, {**config, "model": {**config["model"], "impl": "taps"}}, ["model"])
  # A field added after the checkpoint was written: compared with the default it ran with.
  with_context = {**config, "model": {**config["model"], "context": "blocks", "scale": (1, 2)}}
  defaults = {"model.context": "blocks", "model.scale": (1, 2)}
  checkpointing.check_compatible(tmp_path, with_context, ["model"], defaults_for_absent=defaults)
  with pytest.raises(ValueError, match="model.context: checkpoint has 'blocks', config has 'mae_pass'"):
    checkpointing.check_compatible(
        tmp_path, {**config, "model": {**config["model"], "context": "mae_pass", "scale": (1, 2)}},
        ["model"], defaults_for_absent=defaults)

  (tmp_path / "config.json").unlink()
  with pytest.raises(ValueError, match="holds checkpoints but no config.json"):
    checkpointing.check_compatible(tmp_path, config, ["model"])


def test_resume_on_another_dataset_refused(tmp_path, mesh):
  fingerprint = {"name": "geomeld", "splits": {"train": {"records": 367, "shards": 8}},
                 "statistics_sha256": "ab12"}
  checkpointing.check_same_dataset(tmp_path, fingerprint)  # first start: recorded
  assert json.loads((tmp_path / "dataset.json").read_text()) == fingerprint
  checkpointing.check_same_dataset(tmp_path, {**fingerprint, "statistics_sha256": "cd34"})  # no checkpoint yet
  checkpointing.check_same_dataset(tmp_path, fingerprint)
  state, _ = _state(mesh, seed=3)
  ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1, async_save=False)
  ckpt.maybe_save(1, state)
  ckpt.close()

  checkpointing.check_same_dataset(tmp_path, fingerprint)  # the same data (moved or rebuilt)
  rebuilt = {**fingerprint, "splits": {"train": {"records": 366, "shards": 8}}}
  with pytest.raises(ValueError, match="another dataset") as error:
    checkpointing.check_same_dataset(tmp_path, rebuilt)
  assert "splits.train.records: checkpoint's dataset has 367, this one has 366" in str(error.value)
  (tmp_path / "dataset.json").unlink()  # checkpoints from before the fingerprint was recorded
  with pytest.raises(ValueError, match="no dataset.json"):
    checkpointing.check_same_dataset(tmp_path, fingerprint)


_KILL_CHILD = textwrap.dedent("""
    import sys, time
    import jax, numpy as np
    from geomeld_jax import checkpointing

    class SlowIteratorState:
      '''Stands in for a grain iterator whose state write is slow: the kill lands mid-save.'''
      slow = False
      def get_state(self):
        if self.slow:
          print('IN_SLOW_SAVE', flush=True)
          time.sleep(120)
        return b'{}'

    state = {'params': {'w': np.arange(2_000_000, dtype=np.float32)}, 'step': np.int32(1)}
    state = jax.device_put(state)
    it = SlowIteratorState()
    ckpt = checkpointing.Checkpointer(sys.argv[1], save_interval_steps=1, max_to_keep=5)
    ckpt.maybe_save(1, state, it)
    ckpt.wait_until_finished()
    print('STEP1_DONE', flush=True)
    it.slow = True
    state = jax.tree.map(lambda x: x + 1, state)
    ckpt.maybe_save(2, state, it)
    ckpt.wait_until_finished()
    print('STEP2_DONE', flush=True)
""")


def test_sigkill_during_async_save_leaves_previous_step_restorable(tmp_path, mesh):
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
  try:
    seen = []
    deadline = time.monotonic() + 60
    while "IN_SLOW_SAVE" not in seen and time.monotonic() < deadline:
      line = child.stdout.readline()
      if not line:
        break
      seen.append(line.strip())
    assert seen[-2:] == ["STEP1_DONE", "IN_SLOW_SAVE"], seen
    # The step-2 save has begun (its temporary directory exists) but is not committed.
    entries = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert any(name.startswith("2.") for name in entries), entries
    assert "2" not in entries
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()
  assert child.returncode == -signal.SIGKILL

  abstract = {"params": {"w": jax.ShapeDtypeStruct((2_000_000,), jnp.float32,
                                                    sharding=sharding.replicated(mesh))},
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))}
  ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=5)
  assert list(ckpt.all_steps()) == [1]
  restored, step = ckpt.restore_latest(abstract)
  assert step == 1 and int(restored["step"]) == 1
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(2_000_000, dtype=np.float32))
  # The half-written step was cleaned away on start-up; saving step 2 again works.
  assert not any(p.name.startswith("2") for p in (tmp_path / "checkpoints").iterdir())
  assert ckpt.maybe_save(2, restored)
  ckpt.wait_until_finished()
  assert list(ckpt.all_steps()) == [1, 2]
  ckpt.close()


def test_sigterm_saves_the_next_step_then_restores_the_handler(tmp_path, mesh):
  state, _ = _state(mesh, seed=4)
  before = signal.getsignal(signal.SIGTERM)
  ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=100, max_to_keep=2,
                                    async_save=False, catch_sigterm=True)
  assert not ckpt.should_save(3) and not ckpt.reached_preemption(3)
  assert not ckpt.maybe_save(3, state)
  os.kill(os.getpid(), signal.SIGTERM)  # what a job scheduler sends before it kills
  assert ckpt.should_save(4) and ckpt.reached_preemption(4)
  assert ckpt.maybe_save(4, state)  # off the interval: saved because of the signal
  assert ckpt.all_steps() == [4]
  ckpt.close()
  assert signal.getsignal(signal.SIGTERM) is before
  # A plain Checkpointer leaves SIGTERM alone.
  plain = checkpointing.Checkpointer(tmp_path, save_interval_steps=100, max_to_keep=2)
  assert signal.getsignal(signal.SIGTERM) is before
  plain.close()


_HOST = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process on CPU
    port, host, workdir = sys.argv[1:]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(host))
    from geomeld_jax import checkpointing
    try:
      checkpointing.check_workdir_is_shared(workdir)
      print("SHARED")
    except ValueError as e:
      print("REFUSED", e)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("shared", [True, False])
def test_two_hosts_must_share_the_workdir(tmp_path, shared):
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  port = _free_port()
  # Two processes of one jax.distributed job; unshared, each has a workdir on "its own disk".
  workdirs = [tmp_path / "wd"] * 2 if shared else [tmp_path / "host0", tmp_path / "host1"]
  for w in workdirs:
    w.mkdir(exist_ok=True)
  hosts = [subprocess.Popen([sys.executable, "-c", _HOST, str(port), str(i), str(w)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i, w in enumerate(workdirs)]
  outputs = [h.communicate(timeout=120) for h in hosts]
  for host, (out, err) in zip(hosts, outputs):
    assert host.returncode == 0, err[-2000:]
    result = out.strip().splitlines()[-1]  # gloo prints its own connection line first
    if shared:
      assert result == "SHARED", out
    else:  # every host refuses, so none waits forever in a later collective
      assert result.startswith("REFUSED hosts [1] do not see the workdir"), out


def test_resume_exempt_keys_are_model_fields():
  fields = {f.name for f in dataclasses.fields(geomeld.GeoMeldFMConfig)}
  for key in train.RESUME_EXEMPT_KEYS:
    section, _, name = key.partition(".")
    assert section == "model" and name in fields, key


def test_resume_from_config_saved_before_a_model_field_existed(tmp_path):
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  config = pretrain.get_config("smoke")
  saved = json.loads(config.to_json())
  del saved["model"]["jepa_context"]  # written before the field existed
  (tmp_path / "config.json").write_text(json.dumps(saved))
  (tmp_path / "checkpoints" / "300").mkdir(parents=True)
  train.check_resumable(tmp_path, config)  # the default is what that run had
  config.model.jepa_context = "mae_pass"
  with pytest.raises(ValueError, match="model.jepa_context: checkpoint has 'blocks', config has 'mae_pass'"):
    train.check_resumable(tmp_path, config)
