"""JEPA branch: the multi-block mask sampler, the conv predictor and the EMA teacher update.

The branch follows I-JEPA (objectives.md §4) on the ConvNeXtV2 final grid, as CNN-JEPA does:
the student encoder sees the context (masked = NOT context, dense masked convolution), the
EMA teacher sees the whole image inside `jax.lax.stop_gradient`, and a predictor regresses
the teacher's layer-normed features at the target positions (`losses.jepa_loss`). With the
model's `jepa_context='mae_pass'` the sampler is unused: the MAE pass's random mask gives the
context (visible cells) and the targets (masked cells), CNN-JEPA's random-mask strategy.

Predictor choice: the CNN-JEPA conv predictor (3 x [depthwise 3x3 -> 1x1 -> LN -> GELU],
no final activation because ConvNeXt features are signed). Position is implicit in the map,
so it needs no positional table, works on any grid (4x4 at 64 px up to 14x14), costs a few
dim^2 weights, and it is the variant tested on ConvNets; a transformer predictor would buy
global context the 3x3 stack gets from the encoder's 7x7 receptive field anyway on 8x8 grids.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

_INIT = nnx.initializers.normal(0.02)  # objectives.md §1.5: std 0.02 everywhere


# ----------------------------------------------------------------------------------------
# Mask sampler.
# ----------------------------------------------------------------------------------------


class JepaMasks(NamedTuple):
  """Boolean maps on the final grid (True = in the set)."""

  context: jax.Array  # (B, gh, gw): context block minus every kept target block
  target: jax.Array  # (B, gh, gw): union of the kept target blocks
  target_blocks: jax.Array  # (B, M, gh, gw): each target block (all False if dropped)
  target_hw: jax.Array  # (2,) int32: target block height, width (shared by the batch)
  context_hw: jax.Array  # (2,) int32: context block height, width (shared by the batch)
  thinned: jax.Array  # (B,) bool: the context had more than `max_context` cells and was thinned


def context_capacity(grid_cells: int, fraction: float, min_context: int) -> int:
  """Static bound on a context's cells: ceil(fraction * cells), at least min_context.

  The context pass then computes its MLPs on this many cells (convnextv2
  `max_visible_cells`); at `grid_cells` it runs the dense masked pass.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"context capacity fraction must be in (0, 1], got {fraction}")
  return min(grid_cells, max(min_context, math.ceil(fraction * grid_cells)))


def _block_size(key: jax.Array, grid_h: int, grid_w: int, scale: tuple[float, float],
                aspect: tuple[float, float]) -> jax.Array:
  """(h, w) with h*w ~ scale * grid area and h/w ~ aspect; 1 <= h <= grid_h, 1 <= w <= grid_w.

  Scale and aspect are drawn independently (I-JEPA reuses one uniform for both, which makes
  them perfectly correlated). The clip is inclusive, so a full-grid block is possible.
  """
  k_scale, k_aspect = jax.random.split(key)
  s = jax.random.uniform(k_scale, (), minval=scale[0], maxval=scale[1])
  a = jax.random.uniform(k_aspect, (), minval=aspect[0], maxval=aspect[1])
  area = s * grid_h * grid_w
  h = jnp.clip(jnp.round(jnp.sqrt(area * a)), 1, grid_h).astype(jnp.int32)
  w = jnp.clip(jnp.round(jnp.sqrt(area / a)), 1, grid_w).astype(jnp.int32)
  return jnp.stack([h, w])


