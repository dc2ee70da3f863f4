"""AOT compile of the real train step for a TPU slice on this CPU (libtpu's compiler)."""

import pytest

from configs import pretrain
from geomeld_jax import aot


@pytest.fixture(scope="module")
def smoke_report():
  """The smoke MP-MAE step, compiled for a v5e 2x2 slice with FSDP on (the full objective
  compiles in twice the time: ~75 s on the 2-core CI machine)."""
  config = pretrain.get_config("smoke,mp_mae")
  config.mesh = (("data", 2), ("fsdp", 2))
  config.min_size_to_shard_mb = 0.0  # shard every tensor with a dimension divisible by 2
  return aot.compile_train_step(config, aot.topology_devices("v5e:2x2"))


def test_compiles_for_tpu_and_shards_state(smoke_report):
  report = smoke_report
  assert report["device_kind"] == "TPU v5 lite"
  assert (report["num_chips"], report["mesh"]) == (4, {"data": 2, "fsdp": 2})
  assert report["fits"] is True and report["flops_per_step"] > 0
  # FSDP must split the state: its per-chip bytes are well under the unsharded total.
  assert report["state_bytes_per_chip"] < 0.6 * report["state_bytes"]
  # Live memory holds at least the sharded state (the arguments).
  assert report["total_bytes_per_chip"] >= report["state_bytes_per_chip"]


def test_unknown_topology_is_named():
  with pytest.raises(ValueError, match="unknown TPU topology 'v9z:1x1'"):
    aot.topology_devices("v9z:1x1")


def test_batch_that_does_not_split_is_refused_before_compiling():
  config = pretrain.get_config("smoke")
  config.mesh = (("data", -1), ("fsdp", 1))
  config.input.global_batch_size = 6  # 4 chips
  with pytest.raises(ValueError, match="multiple of the 4 batch shards"):
    aot.compile_train_step(config, aot.topology_devices("v5e:2x2"))


def test_run_returns_1_when_the_step_does_not_fit(monkeypatch, capsys):
  monkeypatch.setattr(aot, "compile_train_step", lambda config, devices: {
      "fits": False, "total_bytes_per_chip": 20 * 2**30, "hbm_bytes_per_chip": 16 * 2**30})
  monkeypatch.setattr(aot, "topology_devices", lambda name: [])
  assert aot.run(None, "v5e:2x2") == 1
  out, err = capsys.readouterr()
  assert '"topology": "v5e:2x2"' in out
  assert "does not fit: 20.00 GiB per chip > 16 GiB HBM" in err
