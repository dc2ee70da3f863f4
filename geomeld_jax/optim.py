"""The optimizer: AdamW, linear warmup + cosine decay, global-norm clipping, a weight-decay mask.

Pure optax on a plain parameter pytree (the train state is {params, opt_state, ema_params,
step}); no `nnx.Optimizer`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any

# ---------------------------------------------------------------------------------------------
# The weight-decay rule (the one place it is written down)
# ---------------------------------------------------------------------------------------------
# A parameter is decayed unless
#   (a) it has fewer than 2 dimensions (every bias, norm scale, scalar), or
#   (b) its '/'-joined path matches one of the patterns below.
# (b) exists because some no-decay parameters are not 1-D: ConvNeXtV2's GRN gamma/beta are
# (1, 1, 1, C), positional embeddings and mask tokens are (1, N, D) / (1, 1, D). Decaying them
# pulls them towards 0, which for GRN means "turn the layer off", for a temperature means
# "flatten every similarity", and for loss log-variances biases the loss weighting.
NO_WEIGHT_DECAY_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|/)[^/]*bias$", "biases, including the contrastive logit_bias"),
    (r"(^|/)[^/]*norm[^/]*/", "everything inside a normalisation layer (LayerNorm scale/bias)"),
    (r"(^|/)(ln|ln_[^/]*)/", "LayerNorms named ln / ln_*"),
    (r"(^|/)(scale|gamma|beta)$", "norm-style affine parameters, GRN gamma/beta"),
    (r"(^|/)grn/", "Global Response Normalisation"),
    (r"(^|/)(logit_scale|temperature)$", "the contrastive temperature"),
    (r"(^|/)log_vars?(/|$)", "loss log-variances (uncertainty weighting)"),
    (r"(^|/)[^/]*mask_token[^/]*(/|$)", "mask tokens"),
    (r"(^|/)[^/]*(pos_emb|position_emb|positional_emb)[^/]*(/|$)", "positional embeddings"),
)
_NO_DECAY_RE = re.compile("|".join(f"(?:{pattern})" for pattern, _ in NO_WEIGHT_DECAY_PATTERNS))

# Path components a wrapper adds below the parameter itself (nnx.State leaves end in `.value`).
_WRAPPER_COMPONENTS = ("value", "raw_value")


def path_to_str(path: Sequence[Any]) -> str:
  """'encoder/stages/0/blocks/0/grn/gamma' from a jax key path."""
  parts = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      parts.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      parts.append(entry.name)
    elif isinstance(entry, jax.tree_util.SequenceKey):
      parts.append(str(entry.idx))
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
      parts.append(str(entry.key))
    else:
      parts.append(str(entry))
  while parts and parts[-1] in _WRAPPER_COMPONENTS:
    parts.pop()
  return "/".join(parts)


def is_decayed(path: str, ndim: int) -> bool:
  """Whether weight decay applies to the parameter at `path` with `ndim` dimensions."""
  return ndim >= 2 and _NO_DECAY_RE.search(path) is None


def weight_decay_mask(params: PyTree) -> PyTree:
  """A bool pytree shaped like `params`: True where AdamW's decoupled weight decay applies."""
  # len(shape) rather than jnp.ndim so that abstract (ShapeDtypeStruct) trees work too.
  return jax.tree_util.tree_map_with_path(lambda path, leaf: is_decayed(path_to_str(path), len(leaf.shape)),
                                          params)


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------

# Every field is required: the defaults live in the config (configs/pretrain.py), nowhere else.
_FIELDS = ("lr", "min_lr", "warmup_steps", "total_steps", "b1", "b2", "eps", "weight_decay",
           "grad_clip_norm", "mu_dtype")
# The config derives lr from these (lr = base_lr * global batch / lr_batch_unit); they are
# accepted, and only lr is used.
_LR_RULE_FIELDS = ("base_lr", "lr_batch_unit")


def make_optimizer(cfg: Mapping[str, Any] | Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup + cosine decay, global-norm clipping and `weight_decay_mask`.

  Args:
    cfg: a mapping or ConfigDict with
      lr: peak learning rate, reached after `warmup_steps`;
      warmup_steps: linear warmup from 0 (0 = start at the peak);
      total_steps: length of the whole schedule, warmup included; cosine decay ends there;
      grad_clip_norm: global-norm clip threshold, or None / 0 for no clipping (the optimizer
        state has the same structure either way, so a run may resume with clipping changed);
      min_lr: the learning rate the cosine decays to;
      b1, b2, eps: Adam (the FCMAE recipe uses 0.9, 0.95, 1e-8);
      weight_decay: decoupled, on the parameters `weight_decay_mask` selects;
      mu_dtype: the dtype of Adam's first moment ('float32', or 'bfloat16' to halve its
        memory); None keeps the parameters' dtype.

  Returns:
    (the optax transformation, the learning-rate schedule so the loop can log it).
  """
  fields = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
  unknown = sorted(set(fields) - set(_FIELDS) - set(_LR_RULE_FIELDS))
  if unknown:
    raise ValueError(f"unknown optimizer fields {unknown}; known: {sorted(_FIELDS + _LR_RULE_FIELDS)}")
  missing = [key for key in _FIELDS if key not in fields]
  if missing:
    raise ValueError(f"optimizer config lacks the required fields {missing}")
  c = fields
  lr, min_lr = float(c["lr"]), float(c["min_lr"])
  warmup_steps, total_steps = int(c["warmup_steps"]), int(c["total_steps"])
  if lr <= 0 or not 0 <= min_lr <= lr:
    raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={lr}, min_lr={min_lr}")
  if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
    raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                     f"total_steps={total_steps}")
  if float(c["weight_decay"]) < 0:
    raise ValueError(f"weight_decay must be >= 0, got {c['weight_decay']}")

  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=total_steps, end_value=min_lr)
  clip = c["grad_clip_norm"]
  # Both transforms keep empty states, so identity() keeps the chain's state structure fixed.
  transforms = [optax.clip_by_global_norm(float(clip)) if clip is not None and float(clip) > 0
                else optax.identity()]
  transforms.append(optax.adamw(
      learning_rate=schedule, b1=float(c["b1"]), b2=float(c["b2"]), eps=float(c["eps"]),
      mu_dtype=None if c["mu_dtype"] is None else jnp.dtype(c["mu_dtype"]),
      weight_decay=float(c["weight_decay"]), mask=weight_decay_mask))
  return optax.chain(*transforms), schedule

