"""ConvNeXtV2 backbone in Flax NNX with FCMAE dense masked encoding.

Layout is channels-last (NHWC) everywhere. Parameters are stored in ``param_dtype``
(float32); compute runs in ``dtype`` (bfloat16 allowed) while LayerNorm and GRN
statistics are always computed in float32 (GRN's sum of squares over H*W overflows
half precision, see objectives.md section 7).

Masking convention: a mask is 1 (True) where a position is MASKED (removed), 0 where it
is visible, as in FCMAE. The model mask lives on the final grid ``(B, H/stride,
W/stride)`` and is nearest-upsampled to every resolution. The dense emulation of the
sparse FCMAE encoder (objectives.md section 2.2) zeroes masked sites after the stem,
before and after every depthwise conv, computes GRN statistics over visible sites only
and masks each block output, so no visible output depends on a masked input pixel.

The sparse saving of FCMAE without sparse convolutions: given a static bound K on the
visible cells per sample (``max_visible_cells``; a ``random_patch_mask`` has exactly
``num_visible_cells``, a JEPA context is thinned to its capacity), each block gathers K cell
slots after its depthwise conv (the visible cells, then masked ones as padding for a sample
with fewer) and runs LN -> MLP -> GRN -> MLP on them only, with GRN's statistic over the
filled slots, then scatters them back; the block's re-masking zeroes the padding. The per-
position MLP is ~85% of a block's FLOPs and holds the 4x-wide activations: at 60% masking
the MP-MAE step's model FLOPs fall 31% (atto, 128 px: 8.67 -> 5.94 GFLOP/sample). The result
equals the dense emulation (the MLP is per position and GRN's statistics are over visible
positions in both); only the summation order of GRN's statistic differs.

Two stems:
* ``'original'``: 4x4 stride-4 conv + LN (total stride 32), weight-compatible with timm
  and the official ConvNeXt-V2 checkpoints (see ``geomeld_jax.models.convert``).
* ``'patch'``: the MMEarth small-tile stem: 3x3 stride-1 conv + LN + GELU at full
  resolution, then a depthwise conv with kernel = stride = patch_size/8 + LN, so the
  total stride is ``patch_size`` (128-px tile, patch 16 -> 8x8 final grid). MMEarth pads
  the depthwise conv instead of the 3x3 conv; both see the same input pixels per stem
  output (the taps line up), and here each depthwise window lies inside one mask cell.
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# depths, dims per variant (ConvNeXt-V2 models/convnextv2.py; timm convnextv2_*).
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}
STEMS = ("original", "patch")
LN_EPS = 1e-6
GRN_EPS = 1e-6
ORIGINAL_STEM_STRIDE = 4

# timm/FB init is trunc_normal_(std=.02) with ABSOLUTE bounds +-2, i.e. +-100 sigma: in
# effect an untruncated N(0, 0.02^2). jax's truncated_normal takes its bounds in units of
# the std, so bounds of +-100 reproduce timm exactly (the default +-2 sigma would shrink
# the std to 0.0176).
KERNEL_INIT = nnx.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
BIAS_INIT = nnx.initializers.zeros_init()
# The stem conv's bias alone starts random (timm: zeros; converted weights overwrite it). With
# zeros, a pixel whose 3x3 neighbourhood is all no-data (0) gives the stem LayerNorm an
# all-equal vector: zero variance, so its backward multiplies by 1/sqrt(eps) = 1000, and the
# zero residual stream repeats that in the norms after it. One tile with a no-data strip took
# the initial gradient norm from 42 to 2.4e9, and clipping then zeroed every other update.
STEM_BIAS_INIT = nnx.initializers.normal(stddev=0.02)


def variant_config(variant: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(depths, dims) of a named variant; ValueError naming the known ones otherwise."""
  try:
    return VARIANTS[variant]
  except KeyError:
    raise ValueError(
        f"unknown ConvNeXtV2 variant {variant!r}; known variants: {sorted(VARIANTS)}") from None


