"""The weight-decay rule, the schedule and one AdamW step against a hand computation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from geomeld_jax import optim

# path -> (shape, expected to be decayed)
REPRESENTATIVE = {
    "encoder/stem/conv/kernel": ((4, 4, 12, 40), True),
    "encoder/stem/conv/bias": ((40,), False),
    "encoder/stem/norm/scale": ((40,), False),
    "encoder/stem/norm/bias": ((40,), False),
    "encoder/stages/0/blocks/0/dwconv/kernel": ((7, 7, 1, 40), True),
    "encoder/stages/0/blocks/0/norm/scale": ((40,), False),
    "encoder/stages/0/blocks/0/pwconv1/kernel": ((40, 160), True),
    "encoder/stages/0/blocks/0/grn/gamma": ((1, 1, 1, 160), False),
    "encoder/stages/0/blocks/0/grn/beta": ((1, 1, 1, 160), False),
    "encoder/stages/1/downsample/layernorm/scale": ((40,), False),
    "encoder/stages/1/downsample/conv/kernel": ((2, 2, 40, 80), True),
    "text/token_embedding/embedding": ((1000, 64), True),
    "text/pos_embedding": ((1, 32, 64), False),
    "text/blocks/0/ln_1/scale": ((64,), False),
    "text/blocks/0/attn/qkv/kernel": ((64, 192), True),
    "decoder/mask_token": ((1, 1, 64), False),
    "jepa/predictor/pos_embed/embedding": ((64, 64), False),
    "logit_scale": ((), False),
    "logit_bias": ((), False),
    "log_vars/sentinel2": ((), False),
    "log_vars/dynamic_world": ((1,), False),
    "heads/sentinel2/kernel": ((64, 12), True),
}


def _nested(paths: dict) -> dict:
  tree: dict = {}
  for path, (shape, _) in paths.items():
    node = tree
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = jnp.zeros(shape)
  return tree


def test_weight_decay_mask_on_representative_paths():
  mask = optim.weight_decay_mask(_nested(REPRESENTATIVE))
  got = {optim.path_to_str(path): value for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert got == {path: decayed for path, (_, decayed) in REPRESENTATIVE.items()}


def test_weight_decay_mask_on_nnx_state_and_abstract_tree():
  class Tiny(nnx.Module):

    def __init__(self):
      self.norm = nnx.LayerNorm(8, rngs=nnx.Rngs(0))
      self.dense = nnx.Linear(8, 16, rngs=nnx.Rngs(0))

  _, state = nnx.split(Tiny())
  mask = optim.weight_decay_mask(state)
  flat = {optim.path_to_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat == {"dense/bias": False, "dense/kernel": True, "norm/bias": False, "norm/scale": False}
  abstract = jax.eval_shape(lambda: _nested(REPRESENTATIVE))
  assert jax.tree.leaves(optim.weight_decay_mask(abstract)) == jax.tree.leaves(
      optim.weight_decay_mask(_nested(REPRESENTATIVE)))


def _cfg(**over):
  return {**dict(lr=1e-3, warmup_steps=10, total_steps=110, grad_clip_norm=1.0, min_lr=1e-5,
                 b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, mu_dtype=None), **over}


def test_schedule_warmup_then_cosine():
  _, schedule = optim.make_optimizer(_cfg())
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(60)), 1e-5 + (1e-3 - 1e-5) * 0.5, rtol=1e-5)  # half-way
  np.testing.assert_allclose(float(schedule(110)), 1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(500)), 1e-5, rtol=1e-5)
  _, no_warmup = optim.make_optimizer(_cfg(warmup_steps=0))
  np.testing.assert_allclose(float(no_warmup(0)), 1e-3, rtol=1e-6)


def test_one_step_matches_hand_computed_adamw_with_clipping_and_mask():
  params = {"dense": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}}
  grads = {"dense": {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full((2,), 4.0)}}
  # ConfigDict input, as the trainer passes config.optim.
  cfg = ml_collections.ConfigDict(_cfg(lr=0.1, warmup_steps=0, total_steps=100, min_lr=0.0,
                                       grad_clip_norm=1.0, weight_decay=0.5, eps=0.0))
  tx, schedule = optim.make_optimizer(cfg)
  updates, _ = tx.update(grads, tx.init(params), params)
  lr = float(schedule(0))
  # Clipping rescales to global norm 1; Adam's first step is then sign(g) (eps=0), so the
  # update is -lr * (1 + wd * p) on the decayed kernel and -lr * 1 on the undecayed bias.
  np.testing.assert_allclose(updates["dense"]["kernel"], -lr * (1.0 + 0.5 * 2.0), rtol=1e-5)
  np.testing.assert_allclose(updates["dense"]["bias"], -lr * 1.0, rtol=1e-5)


def test_clipping_bounds_the_global_norm():
  params = {"w": jnp.ones((3, 3))}
  tx, _ = optim.make_optimizer(_cfg(grad_clip_norm=0.5, b1=0.0, weight_decay=0.0))
  state = tx.init(params)
  big = {"w": jnp.full((3, 3), 100.0)}
  # Adam normalises update magnitudes, so look at the second moment: nu = (1 - b2) * g^2 with
  # g the clipped gradient (global norm 300 -> 0.5, i.e. each entry 0.5 / 3).
  _, new_state = tx.update(big, state, params)
  np.testing.assert_allclose(new_state[1][0].nu["w"], 0.05 * (0.5 / 3.0) ** 2, rtol=1e-5)
  tx_free, _ = optim.make_optimizer(_cfg(grad_clip_norm=None, b1=0.0, weight_decay=0.0))
  _, free_state = tx_free.update(big, tx_free.init(params), params)
  np.testing.assert_allclose(free_state[1][0].nu["w"], 0.05 * 100.0**2, rtol=1e-5)
  # Same state structure with or without clipping: a run may resume with it changed.
  assert jax.tree.structure(free_state) == jax.tree.structure(new_state)


def test_bf16_first_moment():
  tx, _ = optim.make_optimizer(_cfg(mu_dtype="bfloat16"))
  state = tx.init({"w": jnp.zeros((4, 4))})
  assert state[1][0].mu["w"].dtype == jnp.bfloat16 and state[1][0].nu["w"].dtype == jnp.float32


@pytest.mark.parametrize("cfg,message", [
    ({k: v for k, v in _cfg().items() if k != "grad_clip_norm"},
     r"lacks the required fields \['grad_clip_norm'\]"),
    (_cfg(learning_rate=1.0), r"unknown optimizer fields \['learning_rate'\]"),
    (_cfg(warmup_steps=110), "warmup_steps < total_steps"),
    (_cfg(min_lr=1.0), "min_lr <= lr"),
    (_cfg(weight_decay=-1.0), "weight_decay must be >= 0"),
])
def test_bad_config_is_refused(cfg, message):
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(cfg)
