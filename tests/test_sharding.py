"""Mesh construction, the FSDP rule, train-state sharding and batch placement on a 2x4 CPU mesh."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import pretrain
from geomeld_jax import records
from geomeld_jax import sharding
from geomeld_jax import train_step as ts

MB = 2**20


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh([("data", 2), ("fsdp", -1)])


def test_make_mesh_resolves_minus_one_with_auto_axes(mesh):
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  three = sharding.make_mesh([("data", -1), ("fsdp", 2), ("model", 1)])
  assert dict(three.shape) == {"data": 4, "fsdp": 2, "model": 1}
  subset = sharding.make_mesh([("data", 1), ("fsdp", 2)], devices=jax.devices()[:2])
  assert list(subset.devices.flat) == jax.devices()[:2]


@pytest.mark.parametrize("spec,message", [
    ([("data", 8)], "lacks the required axes ['fsdp']"),
    ([("data", -1), ("fsdp", -1)], "at most one mesh axis may be -1"),
    ([("data", 3), ("fsdp", -1)], "not divisible by 3"),
    ([("data", 2), ("fsdp", 2)], "needs 4 devices, there are 8"),
    ([("data", 0), ("fsdp", -1)], "positive or -1"),
    ([("data", 2), ("data", 4)], "unique"),
])
def test_make_mesh_rejects_bad_specs(spec, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    sharding.make_mesh(spec)


def test_fsdp_rule():
  spec = lambda shape, mb=4.0, n=4: sharding.fsdp_spec(shape, int(np.prod(shape)) * 4, n, min_size_to_shard_mb=mb)
  assert spec((1024, 1024)) == P()  # exactly 4 MiB of f32: at the threshold, replicated
  assert spec((1023, 1025)) == P()  # above 4 MiB, but no dimension divisible by 4
  assert spec((1024, 1028)) == P(None, "fsdp")  # largest divisible dimension
  assert spec((1028, 1024)) == P("fsdp", None)
  assert spec((3, 3, 512, 1024)) == P(None, None, None, "fsdp")
  assert spec((3, 3, 1024, 1024)) == P(None, None, None, "fsdp")  # ties: the later (output) dim
  assert spec((4097, 1024)) == P(None, "fsdp")  # largest dim not divisible, next one is
  assert spec((4096, 4096), n=1) == P()  # fsdp axis of size 1: nothing to shard over


def _toy_params():
  return {
      "encoder": {"big": {"kernel": jax.ShapeDtypeStruct((3, 3, 256, 512), jnp.float32),  # 4.5 MiB
                          "bias": jax.ShapeDtypeStruct((512,), jnp.float32)},
                  "small": {"kernel": jax.ShapeDtypeStruct((64, 64), jnp.float32)}},
      "embed": jax.ShapeDtypeStruct((4098, 512), jnp.float32),  # 8 MiB, only dim 1 divisible by 4
  }


def test_param_sharding_on_abstract_params(mesh):
  shardings = sharding.param_sharding(_toy_params(), mesh)
  assert shardings["encoder"]["big"]["kernel"].spec == P(None, None, None, "fsdp")
  assert shardings["encoder"]["big"]["bias"].spec == P()
  assert shardings["encoder"]["small"]["kernel"].spec == P()
  assert shardings["embed"].spec == P(None, "fsdp")
  loose = sharding.param_sharding(_toy_params(), mesh, min_size_to_shard_mb=0.01)
  assert loose["encoder"]["small"]["kernel"].spec == P(None, "fsdp")


def test_state_sharding_moments_and_ema_follow_params(mesh):
  params = _toy_params()
  # bf16 first moment: half the bytes, so the size rule alone would give it other shardings.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, mu_dtype=jnp.bfloat16,
                                                                mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params), "ema_params": params,
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  shardings = sharding.state_sharding(state, mesh)
  assert set(shardings) == set(state)
  assert jax.tree.structure(shardings) == jax.tree.structure(state)
  adam = shardings["opt_state"][1][0]
  for tree in (adam.mu, adam.nu, shardings["ema_params"]):
    assert tree["encoder"]["big"]["kernel"].spec == P(None, None, None, "fsdp")
    assert tree["embed"].spec == P(None, "fsdp")
    assert tree["encoder"]["big"]["bias"].spec == P()
  assert shardings["step"].spec == P() and adam.count.spec == P()
  # Abstract state with shardings materialises straight into that layout.
  abstract = sharding.with_shardings(state, shardings)
  zeros = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state),
                  out_shardings=shardings)()
  assert zeros["opt_state"][1][0].mu["embed"].sharding == abstract["opt_state"][1][0].mu["embed"].sharding
  assert zeros["opt_state"][1][0].mu["embed"].addressable_shards[0].data.shape == (4098, 128)


def test_state_sharding_requires_params(mesh):
  with pytest.raises(ValueError, match="'params' entry"):
    sharding.state_sharding({"weights": {}}, mesh)


def test_batch_divisibility(mesh):
  assert sharding.num_batch_shards(mesh) == 8
  assert sharding.per_process_batch_size(64, mesh) == 64
  with pytest.raises(ValueError, match="multiple of the 8 batch shards"):
    sharding.per_process_batch_size(12, mesh)


def test_put_batch_shards_leading_dim_under_disallow_guard(mesh):
  local = {"image": np.arange(16 * 3 * 2, dtype=np.float32).reshape(16, 3, 2), "label": np.arange(16)}
  with jax.transfer_guard("disallow"):  # put_batch is an explicit transfer: allowed
    batch = sharding.put_batch(local, mesh)
  assert batch["image"].sharding.spec == P(("data", "fsdp"))
  assert batch["image"].shape == (16, 3, 2)
  assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 3, 2)}
  np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(16))
  with pytest.raises(ValueError, match="'label' of local shape \\(12,\\)"):
    sharding.put_batch({"label": np.arange(12)}, mesh)


def test_set_global_flags():
  before = (jax.config.jax_threefry_partitionable, jax.config.jax_transfer_guard)
  try:
    sharding.set_global_flags("disallow")
    assert jax.config.jax_threefry_partitionable is True
    assert jax.config.jax_transfer_guard == "disallow"
    with pytest.raises(Exception, match="[Dd]isallowed"):
      jnp.ones(3) + np.ones(3)  # an implicit host->device transfer
  finally:
    jax.config.update("jax_threefry_partitionable", before[0])
    jax.config.update("jax_transfer_guard", before[1])
  with pytest.raises(ValueError, match="transfer_guard must be one of"):
    sharding.set_global_flags("sometimes")


def test_maybe_initialize_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(1))
  monkeypatch.delenv(sharding.DISTRIBUTED_ENV_VAR, raising=False)
  assert sharding.maybe_initialize_distributed() is False and not calls
  monkeypatch.setenv(sharding.DISTRIBUTED_ENV_VAR, "1")
  assert sharding.maybe_initialize_distributed() is True and calls == [1]
  monkeypatch.setenv(sharding.DISTRIBUTED_ENV_VAR, "yes")
  with pytest.raises(ValueError, match="GEOMELD_DISTRIBUTED must be"):
    sharding.maybe_initialize_distributed()


def test_data_parallel_step_moves_no_activations():
  """On a 2x4 mesh with replicated parameters the MP-MAE step's only collectives are the
  gradient/metric all-reduces: no activation is gathered across batch shards (the visible-
  cell gathers must stay per-shard)."""
  config = pretrain.get_config("smoke,mp_mae")
  config.mesh = (("data", 2), ("fsdp", 4))
  assert config.model.mae_visible_only
  mesh = sharding.make_mesh(config.mesh)
  setup = ts.setup(config, mesh, records.Normalizer(ts.synthetic_statistics()))
  hlo = setup.train_step.lower(setup.abstract_state,
                               ts.abstract_batch(config, mesh)).compile().as_text()
  collectives = re.findall(
      r" (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", hlo)
  assert collectives and set(collectives) == {"all-reduce"}, sorted(set(collectives))