def _as_bool_mask(mask: jax.Array) -> jax.Array:
  """Bool view of a mask (non-zero = masked)."""
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def _zero_masked(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Zeroes masked sites. `where` (not x*(1-m)) keeps NaN/Inf at masked sites from leaking."""
  if mask is None:
    return x
  return jnp.where(mask, jnp.zeros((), x.dtype), x)


def _pad_one_pixel(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, H + 2, W + 2, C) with a zero border: the 3x3 stem conv's padding."""
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


DWCONV_IMPLS = ("conv", "taps")


def _sum_of_taps(x_padded: jax.Array, kernel: jax.Array, height: int,
                 width: int) -> jax.Array:
  """sum over (i, j) of x_padded[:, i:i+height, j:j+width] * kernel[i, j], in float32."""
  kh, kw, _ = kernel.shape
  kernel = kernel.astype(jnp.float32)
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = x_padded[:, i:i + height, j:j + width, :].astype(jnp.float32) * kernel[i, j]
      out = tap if out is None else out + tap
  return out


def _same_padding(x: jax.Array, kernel: jax.Array) -> jax.Array:
  kh, kw, _ = kernel.shape
  return jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))


@jax.custom_vjp
def depthwise_conv_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' depthwise convolution (no bias) as k*k shifted multiply-adds, float32 sums.

  x (B, H, W, C); kernel (k_h, k_w, C), odd sizes. The same sum as `lax.conv` with
  feature_group_count = C: one fused elementwise pass instead of a grouped convolution, which
  XLA's CPU backend runs slowly (on a 2-core CPU it cut the MP-MAE step's time by 63%).
  The hand-written VJP saves only (x, kernel): autodiff of the taps would keep k*k shifted
  slices. Its input gradient is the same sum over the cotangent with the kernel flipped; its
  kernel gradient is one reduction per tap, in a scan.
  """
  return _sum_of_taps(_same_padding(x, kernel), kernel, x.shape[1], x.shape[2]).astype(x.dtype)


def _taps_forward(x, kernel):
  return depthwise_conv_taps(x, kernel), (x, kernel)


def _taps_backward(residuals, grad):
  x, kernel = residuals
  kh, kw, _ = kernel.shape
  height, width = x.shape[1], x.shape[2]
  dx = _sum_of_taps(_same_padding(grad, kernel), kernel[::-1, ::-1], height, width)
  x_padded = _same_padding(x, kernel)
  g32 = grad.astype(jnp.float32)

  def tap_gradient(_, tap):  # a scan, not k*k unrolled reductions, which XLA's CPU backend
    i, j = tap // kw, tap % kw  # ran 3x slower holding all k*k products (22x the memory)
    shifted = jax.lax.dynamic_slice(x_padded, (0, i, j, 0), x.shape)
    return None, jnp.sum(shifted.astype(jnp.float32) * g32, axis=(0, 1, 2))

  _, dkernel = jax.lax.scan(tap_gradient, None, jnp.arange(kh * kw))
  return dx.astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


depthwise_conv_taps.defvjp(_taps_forward, _taps_backward)


def upsample_mask(mask: jax.Array, factor: int) -> jax.Array:
  """Nearest-neighbour upsampling of a (B, h, w) or (B, h, w, 1) mask by an integer factor."""
  if factor < 1 or int(factor) != factor:
    raise ValueError(f"upsample factor must be a positive integer, got {factor}")
  mask = jnp.asarray(mask)
  if mask.ndim not in (3, 4):
    raise ValueError(f"mask must be (B, h, w) or (B, h, w, 1), got shape {mask.shape}")
  if factor == 1:
    return mask
  return jnp.repeat(jnp.repeat(mask, factor, axis=1), factor, axis=2)


def random_patch_mask(key: jax.Array, batch: int, grid_h: int, grid_w: int,
                      mask_ratio: float = 0.6) -> jax.Array:
  """FCMAE random mask: bool (batch, grid_h, grid_w), True = masked.

  Each sample masks exactly ``L - int(L * (1 - mask_ratio))`` of its ``L = grid_h*grid_w``
  cells, chosen independently per sample by ranking uniform noise (FCMAE's
  ``gen_random_mask``). ``batch``, the grid and ``mask_ratio`` must be static under jit.
  """
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
  num_cells = grid_h * grid_w
  len_keep = num_visible_cells(grid_h, grid_w, mask_ratio)
  noise = jax.random.uniform(key, (batch, num_cells))
  # rank[i] = position of cell i in the sorted noise; the len_keep lowest are kept.
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return (rank >= len_keep).reshape(batch, grid_h, grid_w)


def num_visible_cells(grid_h: int, grid_w: int, mask_ratio: float) -> int:
  """Visible cells per sample of a `random_patch_mask` (static)."""
  return int(grid_h * grid_w * (1 - mask_ratio))


def visible_cell_indices(mask: jax.Array,
                         max_visible_cells: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Cell slots for the gathered MLP of a (B, h, w) mask (True = masked).

  Returns (cells (B, K) raster indices: the visible cells in raster order, then masked
  cells as padding; filled (B, K) bool: the slot holds a visible cell; fits (B,) bool: the
  sample has at most K = max_visible_cells visible cells, so none was left out).
  """
  flat = mask.reshape(mask.shape[0], -1)
  order = jnp.argsort(flat, axis=1, stable=True)  # False (visible) first, in raster order
  count = jnp.sum(~flat, axis=1)
  filled = jnp.arange(max_visible_cells)[None, :] < count[:, None]
  return order[:, :max_visible_cells], filled, count <= max_visible_cells


