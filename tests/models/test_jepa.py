"""JEPA block sampler properties, the conv predictor and the EMA teacher update.

The teacher's zero gradient through the real `loss_fn` is checked in test_geomeld.py (it
shares that module's compiled step).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geomeld_jax.models import jepa

DRAWS = 64  # batches of 8 per grid: 512 samples, 2048 target blocks


@pytest.fixture(scope="module", params=[(14, 14), (4, 6)], ids=lambda g: f"{g[0]}x{g[1]}")
def draws(request):
  gh, gw = request.param
  sample = jax.jit(jax.vmap(lambda k: jepa.sample_jepa_masks(k, 8, gh, gw)))
  masks = sample(jax.random.split(jax.random.key(0), DRAWS))
  return (gh, gw), jax.tree.map(np.asarray, masks)


def _size_bounds(n, scale, aspect, grid):
  """Inclusive bounds on a block side h = round(sqrt(n * s * a)) over the ranges."""
  lo = max(1, round(math.sqrt(n * scale[0] * aspect[0])))
  hi = min(grid, round(math.sqrt(n * scale[1] * aspect[1])))
  return lo, hi


def test_block_sizes_within_ranges(draws):
  (gh, gw), m = draws
  n = gh * gw
  h_lo, h_hi = _size_bounds(n, (0.15, 0.2), (0.75, 1.5), gh)
  w_lo, w_hi = _size_bounds(n, (0.15, 0.2), (1 / 1.5, 1 / 0.75), gw)
  th, tw = m.target_hw[:, 0], m.target_hw[:, 1]
  assert np.all((th >= h_lo) & (th <= h_hi)), (th, h_lo, h_hi)
  assert np.all((tw >= w_lo) & (tw <= w_hi)), (tw, w_lo, w_hi)
  ch, cw = m.context_hw[:, 0], m.context_hw[:, 1]
  c_lo = max(1, round(math.sqrt(n * 0.85)))
  assert np.all((ch >= min(c_lo, gh)) & (ch <= gh) & (cw >= min(c_lo, gw)) & (cw <= gw))
  # Each kept target block is an axis-aligned h x w rectangle; the size is shared by a batch.
  for d in range(0, DRAWS, 7):
    for blk in m.target_blocks[d].reshape(-1, gh, gw):
      if not blk.any():
        continue
      rows, cols = np.nonzero(blk.any(1))[0], np.nonzero(blk.any(0))[0]
      assert (rows.size, cols.size) == tuple(m.target_hw[d])
      assert blk.sum() == rows.size * cols.size


def test_context_disjoint_nonempty_and_targets_present(draws):
  _, m = draws
  assert not np.any(m.context & m.target)
  assert np.all(m.context.sum(axis=(-1, -2)) >= 1)
  assert np.all(m.target.sum(axis=(-1, -2)) >= 1)
  np.testing.assert_array_equal(m.target, m.target_blocks.any(axis=2))
  assert np.all(m.target_blocks[..., 0, :, :].any(axis=(-1, -2)))  # first block always kept


def test_every_edge_reachable_and_positions_per_sample(draws):
  (gh, gw), m = draws
  blocks = m.target_blocks.reshape(-1, gh, gw)
  assert blocks[:, gh - 1, :].any() and blocks[:, :, gw - 1].any()  # ijepa PR #40 bug
  assert blocks[:, 0, :].any() and blocks[:, :, 0].any()
  # Context blocks reach the last row/column too, and targets move from sample to sample.
  assert m.context[..., gh - 1, :].any() and m.context[..., :, gw - 1].any()
  assert not np.all(m.target[:, :1] == m.target[:, 1:2])


def test_min_context_drops_trailing_targets():
  # 2x2 targets on a 4x4 grid with a full context: 4 blocks would often leave < 8 cells.
  masks = jax.jit(lambda k: jepa.sample_jepa_masks(
      k, 64, 4, 4, num_targets=4, target_scale=(0.25, 0.25), target_aspect=(1.0, 1.0),
      context_scale=(1.0, 1.0), min_context=8))(jax.random.key(3))
  ctx = np.asarray(masks.context).sum(axis=(1, 2))
  kept = np.asarray(masks.target_blocks).any(axis=(2, 3)).sum(axis=1)
  assert np.all(ctx >= 8)
  assert kept.min() >= 1 and kept.max() > 1 and kept.min() < 4


def test_context_is_never_empty_even_when_a_target_covers_it():
  # A small context block against large targets: the first target can swallow it whole.
  masks = jepa.sample_jepa_masks(jax.random.key(0), 256, 4, 4, target_scale=(0.3, 0.4),
                                 context_scale=(0.15, 0.2), min_context=2)
  ctx = np.asarray(masks.context).sum(axis=(1, 2))
  targets = np.asarray(masks.target).sum(axis=(1, 2))
  assert ctx.min() >= 1
  swallowed = targets == 0  # those samples keep no target, so the JEPA loss skips them
  assert 0 < swallowed.sum() < 256
  assert not np.any(np.asarray(masks.context) & np.asarray(masks.target))


def test_context_capacity_thins_contexts_uniformly():
  gh = gw = 8
  cap = jepa.context_capacity(gh * gw, 0.375, min_context=4)
  assert cap == 24
  assert jepa.context_capacity(16, 0.1, min_context=4) == 4
  assert jepa.context_capacity(16, 1.0, min_context=4) == 16
  with pytest.raises(ValueError, match=r"must be in \(0, 1\], got 0.0"):
    jepa.context_capacity(16, 0.0, min_context=4)
  with pytest.raises(ValueError, match="max_context must be >= min_context"):
    jepa.sample_jepa_masks(jax.random.key(0), 2, gh, gw, min_context=4, max_context=3)

  sample = jax.jit(lambda k, m: jepa.sample_jepa_masks(k, 512, gh, gw, max_context=m),
                   static_argnums=1)
  free, thin = sample(jax.random.key(4), None), sample(jax.random.key(4), cap)
  free, thin = jax.tree.map(np.asarray, free), jax.tree.map(np.asarray, thin)
  np.testing.assert_array_equal(thin.target, free.target)  # thinning touches the context only
  n_free, n_thin = free.context.sum((1, 2)), thin.context.sum((1, 2))
  assert not np.any(thin.context & ~free.context)
  np.testing.assert_array_equal(n_thin, np.minimum(n_free, cap))
  np.testing.assert_array_equal(thin.thinned, n_free > cap)
  assert not free.thinned.any() and 0.05 < thin.thinned.mean() < 0.95
  # Uniform among the context's cells: the top and bottom halves keep the same share
  # (I-JEPA's raster-order truncation would keep every top cell and drop bottom ones).
  dropped = free.context & ~thin.context
  kept_share = [1 - dropped[:, rows].sum() / free.context[thin.thinned][:, rows].sum()
                for rows in (slice(0, 4), slice(4, 8))]
  assert abs(kept_share[0] - kept_share[1]) < 0.03, kept_share


def test_predictor_ignores_non_context_features():
  dim = 16
  pred = jepa.ConvPredictor(dim, rngs=nnx.Rngs(0))
  r = np.random.default_rng(0)
  feats = jnp.asarray(r.normal(size=(2, 4, 4, dim)), jnp.float32)
  context = jnp.asarray(r.random((2, 4, 4)) > 0.5)
  out = pred(feats, context)
  assert out.shape == (2, 4, 4, dim) and out.dtype == jnp.float32
  noisy = jnp.where(context[..., None], feats, feats + 50.0)
  np.testing.assert_array_equal(np.asarray(pred(noisy, context)), np.asarray(out))
  # No final activation: GELU outputs are >= -0.17, the predictor's last LN is signed freely.
  assert float(out.min()) < -0.5


def test_ema_schedule_and_update():
  np.testing.assert_allclose(float(jepa.ema_momentum(0, 1000)), 0.996, rtol=1e-7)
  np.testing.assert_allclose(float(jepa.ema_momentum(500, 1000)), 0.998, rtol=1e-7)
  np.testing.assert_allclose(float(jepa.ema_momentum(1000, 1000)), 1.0, rtol=1e-7)
  np.testing.assert_allclose(float(jepa.ema_momentum(5000, 1000)), 1.0, rtol=1e-7)
  ema = {"a": jnp.asarray([1.0, 2.0]), "b": {"c": jnp.asarray(3.0)}}
  params = {"a": jnp.asarray([0.0, 4.0]), "b": {"c": jnp.asarray(-1.0)}}
  out = jax.jit(jepa.ema_update)(ema, params, jnp.asarray(0.75))
  np.testing.assert_allclose(np.asarray(out["a"]), [0.75, 2.5])
  np.testing.assert_allclose(float(out["b"]["c"]), 2.0)
  same = jepa.ema_update(ema, params, 1.0)
  np.testing.assert_array_equal(np.asarray(same["a"]), np.asarray(ema["a"]))
