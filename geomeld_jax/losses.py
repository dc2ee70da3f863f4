"""Pure loss functions of GeoMeld-FM (MP-MAE, JEPA, ITC) and their combination.

Every function is a pure function of arrays, computes in float32 whatever the input dtype,
and is written for the GLOBAL batch: under `jax.jit` with a batch sharded over a mesh, XLA
inserts the collectives, so the value and gradient equal the single-device ones.

Masked means return ``(loss, count)``. ``loss = sum / max(count, 1)`` where ``count`` is the
number of valid elements over the whole batch (never the batch size), so a sample missing a
modality contributes nothing and does not bias the mean. ``count == 0`` means the term was
absent from the batch; `combine_losses` then drops the whole term (its weight and, under
uncertainty weighting, its log-variance regulariser), as MMEarth does.

Patch layout: `patchify` orders the values of a patch as (row, col, channel), the FCMAE
convention (objectives.md §2.4), for any channel count.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp

F32 = jnp.float32
# Finite stand-in for -inf in masked logits: a fully masked row stays finite (no NaN in the
# forward or the gradient), and exp(-1e9 - max) underflows to exactly 0 in float32.
_MASKED_LOGIT = -1e9

LOGIT_SCALE_INIT = math.log(1.0 / 0.07)  # CLIP temperature init (open_clip)
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamp "as in the original paper"
SIGLIP_SCALE_INIT = math.log(10.0)  # SigLIP t' init (big_vision two_towers)
SIGLIP_BIAS_INIT = -10.0  # SigLIP b init, tuned for ~20k batches (objectives.md §5.3)


def _masked_mean(values: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum over weight==True of values) / count; `where` so NaN at excluded spots cannot leak."""
  weight = jnp.broadcast_to(weight, values.shape)
  total = jnp.sum(jnp.where(weight, values, 0.0))
  count = jnp.sum(weight.astype(F32))
  return total / jnp.maximum(count, 1.0), count


# ----------------------------------------------------------------------------------------
# Patches.
# ----------------------------------------------------------------------------------------