def _place_block(key: jax.Array, hw: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
  """A (grid_h, grid_w) bool block of size hw at a uniform top-left corner.

  The corner is uniform over 0..grid - size INCLUSIVE, so the last row and column are
  reachable (ijepa's exclusive randint(0, H - h) never reaches them: PR #40 / #59).
  floor(u * n) instead of randint with a traced bound: same distribution, far less to compile.
  """
  u = jax.random.uniform(key, (2,))
  slots = jnp.stack([grid_h, grid_w]) - hw + 1
  top, left = jnp.minimum(jnp.floor(u * slots).astype(jnp.int32), slots - 1)
  rows = jnp.arange(grid_h)[:, None]
  cols = jnp.arange(grid_w)[None, :]
  return (rows >= top) & (rows < top + hw[0]) & (cols >= left) & (cols < left + hw[1])


def sample_jepa_masks(
    key: jax.Array,
    batch: int,
    grid_h: int,
    grid_w: int,
    *,
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    min_context: int = 4,
    max_context: int | None = None,
) -> JepaMasks:
  """I-JEPA multi-block masks as per-sample boolean maps (jittable; no ragged index lists).

  Block sizes are drawn once per batch (as I-JEPA does); positions are drawn per sample.
  Target blocks may overlap each other. The context is a square-ish block of
  `context_scale` minus the union of the targets. If that leaves fewer than `min_context`
  positions, target blocks are dropped from the last one back until it does (I-JEPA retries
  and then relaxes constraints instead); the first target block is kept whenever it leaves
  the context non-empty. So the context is never empty, and a sample whose first target would
  swallow its whole context (possible only with a small `context_scale` against a large
  `target_scale`) keeps no target: it adds nothing to the JEPA loss's masked mean.
  A context with more than `max_context` cells keeps a uniformly random `max_context` of them
  (a static bound lets the context pass compute on that many cells only; I-JEPA truncates
  every context to the batch's smallest, dropping the last cells in raster order, a spatial
  bias its issue #60 reports).

  Args:
    key: PRNG key.
    batch: B.
    grid_h, grid_w: final feature grid of the encoder.
    num_targets: M target blocks.
    target_scale: fraction of the grid covered by one target block.
    target_aspect: height / width range of a target block.
    context_scale: fraction of the grid covered by the context block (aspect 1).
    min_context: minimum context positions required to keep a 2nd..Mth target block.
    max_context: most context positions kept (static; None: no bound); >= min_context.

  Returns:
    `JepaMasks`.
  """
  if num_targets < 1:
    raise ValueError(f"num_targets must be >= 1, got {num_targets}")
  if max_context is not None and not 1 <= min_context <= max_context:
    raise ValueError(f"max_context must be >= min_context >= 1, got max_context={max_context}, "
                     f"min_context={min_context}")
  k_tsize, k_csize, k_pos = jax.random.split(key, 3)
  target_hw = _block_size(k_tsize, grid_h, grid_w, target_scale, target_aspect)
  context_hw = _block_size(k_csize, grid_h, grid_w, context_scale, (1.0, 1.0))

  def one_sample(k):
    k_thin, k = jax.random.split(k)
    keys = jax.random.split(k, num_targets + 1)
    blocks = jax.vmap(lambda kk: _place_block(kk, target_hw, grid_h, grid_w))(keys[1:])
    context_block = _place_block(keys[0], context_hw, grid_h, grid_w)
    unions = jnp.cumsum(blocks.astype(jnp.int32), axis=0) > 0  # union of the first k+1 blocks
    kept_ctx = jnp.sum(context_block[None] & ~unions, axis=(1, 2))  # (M,)
    need = jnp.where(jnp.arange(num_targets) == 0, 1, min_context)
    # Monotone: the context only shrinks as blocks are added, so the count of feasible
    # prefixes is the number of blocks to keep (0 when even the first empties the context).
    num_kept = jnp.sum(kept_ctx >= need)
    keep = jnp.arange(num_targets) < num_kept
    blocks = blocks & keep[:, None, None]
    target = jnp.any(blocks, axis=0)
    context = context_block & ~target
    thinned = jnp.zeros((), bool)
    if max_context is not None:
      noise = jnp.where(context, jax.random.uniform(k_thin, context.shape), jnp.inf)
      rank = jnp.argsort(jnp.argsort(noise.ravel())).reshape(context.shape)
      thinned = jnp.sum(context) > max_context
      context = context & (rank < max_context)
    return context, target, blocks, thinned

  context, target, blocks, thinned = jax.vmap(one_sample)(jax.random.split(k_pos, batch))
  return JepaMasks(context, target, blocks, target_hw, context_hw, thinned)


# ----------------------------------------------------------------------------------------
# Predictor.
# ----------------------------------------------------------------------------------------


class _PredictorLayer(nnx.Module):
  """Depthwise 3x3 -> 1x1 -> LayerNorm (f32) [-> GELU]."""

  def __init__(self, dim: int, *, kernel_size: int, dtype, param_dtype, rngs: nnx.Rngs):
    self.dwconv = nnx.Conv(dim, dim, (kernel_size, kernel_size), padding="SAME",
                           feature_group_count=dim, kernel_init=_INIT, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    self.pwconv = nnx.Linear(dim, dim, kernel_init=_INIT, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)
    self.norm = nnx.LayerNorm(dim, epsilon=1e-6, dtype=jnp.float32, param_dtype=param_dtype,
                              rngs=rngs)

  def __call__(self, x: jax.Array, *, activate: bool) -> jax.Array:
    x = self.norm(self.pwconv(self.dwconv(x)))
    return jax.nn.gelu(x, approximate=False) if activate else x


class ConvPredictor(nnx.Module):
  """CNN-JEPA predictor: mask tokens at non-context positions, then `depth` conv layers.

  Output width equals the encoder's final width (the teacher's feature width).
  """

  def __init__(self, dim: int, *, depth: int = 3, kernel_size: int = 3,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if depth < 1:
      raise ValueError(f"predictor depth must be >= 1, got {depth}")
    self.dtype = dtype
    self.mask_token = nnx.Param(_INIT(rngs.params(), (dim,), param_dtype))
    self.layers = nnx.List([
        _PredictorLayer(dim, kernel_size=kernel_size, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs) for _ in range(depth)
    ])

  def __call__(self, feats: jax.Array, context: jax.Array) -> jax.Array:
    """feats (B, h, w, D) from the context pass; context (B, h, w) bool -> (B, h, w, D) f32."""
    token = self.mask_token[...].astype(self.dtype)
    x = jnp.where(context[..., None], feats.astype(self.dtype), token)
    last = len(self.layers) - 1
    for i, layer in enumerate(self.layers):
      x = layer(x, activate=i < last)  # no final activation: ConvNeXt features are signed
    return x.astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# EMA teacher.
# ----------------------------------------------------------------------------------------


def ema_momentum(step, total_steps: int, start: float = 0.996, end: float = 1.0) -> jax.Array:
  """I-JEPA schedule: momentum rises linearly from `start` at step 0 to `end` at total_steps."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
  return start + (end - start) * frac


def ema_update(ema_params, params, momentum):
  """theta_bar <- m * theta_bar + (1 - m) * theta, leaf by leaf (any matching pytrees)."""
  m = jnp.asarray(momentum, jnp.float32)

  def update(e, p):
    return (m * e.astype(jnp.float32) + (1.0 - m) * p.astype(jnp.float32)).astype(e.dtype)

  return jax.tree.map(update, ema_params, params)