def gather_cells(x: jax.Array, cells: jax.Array, cell_size: int) -> jax.Array:
  """The pixels of the given cells: x (B, H, W, C), cells (B, K) -> (B, K*cell_size**2, C)."""
  b, height, width, c = x.shape
  f = cell_size
  by_cell = x.reshape(b, height // f, f, width // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  by_cell = by_cell.reshape(b, (height // f) * (width // f), f * f, c)
  # vmap, not x[arange(B)[:, None], cells]: a per-sample gather carries batching dims, so
  # the partitioner keeps it local to each batch shard (advanced indexing over the batch
  # all-gathers the activations of every device).
  picked = jax.vmap(lambda xs, cs: xs[cs])(by_cell, cells)  # (B, K, f*f, C)
  return picked.reshape(b, -1, c)


def scatter_cells(tokens: jax.Array, cells: jax.Array, cell_size: int, height: int,
                  width: int) -> jax.Array:
  """Inverse of `gather_cells`: a (B, H, W, C) map, zero outside the given cells."""
  b, _, c = tokens.shape
  f = cell_size
  k = cells.shape[1]
  zeros = jnp.zeros(((height // f) * (width // f), f * f, c), tokens.dtype)
  by_cell = jax.vmap(lambda ts, cs: zeros.at[cs].set(ts, unique_indices=True))(
      tokens.reshape(b, k, f * f, c), cells)
  by_cell = by_cell.reshape(b, height // f, width // f, f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return by_cell.reshape(b, height, width, c)


def param_count(module: nnx.Module) -> int:
  """Number of scalar parameters (nnx.Param) of a module; works on abstract (eval_shape) models."""
  leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
  return int(sum(math.prod(leaf.shape) for leaf in leaves))


class LayerNorm(nnx.LayerNorm):
  """Channels-last LayerNorm with ConvNeXt's eps 1e-6 and two-pass float32 statistics."""

  def __init__(self, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype,
                     use_fast_variance=False, rngs=rngs)


class GRN(nnx.Module):
  """Global Response Normalization (ConvNeXt-V2), channels-last.

  Gx = sqrt(sum_{h,w} x^2 + 1e-6) per sample and channel (eps inside the sqrt keeps the
  gradient finite for an all-zero channel), Nx = Gx / (mean_c Gx + 1e-6),
  y = gamma * (x * Nx) + beta + x. Statistics are in float32. gamma and beta start at
  zero, so GRN starts as the identity.
  """

  def __init__(self, dim: int, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    """dtype: output dtype (None: the input's); rngs is unused (zero init)."""
    del rngs
    self.dtype = dtype
    self.gamma = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.beta = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x (B, H, W, C) or gathered tokens (B, N, C); mask (B, H, W, 1) bool/float, 1 = MASKED
    (the FCMAE convention).

    Gx sums over every axis between batch and channels; with a mask, over the visible
    (mask == 0) positions only.
    """
    x32 = x.astype(jnp.float32)
    visible = x32 if mask is None else _zero_masked(x32, _as_bool_mask(mask))
    positions = tuple(range(1, x.ndim - 1))
    gx = jnp.sqrt(jnp.sum(jnp.square(visible), axis=positions, keepdims=True) + GRN_EPS)
    nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + GRN_EPS)
    gamma = self.gamma[...].astype(jnp.float32)
    beta = self.beta[...].astype(jnp.float32)
    return (gamma * (x32 * nx) + beta + x32).astype(self.dtype or x.dtype)


class Block(nnx.Module):
  """ConvNeXtV2 block: dwconv 7x7 -> LN -> Linear 4x -> GELU -> GRN -> Linear -> drop path."""

  def __init__(self, dim: int, *, drop_path: float = 0.0, dwconv_impl: str = "conv",
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not 0.0 <= drop_path < 1.0:
      raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
    if dwconv_impl not in DWCONV_IMPLS:
      raise ValueError(f"unknown dwconv_impl {dwconv_impl!r}; known: {DWCONV_IMPLS}")
    self.dwconv_impl = dwconv_impl
    common = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=KERNEL_INIT,
                  bias_init=BIAS_INIT, rngs=rngs)
    self.dwconv = nnx.Conv(dim, dim, (7, 7), padding=((3, 3), (3, 3)),
                           feature_group_count=dim, **common)
    self.norm = LayerNorm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pwconv1 = nnx.Linear(dim, 4 * dim, **common)
    self.grn = GRN(4 * dim, dtype=dtype, param_dtype=param_dtype)
    self.pwconv2 = nnx.Linear(4 * dim, dim, **common)
    # Per-sample stochastic depth: one Bernoulli per sample, scaled by 1/keep (timm DropPath).
    self.drop_path = (nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs)
                      if drop_path > 0.0 else None)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               visible: tuple[jax.Array, int] | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """x (B, H, W, C); mask (B, H, W, 1) float/bool, 1 = masked; None = dense block.

    ``visible``: (cells (B, K), filled (B, K) from `visible_cell_indices`, cell size in
    pixels at this resolution): the MLP runs on those K cell slots only (same result, less
    work); the filled slots must be every cell the mask leaves visible. ``rngs`` (optional)
    overrides the drop-path random stream given at construction.
    """
    mask = None if mask is None else _as_bool_mask(mask)
    x = _zero_masked(x, mask)  # LN and Linear biases make masked sites non-zero upstream
    with jax.named_scope("dwconv"):  # scopes name the ops in profiles (geomeld_jax.bench)
      y = self._depthwise(x)
    if visible is None:
      with jax.named_scope("mlp"):
        y = self._mlp(_zero_masked(y, mask), mask)
    else:
      cells, filled, cell_size = visible
      with jax.named_scope("gather"):
        tokens = gather_cells(y, cells, cell_size)
        padding = jnp.repeat(~filled, cell_size * cell_size, axis=1)[..., None]
      with jax.named_scope("mlp"):
        tokens = self._mlp(tokens, padding)  # padding slots land on masked sites: re-masked
      with jax.named_scope("scatter"):
        y = scatter_cells(tokens, cells, cell_size, x.shape[1], x.shape[2])
    if self.drop_path is not None:
      y = self.drop_path(y, deterministic=deterministic, rngs=rngs)
    return _zero_masked(x + y, mask)

  def _depthwise(self, x: jax.Array) -> jax.Array:
    """The 7x7 depthwise conv, as a grouped convolution or as its sum of taps (same params)."""
    if self.dwconv_impl == "conv":
      return self.dwconv(x)
    kernel = self.dwconv.kernel[...][:, :, 0, :].astype(x.dtype)  # (7, 7, 1, C) -> (7, 7, C)
    return depthwise_conv_taps(x, kernel) + self.dwconv.bias[...].astype(x.dtype)

  def _mlp(self, y: jax.Array, mask: jax.Array | None) -> jax.Array:
    """LN -> Linear 4x -> GELU -> GRN -> Linear, per position (maps or gathered tokens)."""
    y = self.norm(y)
    y = jax.nn.gelu(self.pwconv1(y), approximate=False)
    y = self.grn(y, mask)
    return self.pwconv2(y)


class ConvNeXtV2(nnx.Module):
  """ConvNeXtV2 encoder (no head) with optional FCMAE masking.

  Args:
    variant: one of VARIANTS.
    in_chans: input channels (12 for Sentinel-2).
    stem: 'patch' (MMEarth small-tile stem, total stride = patch_size) or 'original'
      (4x4 stride-4 stem, total stride 32, timm/official weight-compatible; patch_size
      is not used).
    patch_size: total stride of the 'patch' stem; a multiple of 8.
    drop_path_rate: stochastic depth, linearly increasing from 0 over all blocks.
    dwconv_impl: how the blocks compute their 7x7 depthwise conv: 'conv' (a grouped
      convolution) or 'taps' (`depthwise_conv_taps`); the same parameters and result.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.

  Attributes: ``variant``, ``stem``, ``depths``, ``dims``, ``stride`` (total stride),
  ``in_chans``.
  """

  def __init__(self, variant: str, in_chans: int, *, stem: str = "patch", patch_size: int = 16,
               drop_path_rate: float = 0.0, dwconv_impl: str = "conv", dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    depths, dims = variant_config(variant)
    if stem not in STEMS:
      raise ValueError(f"unknown stem {stem!r}; known stems: {STEMS}")
    if in_chans < 1:
      raise ValueError(f"in_chans must be positive, got {in_chans}")
    if stem == "patch" and (patch_size < 8 or patch_size % 8):
      raise ValueError(
          f"patch_size must be a positive multiple of 8 for stem='patch' (three 2x "
          f"downsamplings after a patch_size/8 stem), got {patch_size}")
    if not 0.0 <= drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    self.variant = variant
    self.stem = stem
    self.depths = depths
    self.dims = dims
    self.in_chans = in_chans
    self.dtype = dtype
    downsampling = 2 ** (len(depths) - 1)  # three 2x downsamplers between the four stages
    stem_patch = ORIGINAL_STEM_STRIDE if stem == "original" else patch_size // downsampling
    self.stride = stem_patch * downsampling
    common = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=KERNEL_INIT,
                  bias_init=BIAS_INIT, rngs=rngs)
    norm_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    if stem == "original":
      self.stem_conv = nnx.Conv(in_chans, dims[0], (stem_patch, stem_patch),
                                strides=(stem_patch, stem_patch), padding="VALID",
                                **{**common, "bias_init": STEM_BIAS_INIT})
      self.stem_norm = LayerNorm(dims[0], **norm_kw)
      self.stem_patch_conv = None
      self.stem_patch_norm = None
    else:
      # VALID: `_patch_stem` takes inputs with the one-pixel zero border already added.
      self.stem_conv = nnx.Conv(in_chans, dims[0], (3, 3), padding="VALID",
                                **{**common, "bias_init": STEM_BIAS_INIT})
      self.stem_norm = LayerNorm(dims[0], **norm_kw)
      self.stem_patch_conv = nnx.Conv(dims[0], dims[0], (stem_patch, stem_patch),
                                      strides=(stem_patch, stem_patch), padding="VALID",
                                      feature_group_count=dims[0], **common)
      self.stem_patch_norm = LayerNorm(dims[0], **norm_kw)

    self.downsample_norms = nnx.List(
        [LayerNorm(dims[i], **norm_kw) for i in range(len(dims) - 1)])
    self.downsample_convs = nnx.List([
        nnx.Conv(dims[i], dims[i + 1], (2, 2), strides=(2, 2), padding="VALID", **common)
        for i in range(len(dims) - 1)
    ])
    rates = np.linspace(0.0, drop_path_rate, sum(depths))
    stages = []
    for i, (depth, dim) in enumerate(zip(depths, dims)):
      first = sum(depths[:i])
      stages.append(nnx.List([
          Block(dim, drop_path=float(rates[first + j]), dwconv_impl=dwconv_impl, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs) for j in range(depth)
      ]))
    self.stages = nnx.List(stages)

  def grid_shape(self, height: int, width: int) -> tuple[int, int]:
    """Final-grid (mask) shape for an input of the given size."""
    return height // self.stride, width // self.stride

  def _check_inputs(self, x: jax.Array, mask: jax.Array | None) -> None:
    if x.ndim != 4:
      raise ValueError(f"x must be (B, H, W, C) channels-last, got shape {x.shape}")
    batch, height, width, chans = x.shape
    if chans != self.in_chans:
      raise ValueError(
          f"x has {chans} channels (last axis, channels-last), model expects in_chans="
          f"{self.in_chans}; got shape {x.shape}")
    if height % self.stride or width % self.stride:
      raise ValueError(
          f"input H and W must be divisible by the total stride {self.stride}, got "
          f"{height}x{width}")
    if mask is not None:
      expected = (batch, height // self.stride, width // self.stride)
      if tuple(jnp.shape(mask)) != expected:
        raise ValueError(
            f"mask must be (B, H/stride, W/stride) = {expected} on the final grid, got "
            f"shape {tuple(jnp.shape(mask))}")

  def _stem_patch_depthwise(self, x: jax.Array) -> jax.Array:
    """`stem_patch_conv` (depthwise, kernel = stride = p) as a windowed multiply-and-sum.

    The same sum over each p x p window, as one fused elementwise reduction: cuDNN runs the
    depthwise convolution and above all its gradients slowly at full resolution (on an H100
    the stem's convolutions took 30% of the MP-MAE step).
    """
    conv = self.stem_patch_conv
    p = conv.kernel_size[0]
    b, height, width, chans = x.shape
    kernel = conv.kernel[...].astype(self.dtype)[:, :, 0, :]  # (p, p, 1, C) grouped -> (p, p, C)
    windows = x.reshape(b, height // p, p, width // p, p, chans)
    y = jnp.sum(windows * kernel[None, None, :, None, :, :], axis=(2, 4))
    return y + conv.bias[...].astype(self.dtype)

  def _patch_stem(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The 'patch' stem on x (N, h + 2, w + 2, C) that carries the 3x3 conv's one-pixel zero
    border: 3x3 conv + LN + GELU, masked pixels zeroed (`mask` at full resolution, or None),
    then the depthwise patch conv + LN -> (N, h/p, w/p, D)."""
    y = jax.nn.gelu(self.stem_norm(self.stem_conv(x)), approximate=False)
    y = _zero_masked(y, mask)  # sparse semantics at full resolution
    return self.stem_patch_norm(self._stem_patch_depthwise(y))

  def _patch_stem_on_cells(self, x: jax.Array, cells: jax.Array) -> jax.Array:
    """The 'patch' stem computed on the given cells only (the dense stem at full resolution
    is the costliest part of a masked pass in memory traffic: 30% of the MP-MAE step on an
    H100). x (B, H, W, C) is already zero in masked cells; cells (B, K) from
    `visible_cell_indices`. Each cell is cut out with the 3x3 conv's one-pixel halo, so the
    result equals the dense stem on every cell of `cells`; the stage-0 map it returns is
    zero elsewhere (padding slots hold masked cells, which the blocks' re-masking erases).
    """
    b, height, width, chans = x.shape
    f = self.stride  # a cell's side at full resolution
    k = cells.shape[1]
    grid_w = width // f
    padded = _pad_one_pixel(x)
    span = jnp.arange(f + 2)
    rows = (cells // grid_w)[..., None] * f + span  # (B, K, f + 2), padded coordinates
    cols = (cells % grid_w)[..., None] * f + span
    with jax.named_scope("gather"):  # per sample (see gather_cells), no gradient: x is data
      patches = jax.vmap(lambda xs, r, c: xs[r[:, :, None], c[:, None, :]])(padded, rows, cols)
    y = self._patch_stem(patches.reshape(b * k, f + 2, f + 2, chans), None)  # (B*K, s, s, D)
    side = y.shape[1]
    with jax.named_scope("scatter"):
      return scatter_cells(y.reshape(b, k * side * side, -1), cells, side,
                           height * side // f, width * side // f)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               max_visible_cells: int | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """Encodes x (B, H, W, in_chans); mask (B, H/stride, W/stride), 1 = masked, or None.

    Returns (final map (B, H/stride, W/stride, dims[-1]), [the four stage outputs]).
    With a mask, masked sites are zero in every returned map. ``max_visible_cells``
    (static): a bound on the visible cells of every sample of ``mask`` (a
    `random_patch_mask`'s `num_visible_cells`, a thinned JEPA context's capacity); the
    'patch' stem and the blocks' MLPs then run on that many cell slots only. A sample with more visible cells gets
    NaN outputs (loud, caught by the train loop's NaN stop) rather than a silently wrong
    encoding. ``rngs`` (optional) drives drop path when ``deterministic`` is False: an
    ``nnx.Rngs`` or a key (folded with the block index, so blocks draw independently);
    without it the streams given at construction are used.
    """
    self._check_inputs(x, mask)
    grid_mask = None if mask is None else _as_bool_mask(mask)
    if max_visible_cells is not None:
      if grid_mask is None:
        raise ValueError("max_visible_cells needs a mask")
      num_cells = grid_mask.shape[1] * grid_mask.shape[2]
      if not 0 < max_visible_cells <= num_cells:
        raise ValueError(
            f"max_visible_cells must be in [1, {num_cells}], got {max_visible_cells}")
      cells, filled, fits = visible_cell_indices(grid_mask, max_visible_cells)

    def mask_at(factor: int) -> jax.Array | None:
      return None if grid_mask is None else upsample_mask(grid_mask, factor)[..., None]

    num_stages = len(self.depths)
    x = _zero_masked(jnp.asarray(x, self.dtype), mask_at(self.stride))
    with jax.named_scope("stem"):
      if self.stem == "original":
        x = self.stem_norm(self.stem_conv(x))
      elif max_visible_cells is not None:
        x = self._patch_stem_on_cells(x, cells)
      else:
        x = self._patch_stem(_pad_one_pixel(x), mask_at(self.stride))
    stage_outputs = []
    block_index = 0
    for i in range(num_stages):
      cell_size = 2 ** (num_stages - 1 - i)
      stage_mask = mask_at(cell_size)
      visible = None if max_visible_cells is None else (cells, filled, cell_size)
      if i > 0:
        # A 2x2 stride-2 window never straddles a mask cell (cells are >= 2 px wide
        # here), so the downsampler needs no extra masking; the blocks re-mask.
        with jax.named_scope(f"downsample{i}"):
          x = self.downsample_convs[i - 1](self.downsample_norms[i - 1](x))
      x = _zero_masked(x, stage_mask)
      for j, block in enumerate(self.stages[i]):
        block_rngs = rngs
        if isinstance(rngs, jax.Array):  # one raw key would give every block the same draw
          block_rngs = jax.random.fold_in(rngs, block_index)
        with jax.named_scope(f"stage{i}_block{j}"):
          x = block(x, stage_mask, visible=visible, deterministic=deterministic,
                    rngs=block_rngs)
        block_index += 1
      stage_outputs.append(x)
    if max_visible_cells is not None:
      poison = ~fits[:, None, None, None]
      stage_outputs = [jnp.where(poison, jnp.array(jnp.nan, o.dtype), o) for o in stage_outputs]
      x = stage_outputs[-1]
    return x, stage_outputs