def _reshape_keep_batch(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Reshape that keeps the batch axis' sharding (Explicit meshes need it spelled out)."""
  spec = jax.typeof(x).sharding.spec
  if spec and spec[0] is not None and all(s is None for s in spec[1:]):
    out = jax.sharding.PartitionSpec(spec[0], *([None] * (len(shape) - 1)))
    return jnp.reshape(x, shape, out_sharding=out)
  return jnp.reshape(x, shape)


def patchify(x: jax.Array, patch: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/p, W/p, p*p*C), each patch ordered (row, col, channel)."""
  b, h, w, c = x.shape
  if h % patch or w % patch:
    raise ValueError(f"patchify: image {h}x{w} is not divisible by patch {patch}")
  gh, gw = h // patch, w // patch
  x = _reshape_keep_batch(x, (b, gh, patch, gw, patch, c)).transpose(0, 1, 3, 2, 4, 5)
  return _reshape_keep_batch(x, (b, gh, gw, patch * patch * c))


def unpatchify(patches: jax.Array, patch: int, channels: int) -> jax.Array:
  """Inverse of `patchify`: (B, gh, gw, p*p*C) -> (B, gh*p, gw*p, C)."""
  b, gh, gw, d = patches.shape
  if d != patch * patch * channels:
    raise ValueError(f"unpatchify: last axis {d} != patch^2 * channels = {patch}^2 * {channels}")
  x = _reshape_keep_batch(patches, (b, gh, gw, patch, patch, channels))
  return _reshape_keep_batch(x.transpose(0, 1, 3, 2, 4, 5), (b, gh * patch, gw * patch, channels))


def at_cells(grid: jax.Array, cells: jax.Array) -> jax.Array:
  """Values of a (B, gh, gw, ...) grid at (B, K) raster cell indices, as a (B, K, 1, ...) grid.

  A K x 1 grid keeps every grid-shaped loss below working on just those cells (the MP-MAE
  heads predict the masked cells only; see `MultiPretextDecoder`).
  """
  b, gh, gw = grid.shape[:3]
  flat = _reshape_keep_batch(grid, (b, gh * gw, *grid.shape[3:]))
  picked = jax.vmap(lambda g, c: g[c])(flat, cells)  # per sample: stays on its batch shard
  return _reshape_keep_batch(picked, (b, cells.shape[1], 1, *grid.shape[3:]))


# ----------------------------------------------------------------------------------------
# Pixel-level MP-MAE losses.
# ----------------------------------------------------------------------------------------


def normalize_patches(target: jax.Array, valid: jax.Array,
                      eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """Per-patch normalisation over the patch's VALID values (FCMAE norm_pix_loss).

  Args:
    target: (..., n) patch values (invalid entries may hold anything, NaN included).
    valid: (..., n) bool.
    eps: added to the variance, as in FCMAE.

  Returns:
    (normalised target, 0 at invalid entries; per-patch bool "has >= 2 valid values").
    The variance is unbiased (ddof=1) like torch.var; a patch with fewer than 2 valid
    values has no defined variance and is reported as unusable.
  """
  t = jnp.where(valid, target.astype(F32), 0.0)
  n = jnp.sum(valid, axis=-1, keepdims=True).astype(F32)
  mean = jnp.sum(t, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
  sq = jnp.where(valid, jnp.square(t - mean), 0.0)
  var = jnp.sum(sq, axis=-1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
  normed = jnp.where(valid, (t - mean) * jax.lax.rsqrt(var + eps), 0.0)
  return normed, n[..., 0] >= 2.0


def reconstruction_loss(pred: jax.Array, target: jax.Array, valid: jax.Array, mask: jax.Array,
                        patch: int, *, norm_pix: bool = False, cells: jax.Array | None = None,
                        eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """MSE on masked patches over valid pixels only.

  Args:
    pred: (B, gh, gw, p*p*C) head output, (row, col, channel) order; with `cells`, the
      (B, K, 1, p*p*C) predictions at those cells.
    target: (B, H, W, C) normalised modality (invalid pixels may hold anything).
    valid: (B, H, W, C) bool.
    mask: (B, gh, gw) bool, True = masked patch (only these count).
    patch: encoder stride p.
    norm_pix: normalise each patch's target over its valid values (S2 only, FCMAE); a patch
      with fewer than 2 valid values is then excluded.
    cells: (B, K) raster indices of the cells `pred` holds (None: every cell).
    eps: variance eps of the per-patch normalisation.

  Returns:
    (mean squared error over counted elements, number of counted elements).
  """
  tp = patchify(target.astype(F32), patch)
  vp = patchify(valid, patch)
  if cells is not None:
    tp, vp, mask = at_cells(tp, cells), at_cells(vp, cells), at_cells(mask, cells)
  if norm_pix:
    tp, usable = normalize_patches(tp, vp, eps)
    weight = vp & (mask & usable)[..., None]
  else:
    tp = jnp.where(vp, tp, 0.0)
    weight = vp & mask[..., None]
  return _masked_mean(jnp.square(pred.astype(F32) - tp), weight)


def pixel_ce_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, patch: int, *,
                  cells: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-pixel cross-entropy on masked patches; labels outside [0, K) (e.g. -1) are ignored.

  Args:
    logits: (B, gh, gw, p*p*K), (row, col, class) order; with `cells`, (B, K', 1, p*p*K) at
      those cells.
    labels: (B, H, W) int, -1 = no data.
    mask: (B, gh, gw) bool, True = masked patch.
    patch: encoder stride p.
    cells: (B, K') raster indices of the cells `logits` holds (None: every cell).

  Returns:
    (mean NLL over counted pixels, number of counted pixels).
  """
  b, gh, gw, d = logits.shape
  num_classes = d // (patch * patch)
  lp = patchify(labels[..., None], patch)  # (B, gh, gw, p*p)
  if cells is not None:
    lp, mask = at_cells(lp, cells), at_cells(mask, cells)
  logp = jax.nn.log_softmax(
      _reshape_keep_batch(logits.astype(F32), (b, gh, gw, patch * patch, num_classes)))
  weight = (lp >= 0) & (lp < num_classes) & mask[..., None]
  # one_hot + sum compiles faster than integer gather on CPU (environment.md).
  nll = -jnp.sum(jax.nn.one_hot(jnp.where(weight, lp, 0), num_classes, dtype=F32) * logp, -1)
  return _masked_mean(nll, weight)


# ----------------------------------------------------------------------------------------
# Image-level losses.
# ----------------------------------------------------------------------------------------


def image_mse_loss(pred: jax.Array, target: jax.Array,
                   valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """MSE over (B, D) where valid (B,) is True; count = valid samples x D."""
  weight = jnp.broadcast_to(valid[:, None], target.shape)
  t = jnp.where(weight, target.astype(F32), 0.0)
  return _masked_mean(jnp.square(pred.astype(F32) - t), weight)


def image_ce_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy over (B, K) logits; labels (B,) outside [0, K) (e.g. -1) are ignored."""
  num_classes = logits.shape[-1]
  weight = (labels >= 0) & (labels < num_classes)
  logp = jax.nn.log_softmax(logits.astype(F32))
  nll = -jnp.sum(jax.nn.one_hot(jnp.where(weight, labels, 0), num_classes, dtype=F32) * logp, -1)
  return _masked_mean(nll, weight)


# ----------------------------------------------------------------------------------------
# JEPA.
# ----------------------------------------------------------------------------------------


def layer_norm_no_affine(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """I-JEPA target normalisation: non-affine LayerNorm over features (torch default eps)."""
  x = x.astype(F32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def jepa_loss(pred: jax.Array, teacher: jax.Array, target_mask: jax.Array, *,
              kind: str = "smooth_l1", beta: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """JEPA regression of layer-normed teacher features at target positions only.

  Args:
    pred: (B, h, w, D) predictor output.
    teacher: (B, h, w, D) teacher features (gradient is stopped here as well).
    target_mask: (B, h, w) bool, True = target position.
    kind: 'smooth_l1' (I-JEPA code, beta 1) or 'l2' (the I-JEPA paper's statement).
    beta: smooth-L1 transition point.

  Returns:
    (mean over target positions of the per-position loss averaged over D, #positions).
  """
  target = layer_norm_no_affine(jax.lax.stop_gradient(teacher))
  diff = pred.astype(F32) - target
  if kind == "smooth_l1":
    ad = jnp.abs(diff)
    elem = jnp.where(ad < beta, 0.5 * jnp.square(diff) / beta, ad - 0.5 * beta)
  elif kind == "l2":
    elem = jnp.square(diff)
  else:
    raise ValueError(f"jepa loss kind must be 'smooth_l1' or 'l2', got {kind!r}")
  return _masked_mean(jnp.mean(elem, axis=-1), target_mask)


# ----------------------------------------------------------------------------------------
# Image-text contrastive.
# ----------------------------------------------------------------------------------------


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """x / sqrt(|x|^2 + eps) in float32 (eps inside: finite gradient at x = 0)."""
  x = x.astype(F32)
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def gather_batch(x: jax.Array) -> jax.Array:
  """All-gathers x over an EXPLICITLY sharded mesh axis (a no-op otherwise).

  Under `jit` with Auto sharding (or none) XLA inserts the collectives itself; under
  Explicit sharding (jax.make_mesh's default in jax 0.10) a batch-sharded x @ y.T would be
  sharded on both axes, which jax rejects, so the text side is gathered first (the
  all_gather of open_clip's global loss; its transpose reduce-scatters the gradient).
  """
  spec = jax.typeof(x).sharding.spec
  if any(axis is not None for axis in spec):
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())
  return x


def similarity(img: jax.Array, txt: jax.Array) -> jax.Array:
  """(B, E) x (B, E) -> (B, B) float32 img @ txt.T over the global batch (any sharding)."""
  txt = gather_batch(txt)
  # HIGHEST: B x B x E is tiny, and TF32 would perturb the logits by ~1e-3 on GPUs.
  return jnp.einsum("ie,te->it", img.astype(F32), txt.astype(F32),
                    precision=jax.lax.Precision.HIGHEST)


def clip_loss(img: jax.Array, txt: jax.Array, logit_scale: jax.Array,
              valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Symmetric InfoNCE over the global batch (open_clip ClipLoss).

  Args:
    img: (B, E) L2-normalised image embeddings.
    txt: (B, E) L2-normalised text embeddings (row i pairs with image i).
    logit_scale: scalar log-temperature; logits are exp(logit_scale) * img @ txt.T.
    valid: (B,) bool, samples with a caption. Rows and columns of other samples are removed
      from the softmax (so they are neither positives nor negatives).

  Returns:
    (0.5 * (mean_i CE_i2t + mean_t CE_t2i) over valid samples, number of valid samples, or 0
    when fewer than 2 samples have a caption: with no negative the loss is identically 0,
    so the term is reported absent and `combine_losses` skips it).
  """
  b = img.shape[0]
  valid = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
  logits = jnp.exp(logit_scale.astype(F32)) * similarity(img, txt)
  pair = valid[:, None] & gather_batch(valid)[None, :]
  logits = jnp.where(pair, logits, _MASKED_LOGIT)
  # The positives, read off the same matrix so that lse - diag is exact (a single caption
  # gives exactly 0). Not jnp.diagonal: that is a gather Explicit sharding rejects.
  diag = jnp.sum(jnp.where(jnp.eye(b, dtype=bool), logits, 0.0), axis=1)
  ce_i2t = jax.nn.logsumexp(logits, axis=1) - diag
  ce_t2i = jax.nn.logsumexp(logits, axis=0) - diag
  loss_i2t, count = _masked_mean(ce_i2t, valid)
  loss_t2i, _ = _masked_mean(ce_t2i, valid)
  return 0.5 * (loss_i2t + loss_t2i), jnp.where(count >= 2, count, 0.0)


def siglip_loss(img: jax.Array, txt: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array,
                valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """SigLIP pairwise sigmoid loss (big_vision): -sum log_sigmoid(z * logits) / #valid rows.

  Args:
    img, txt: (B, E) L2-normalised embeddings.
    logit_scale: scalar t'; logits = exp(t') * img @ txt.T + logit_bias.
    logit_bias: scalar b.
    valid: (B,) bool; pairs touching a sample without a caption are dropped.

  Returns:
    (loss summed over valid pairs / number of valid rows, number of valid rows).
  """
  b = img.shape[0]
  valid = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
  logits = jnp.exp(logit_scale.astype(F32)) * similarity(img, txt) + logit_bias.astype(F32)
  z = 2.0 * jnp.eye(b, dtype=F32) - 1.0
  nll = -jax.nn.log_sigmoid(z * logits)
  pair = valid[:, None] & gather_batch(valid)[None, :]
  count = jnp.sum(valid.astype(F32))
  return jnp.sum(jnp.where(pair, nll, 0.0)) / jnp.maximum(count, 1.0), count


def siglip_bias_for_batch(batch_size: int) -> float:
  """b = log(p / (1 - p)) with p = 1/B: starts SigLIP at its loss minimum (open_clip #650)."""
  if batch_size < 2:
    raise ValueError(f"SigLIP needs a batch of at least 2, got {batch_size}")
  return math.log(1.0 / (batch_size - 1))


# ----------------------------------------------------------------------------------------
# Combination.
# ----------------------------------------------------------------------------------------


def combine_losses(
    terms: Mapping[str, tuple[jax.Array, jax.Array]],
    *,
    mode: str,
    fixed_weights: Mapping[str, float] | None = None,
    log_vars: jax.Array | None = None,
    log_var_range: tuple[float, float] = (-4.0, 4.0),
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Combines named ``(loss, count)`` terms into the total loss.

  Args:
    terms: name -> (loss, count); count == 0 marks a term absent from this batch, which then
      contributes nothing at all.
    mode: 'fixed' (total = sum_i w_i L_i, w_i from `fixed_weights`, default 1) or
      'uncertainty' (Kendall et al., as MMEarth: total = sum_i exp(-s_i) L_i + s_i).
    fixed_weights: name -> weight for 'fixed'.
    log_vars: (len(terms),) learned s_i in the order of `terms`, for 'uncertainty'.
    log_var_range: s_i is clipped to this range in the forward pass, bounding every weight
      exp(-s_i) to [e^-4, e^4] by default: with ~12 terms plus JEPA and ITC an unbounded s_i
      can silence a small task or blow one up (mmearth_peer.md §7). The train step should
      also clamp the parameter after each update (`geomeld.clamp_params`) so that the clip's
      zero gradient cannot strand it outside the range.

  Returns:
    (total loss, name -> effective weight exp(-s_i) or w_i).
  """
  names = list(terms)
  weights: dict[str, jax.Array] = {}
  total = jnp.zeros((), F32)
  if mode == "fixed":
    fixed_weights = dict(fixed_weights or {})
    unknown = sorted(set(fixed_weights) - set(names))
    if unknown:
      raise ValueError(f"fixed weights name unknown loss terms {unknown}; terms are {names}")
    for name in names:
      loss, count = terms[name]
      w = jnp.asarray(fixed_weights.get(name, 1.0), F32)
      total += jnp.where(count > 0, w * loss, 0.0)
      weights[name] = w
  elif mode == "uncertainty":
    if log_vars is None or log_vars.shape != (len(names),):
      raise ValueError(f"uncertainty weighting needs log_vars of shape ({len(names)},), got "
                       f"{None if log_vars is None else log_vars.shape}")
    s = jnp.clip(log_vars.astype(F32), *log_var_range)
    for i, name in enumerate(names):
      loss, count = terms[name]
      total += jnp.where(count > 0, jnp.exp(-s[i]) * loss + s[i], 0.0)
      weights[name] = jnp.exp(-s[i])
  else:
    raise ValueError(f"loss weighting mode must be 'fixed' or 'uncertainty', got {mode!r}")
  return total, weights
