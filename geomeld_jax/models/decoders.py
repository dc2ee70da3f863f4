"""MP-MAE decoders and heads (MMEarth's multi-pretext light decoder, mmearth_peer.md §2.3).

Encoder output (dims[-1], final grid) -> 1x1 projection to the decoder width (512) ->
masked positions replaced by a learned mask token -> `depth` ConvNeXtV2 blocks -> heads:

* pixel targets: a 1x1 head producing patch^2 * C values per grid cell, (row, col, channel)
  order as `losses.patchify` (C = bands for regression maps, classes for class maps);
* image targets: LayerNorm -> global average pool -> Linear (location 4, month 2,
  terrain classes, water 1).

`shared=True` is what MMEarth's released code does: one projection, mask token, block stack
and image LayerNorm serve every target, only the heads are per target. `shared=False` gives
each target its own projection, mask token and blocks (what the MMEarth paper text says).
Every channel and class count comes from the modality registry.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from geomeld_jax import losses
from geomeld_jax import modalities as mod
from geomeld_jax.models import convnextv2

_INIT = nnx.initializers.normal(0.02)  # objectives.md §1.5: std 0.02, mask token N(0, 0.02)


def target_width(name: str) -> int:
  """Values per pixel (pixel targets) or per image (image targets) a head must produce."""
  if name in mod.PIXEL_MODALITIES:
    m = mod.PIXEL_MODALITIES[name]
    return m.num_classes if m.is_classes else m.num_bands
  t = mod.image_target(name)
  return t.num_classes if t.kind is mod.TargetKind.IMAGE_CLASSES else t.dims


def is_pixel_target(name: str) -> bool:
  if name in mod.PIXEL_MODALITIES:
    return True
  mod.image_target(name)  # KeyError naming the known targets for a typo
  return False


class _DecoderBody(nnx.Module):
  """Projection + mask token + ConvNeXtV2 blocks (+ the image-level LayerNorm if needed)."""

  def __init__(self, in_dim: int, width: int, depth: int, *, with_image_norm: bool,
               dwconv_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.proj = nnx.Linear(in_dim, width, kernel_init=_INIT, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    self.mask_token = nnx.Param(_INIT(rngs.params(), (width,), param_dtype))
    self.blocks = nnx.List([
        convnextv2.Block(width, dwconv_impl=dwconv_impl, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)
        for _ in range(depth)
    ])
    self.image_norm = (nnx.LayerNorm(width, epsilon=1e-6, dtype=jnp.float32,
                                     param_dtype=param_dtype, rngs=rngs)
                       if with_image_norm else None)

  def __call__(self, feats: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = self.proj(feats.astype(self.dtype))
    if mask is not None:
      x = jnp.where(mask[..., None], self.mask_token[...].astype(x.dtype), x)
    for block in self.blocks:
      x = block(x, None)  # the decoder sees every position (mask tokens included)
    return x

  def pool(self, x: jax.Array) -> jax.Array:
    """LayerNorm (f32) -> global average pool: (B, h, w, D) -> (B, D)."""
    return jnp.mean(self.image_norm(x), axis=(1, 2))


class MultiPretextDecoder(nnx.Module):
  """Decoder + one head per target; `__call__` returns {target name: prediction}.

  Args:
    in_dim: encoder output width (dims[-1]).
    targets: target names (pixel modalities and/or image targets of the registry).
    patch: encoder total stride (pixels per grid cell per side).
    width: decoder width (512 in FCMAE/MMEarth).
    depth: ConvNeXtV2 blocks in the decoder (1 in FCMAE/MMEarth).
    shared: one decoder body for all targets (MMEarth code) or one per target.
    dwconv_impl: the blocks' depthwise conv implementation (`convnextv2.Block`).
  """

  def __init__(self, in_dim: int, targets: Sequence[str], patch: int, *, width: int = 512,
               depth: int = 1, shared: bool = True, dwconv_impl: str = "conv", dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    targets = tuple(targets)
    if not targets:
      raise ValueError("MultiPretextDecoder needs at least one target")
    if len(set(targets)) != len(targets):
      raise ValueError(f"duplicate decoder targets in {targets}")
    self.targets = targets
    self.patch = patch
    self.shared = shared
    pixel = {t: is_pixel_target(t) for t in targets}
    body_kw = dict(dwconv_impl=dwconv_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if shared:
      self.bodies = nnx.Dict({"shared": _DecoderBody(
          in_dim, width, depth, with_image_norm=not all(pixel.values()), **body_kw)})
    else:
      self.bodies = nnx.Dict({
          t: _DecoderBody(in_dim, width, depth, with_image_norm=not pixel[t], **body_kw)
          for t in targets
      })
    heads = {}
    for t in targets:
      out = target_width(t) * (patch * patch if pixel[t] else 1)
      heads[t] = nnx.Linear(width, out, kernel_init=_INIT, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
    self.heads = nnx.Dict(heads)
    self.pixel_targets = tuple(t for t in targets if pixel[t])  # tuple: graphdef stays hashable

  def __call__(self, feats: jax.Array, mask: jax.Array | None, *,
               pixel_cells: jax.Array | None = None) -> dict[str, jax.Array]:
    """feats (B, h, w, in_dim); mask (B, h, w) bool (True = masked) or None.

    Returns float32 predictions: pixel targets (B, h, w, patch^2 * C), image targets (B, C).
    ``pixel_cells`` (B, K) raster cell indices: the pixel heads run on those cells only and
    return (B, K, 1, patch^2 * C) (`losses.at_cells`' K x 1 grid). The pixel losses count
    masked cells only, so heads on the masked cells give the same losses for ~40% less head
    work at 60% masking; the decoder blocks still see every cell.
    """
    outputs: dict[str, jax.Array] = {}
    decoded: dict[str, jax.Array] = {}  # body output per body
    picked: dict[str, jax.Array] = {}  # ... at pixel_cells
    for t in self.targets:
      key = "shared" if self.shared else t
      if key not in decoded:
        decoded[key] = self.bodies[key](feats, mask)
      x = decoded[key]
      if t in self.pixel_targets:
        if pixel_cells is not None:
          if key not in picked:
            picked[key] = losses.at_cells(x, pixel_cells)
          x = picked[key]
        outputs[t] = self.heads[t](x).astype(jnp.float32)
      else:
        outputs[t] = self.heads[t](self.bodies[key].pool(x)).astype(jnp.float32)
    return outputs
