"""GeoMeld-FM: ConvNeXtV2 encoder + MP-MAE decoders + JEPA predictor + caption encoder.

The module is an `nnx.Module`; training uses its functional core (jax_style.md §4):

  model_def, params = geomeld.init(config, rng)      # nnx.split once
  ema = geomeld.encoder_params(params)                # the JEPA teacher's initial copy
  loss, metrics = geomeld.loss_fn(params, ema, model_def, batch, rng)

`loss_fn` is a pure function of plain pytrees: differentiate it w.r.t. `params` only. The
teacher (EMA encoder params) runs unmasked inside `jax.lax.stop_gradient`; after the
optimizer update the train step calls `clamp_params` (CLIP temperature <= ln 100,
log-variances inside their range) and `jepa.ema_update` with `jepa.ema_momentum`.

Batch contract (device-side dict, batch axis first; `check_batch` validates it before
compiling): `sentinel2` (B,H,W,C) float + `sentinel2_valid` bool (the only model input);
per regression pixel target `m` float (B,H,W,C) + `m_valid` bool; per class map `m` int32
(B,H,W), -1 = no data; `location` (B,4), `month` (B,2), `water_fraction` (B,1) float, each
with `<name>_valid` (B,) bool; `terrain_class` int32 (B,), -1 unknown; with ITC
`text_tokens` int32 (B,L) (pad 0, sticky EOS) and `has_caption` bool (B,). Every band and
class count comes from the modality registry.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geomeld_jax import losses
from geomeld_jax import modalities as mod
from geomeld_jax.models import convnextv2
from geomeld_jax.models import decoders
from geomeld_jax.models import jepa
from geomeld_jax.models import text

PIXEL_TARGETS = tuple(mod.PIXEL_MODALITIES)
IMAGE_TARGETS = tuple(mod.IMAGE_TARGETS)
ALL_TARGETS = PIXEL_TARGETS + IMAGE_TARGETS
PRESETS = ("s2_mae", "mp_mae", "mp_mae_jepa", "mp_mae_itc", "full")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class GeoMeldFMConfig:
  """Everything that shapes the model and its loss. Frozen and hashable (a static value).

  A field added later must default to the behaviour from before it existed: resuming compares
  a saved config that lacks the field against its default (train.check_resumable).
  """

  # Encoder (ConvNeXtV2 on Sentinel-2).
  variant: str = "atto"
  stem: str = "patch"  # 'patch' (MMEarth small-tile stem, stride = patch_size) or 'original'
  patch_size: int = 16  # 128-px tiles -> 8x8 final grid
  drop_path_rate: float = 0.0  # FCMAE pretraining uses 0
  # The blocks' 7x7 depthwise conv (encoder and decoder): 'conv' (grouped convolution) or
  # 'taps' (49 fused multiply-adds, convnextv2.depthwise_conv_taps). Same params and result;
  # 'taps' halves the step on XLA's CPU backend (README, Measured). GPU/TPU: unmeasured.
  dwconv_impl: str = "conv"
  mask_ratio: float = 0.6
  # The MAE pass runs each block's MLP on the visible cells only (FCMAE's sparse saving,
  # same result; see convnextv2). False: the dense masked emulation everywhere.
  mae_visible_only: bool = True
  # The pixel heads and losses run on the masked cells only, where the losses look (same
  # result; see decoders.MultiPretextDecoder). False: heads on every cell.
  mae_heads_masked_only: bool = True
  # MP-MAE decoders and targets.
  targets: tuple[str, ...] = ALL_TARGETS
  decoder_width: int = 512
  decoder_depth: int = 1
  decoder_shared: bool = True  # MMEarth code: one decoder body, per-target heads
  norm_pix_loss: bool = True  # per-patch normalised Sentinel-2 target (FCMAE)
  # Loss combination over the terms `loss_terms` (targets, then 'jepa', then 'itc').
  loss_weighting: str = "uncertainty"  # 'uncertainty' (Kendall, MMEarth) or 'fixed'
  fixed_weights: tuple[tuple[str, float], ...] = ()  # ('name', w) pairs; default weight 1
  log_var_range: tuple[float, float] = (-4.0, 4.0)  # clip of the learned log-variances
  # JEPA branch.
  jepa: bool = False
  # Where the student's context comes from:
  # 'blocks': I-JEPA multi-block masks (the options below) and a second student pass on the
  #   context; the paper's "context and target views under distinct masks".
  # 'mae_pass': the MAE pass's visible cells are the context and its masked cells the
  #   targets (CNN-JEPA's random-mask strategy, ratio `mask_ratio`): one student pass fewer,
  #   -28% of the full step's FLOPs at atto (README, Measured), but I-JEPA found random-mask
  #   targets weaker than blocks. The jepa_target_*/context_* options are unused then.
  jepa_context: str = "blocks"
  jepa_num_targets: int = 4
  jepa_target_scale: tuple[float, float] = (0.15, 0.2)
  jepa_target_aspect: tuple[float, float] = (0.75, 1.5)
  jepa_context_scale: tuple[float, float] = (0.85, 1.0)
  jepa_min_context: int = 4
  # The context pass computes its MLPs on this fraction of the grid's cells (convnextv2
  # `max_visible_cells`); a context with more cells is randomly thinned to it. At the
  # defaults on an 8x8 grid a context has 29.8 cells on average (46%), and a cap of 40 thins
  # 5% of samples, dropping 0.5% of all context cells. 1.0: never thinned, dense pass.
  jepa_context_capacity: float = 0.625
  jepa_loss: str = "smooth_l1"  # or 'l2'
  jepa_predictor_depth: int = 3
  ema_momentum_start: float = 0.996  # for the train step's `jepa.ema_momentum`
  ema_momentum_end: float = 1.0
  # Image-text contrastive branch.
  itc: bool = False
  itc_loss: str = "clip"  # 'clip' (InfoNCE) or 'siglip'
  embed_dim: int = 256  # joint embedding width
  vision_embedding: str = "visible"  # 'visible': mean of the MAE pass's visible features;
  # 'unmasked': an extra unmasked encoder pass
  text_vocab_size: int = 8192  # must match the dataset's SentencePiece model
  text_context: int = 64
  text_width: int = 256
  text_layers: int = 6
  text_heads: int = 4
  text_causal: bool = True
  text_pooling: str = "eos"  # 'eos' (last non-pad token) or 'mean'
  text_pad_id: int = 0
  siglip_bias_init: float = losses.SIGLIP_BIAS_INIT  # or losses.siglip_bias_for_batch(B)
  # Precision: params are always float32; norms, softmax and losses always run in float32.
  compute_dtype: str = "float32"  # or 'bfloat16'

  def __post_init__(self):
    convnextv2.variant_config(self.variant)
    for t in self.targets:
      if t not in ALL_TARGETS:
        raise ValueError(f"unknown target {t!r}; known targets: {ALL_TARGETS}")
    if not self.targets:
      raise ValueError("config.targets is empty: MP-MAE needs at least one target")
    if len(set(self.targets)) != len(self.targets):
      raise ValueError(f"duplicate names in config.targets {self.targets}")
    choices = {
        "loss_weighting": ("uncertainty", "fixed"), "jepa_loss": ("smooth_l1", "l2"),
        "itc_loss": ("clip", "siglip"), "vision_embedding": ("visible", "unmasked"),
        "jepa_context": ("blocks", "mae_pass"), "dwconv_impl": convnextv2.DWCONV_IMPLS,
        "text_pooling": ("eos", "mean"), "compute_dtype": tuple(_DTYPES),
    }
    for field, allowed in choices.items():
      if getattr(self, field) not in allowed:
        raise ValueError(f"config.{field} must be one of {allowed}, got {getattr(self, field)!r}")
    unknown = sorted({n for n, _ in self.fixed_weights} - set(self.loss_terms))
    if unknown:
      raise ValueError(f"config.fixed_weights name unknown loss terms {unknown}; terms are "
                       f"{self.loss_terms}")
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"config.mask_ratio must be in [0, 1), got {self.mask_ratio}")
    if self.jepa and self.jepa_context == "mae_pass" and self.mask_ratio == 0.0:
      raise ValueError("config.jepa_context='mae_pass' takes its targets from the MAE mask, "
                       "but config.mask_ratio is 0")
    if not 0.0 < self.jepa_context_capacity <= 1.0:
      raise ValueError(f"config.jepa_context_capacity must be in (0, 1], got "
                       f"{self.jepa_context_capacity}")
    lo, hi = self.log_var_range
    if not lo < hi:
      raise ValueError(f"config.log_var_range must be (lo, hi) with lo < hi, got "
                       f"{self.log_var_range}")

  @property
  def loss_terms(self) -> tuple[str, ...]:
    return self.targets + (("jepa",) if self.jepa else ()) + (("itc",) if self.itc else ())

  @property
  def dtype(self):
    return _DTYPES[self.compute_dtype]

  @property
  def stride(self) -> int:
    """Total encoder stride (pixels per final-grid cell per side)."""
    if self.stem == "original":
      return convnextv2.ORIGINAL_STEM_STRIDE * 8
    return self.patch_size

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "GeoMeldFMConfig":
    """From a mapping of field values (a ConfigDict, or JSON with lists for tuples).

    An unknown key is an error naming it; nested lists become tuples (the config is frozen
    and hashable).
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}")

    def tuplify(v):
      return tuple(tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v

    return cls(**{k: tuplify(v) for k, v in fields.items()})

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "GeoMeldFMConfig":
    """Ablation presets; keyword overrides replace any field (e.g. variant='tiny')."""
    if name == "s2_mae":
      base = dict(targets=(mod.INPUT_MODALITY,), loss_weighting="fixed")
    elif name == "mp_mae":
      base = dict()
    elif name == "mp_mae_jepa":
      base = dict(jepa=True)
    elif name == "mp_mae_itc":
      base = dict(itc=True)
    elif name == "full":
      base = dict(jepa=True, itc=True)
    else:
      raise ValueError(f"unknown preset {name!r}; presets: {PRESETS}")
    base.update(overrides)
    return cls(**base)


class GeoMeldFM(nnx.Module):
  """The composed model. Submodules that a config turns off are None."""

  def __init__(self, config: GeoMeldFMConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = config.dtype
    in_chans = mod.pixel_modality(mod.INPUT_MODALITY).num_bands
    self.encoder = convnextv2.ConvNeXtV2(
        config.variant, in_chans, stem=config.stem, patch_size=config.patch_size,
        drop_path_rate=config.drop_path_rate, dwconv_impl=config.dwconv_impl, dtype=dtype,
        rngs=rngs)
    enc_dim = self.encoder.dims[-1]
    self.decoder = decoders.MultiPretextDecoder(
        enc_dim, config.targets, self.encoder.stride, width=config.decoder_width,
        depth=config.decoder_depth, shared=config.decoder_shared,
        dwconv_impl=config.dwconv_impl, dtype=dtype, rngs=rngs)
    self.jepa_predictor = (jepa.ConvPredictor(enc_dim, depth=config.jepa_predictor_depth,
                                              dtype=dtype, rngs=rngs)
                           if config.jepa else None)
    if config.itc:
      self.text_encoder = text.TextEncoder(
          config.text_vocab_size, context_length=config.text_context, width=config.text_width,
          layers=config.text_layers, heads=config.text_heads, embed_dim=config.embed_dim,
          causal=config.text_causal, pooling=config.text_pooling, pad_id=config.text_pad_id,
          dtype=dtype, rngs=rngs)
      self.vision_norm = nnx.LayerNorm(enc_dim, epsilon=1e-6, dtype=jnp.float32, rngs=rngs)
      self.vision_proj = nnx.Linear(enc_dim, config.embed_dim, use_bias=False,
                                    kernel_init=nnx.initializers.normal(enc_dim ** -0.5),
                                    dtype=jnp.float32, rngs=rngs)
      siglip = config.itc_loss == "siglip"
      self.logit_scale = nnx.Param(jnp.asarray(
          losses.SIGLIP_SCALE_INIT if siglip else losses.LOGIT_SCALE_INIT, jnp.float32))
      self.logit_bias = (nnx.Param(jnp.asarray(config.siglip_bias_init, jnp.float32))
                         if siglip else None)
    else:
      self.text_encoder = self.vision_norm = self.vision_proj = None
      self.logit_scale = self.logit_bias = None
    # Kendall log-variances s_i (init 0: every weight starts at 1), one per loss term.
    self.log_vars = (nnx.Param(jnp.zeros((len(config.loss_terms),), jnp.float32))
                     if config.loss_weighting == "uncertainty" else None)

  def embed_image(self, pooled: jax.Array) -> jax.Array:
    """Pooled encoder features (B, dims[-1]) -> L2-normalised joint embedding (B, E)."""
    return losses.l2_normalize(self.vision_proj(self.vision_norm(pooled.astype(jnp.float32))))

  def embed_text(self, tokens: jax.Array) -> jax.Array:
    """Token ids (B, L) -> L2-normalised joint embedding (B, E)."""
    return losses.l2_normalize(self.text_encoder(tokens))


# ----------------------------------------------------------------------------------------
# Functional core.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
  """What `loss_fn` needs besides the params: hashable by identity (usable as a jit static).

  `rest` holds the non-parameter state (drop-path RNG streams, present only when
  drop_path_rate > 0); `loss_fn` always passes fresh dropout keys, so it never changes.
  """

  config: GeoMeldFMConfig
  graphdef: Any
  rest: Any


def build(config: GeoMeldFMConfig, rng: jax.Array) -> GeoMeldFM:
  """The eager nnx model (for inspection and export)."""
  k_params, k_dropout = jax.random.split(rng)
  return GeoMeldFM(config, rngs=nnx.Rngs(params=k_params, dropout=k_dropout))


def init(config: GeoMeldFMConfig, rng: jax.Array) -> tuple[ModelDef, nnx.State]:
  """Builds the model and splits it once: (ModelDef, float32 params pytree)."""
  graphdef, params, rest = nnx.split(build(config, rng), nnx.Param, ...)
  return ModelDef(config, graphdef, rest), params


def merge(model_def: ModelDef, params: nnx.State) -> GeoMeldFM:
  return nnx.merge(model_def.graphdef, params, model_def.rest)


def encoder_params(params: nnx.State) -> nnx.State:
  """The encoder subtree: what the EMA teacher tracks and what export keeps."""
  return params["encoder"]


def _map_named(params: nnx.State, name: str, fn) -> nnx.State:
  """Applies fn to the top-level param `name` (if present), leaving every other leaf as is."""

  def visit(path, leaf):
    return fn(leaf) if path and getattr(path[0], "key", None) == name else leaf

  return jax.tree_util.tree_map_with_path(visit, params)


def clamp_logit_scale(params: nnx.State) -> nnx.State:
  """Clamps the contrastive log-temperature to [0, ln 100] (open_clip, after each update)."""
  return _map_named(params, "logit_scale",
                    lambda x: jnp.clip(x, 0.0, losses.LOGIT_SCALE_MAX).astype(x.dtype))


def clamp_params(config: GeoMeldFMConfig, params: nnx.State) -> nnx.State:
  """Post-update clamps: logit_scale to [0, ln 100], log-variances to config.log_var_range.

  The train step calls this right after `optax.apply_updates`, inside its jit.
  """
  params = clamp_logit_scale(params)
  lo, hi = config.log_var_range
  return _map_named(params, "log_vars", lambda x: jnp.clip(x, lo, hi).astype(x.dtype))


def _target_loss(name: str, pred: jax.Array, batch: Mapping[str, jax.Array], mask: jax.Array,
                 patch: int, norm_pix: bool,
                 cells: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  if name in mod.PIXEL_MODALITIES:
    if mod.PIXEL_MODALITIES[name].is_classes:
      return losses.pixel_ce_loss(pred, batch[name], mask, patch, cells=cells)
    return losses.reconstruction_loss(pred, batch[name], batch[f"{name}_valid"], mask, patch,
                                      norm_pix=norm_pix and name == mod.INPUT_MODALITY,
                                      cells=cells)
  if mod.image_target(name).kind is mod.TargetKind.IMAGE_CLASSES:
    return losses.image_ce_loss(pred, batch[name])
  return losses.image_mse_loss(pred, batch[name], batch[f"{name}_valid"])


def _channel_std(x: jax.Array, where: jax.Array | None = None) -> jax.Array:
  """Mean over channels of the std over every other axis: ~0 when features collapse.

  `where` (x's shape without channels) restricts the std to those positions.
  """
  x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  if where is None:
    return jnp.mean(jnp.std(x, axis=0))
  w = where.reshape(-1, 1).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(w * x, axis=0) / n
  return jnp.mean(jnp.sqrt(jnp.sum(w * jnp.square(x - mean), axis=0) / n))


def jepa_masks(cfg: GeoMeldFMConfig, key: jax.Array, batch: int, grid_h: int,
               grid_w: int) -> tuple[jepa.JepaMasks, int]:
  """The config's JEPA masks and the context capacity (static) they were thinned to."""
  capacity = jepa.context_capacity(grid_h * grid_w, cfg.jepa_context_capacity,
                                   cfg.jepa_min_context)
  masks = jepa.sample_jepa_masks(
      key, batch, grid_h, grid_w, num_targets=cfg.jepa_num_targets,
      target_scale=cfg.jepa_target_scale, target_aspect=cfg.jepa_target_aspect,
      context_scale=cfg.jepa_context_scale, min_context=cfg.jepa_min_context,
      max_context=capacity)
  return masks, capacity


def _cells_with_data(valid: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
  """(B, grid_h, grid_w) bool: the cell holds at least one valid input pixel of any band."""
  b, h, w, _ = valid.shape
  any_band = jnp.any(valid, axis=-1).reshape(b, grid_h, h // grid_h, grid_w, w // grid_w)
  return jnp.any(any_band, axis=(2, 4))


def input_image(batch: Mapping[str, jax.Array], dtype: Any) -> jax.Array:
  """The encoder's input from the batch contract: Sentinel-2 with 0 at invalid pixels
  (`where`, not a multiply: NaN in a no-data input band must not reach the loss)."""
  valid = batch[f"{mod.INPUT_MODALITY}_valid"]
  return jnp.where(valid, batch[mod.INPUT_MODALITY], 0.0).astype(dtype)


def embed_whole_image(model: GeoMeldFM, x: jax.Array, **enc_kw: Any) -> jax.Array:
  """Joint embedding of the unmasked image: mean of the encoder's final map over all cells."""
  feats, _ = model.encoder(x, None, **enc_kw)
  return model.embed_image(jnp.mean(feats.astype(jnp.float32), axis=(1, 2)))


def i2t_top1(img: jax.Array, txt: jax.Array, has_caption: jax.Array) -> jax.Array:
  """Share of captioned images whose most similar caption in the batch is their own."""
  captioned_cols = losses.gather_batch(has_caption)[None, :]
  sim = jnp.where(captioned_cols, losses.similarity(img, txt), -jnp.inf)
  hit = (jnp.argmax(sim, axis=1) == jnp.arange(img.shape[0])) & has_caption
  return (jnp.sum(hit.astype(jnp.float32))
          / jnp.maximum(jnp.sum(has_caption.astype(jnp.float32)), 1.0))


def unmasked_itc_metrics(params: nnx.State, model_def: ModelDef,
                         batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """`itc/i2t_top1_unmasked`: in-batch image->text top-1 with the whole image embedded, as
  retrieval embeds it. With `vision_embedding='visible'` training pools the MAE pass's visible
  cells only, so this (eval-only) number shows what that view costs at test time."""
  model = merge(model_def, params)
  img = embed_whole_image(model, input_image(batch, model_def.config.dtype), deterministic=True)
  txt = model.embed_text(batch["text_tokens"])
  return {"itc/i2t_top1_unmasked": i2t_top1(img, txt, batch["has_caption"])}


def loss_fn(params: nnx.State, ema_params: nnx.State | None, model_def: ModelDef,
            batch: Mapping[str, jax.Array], rng: jax.Array, *,
            deterministic: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total pretraining loss and metrics; pure, jittable, differentiate w.r.t. params only.

  Args:
    params: the model params (`init`'s second output, possibly updated).
    ema_params: the teacher encoder params (same structure as `encoder_params(params)`);
      required when JEPA is on, ignored otherwise (may be None).
    model_def: `init`'s first output (close over it or pass it as a jit static).
    batch: the batch contract above (sharded or not).
    rng: key for the MAE mask, the JEPA blocks and drop path.
    deterministic: disables drop path (masks stay random: they define the objective).

  Returns:
    (total loss, metrics): `loss`, `loss/<term>`, `weight/<term>`, `count/<term>` (valid
    elements behind each term), `mask_ratio`, `feature_std` (the student's visible
    features; see `_channel_std`); with JEPA `jepa/target_std` (the teacher's), `jepa/pred_std`
    (collapse watch), `jepa/context_frac`, `jepa/target_frac`, `jepa/thinned_frac`; with ITC
    `logit_scale`, `itc/i2t_top1`; with SigLIP `logit_bias`.
  """
  cfg = model_def.config
  model = merge(model_def, params)
  k_mask, k_jepa, k_drop = jax.random.split(rng, 3)
  drop_rngs = None if deterministic else nnx.Rngs(dropout=k_drop)
  enc_kw = dict(deterministic=deterministic, rngs=drop_rngs)

  x = input_image(batch, cfg.dtype)
  b, h, w, _ = x.shape
  grid_h, grid_w = model.encoder.grid_shape(h, w)
  stride = model.encoder.stride
  if convnextv2.num_visible_cells(grid_h, grid_w, cfg.mask_ratio) < 1:
    raise ValueError(f"mask_ratio {cfg.mask_ratio} leaves no visible cell of the {grid_h}x"
                     f"{grid_w} grid ({h}x{w} px at stride {model.encoder.stride}): lower it")
  mask = convnextv2.random_patch_mask(k_mask, b, grid_h, grid_w, cfg.mask_ratio)
  visible_cells = (convnextv2.num_visible_cells(grid_h, grid_w, cfg.mask_ratio)
                   if cfg.mae_visible_only else None)
  # Cells without one valid input pixel (swath edges) hold nothing to predict or describe:
  # JEPA does not target them and the ITC view does not pool them.
  has_data = _cells_with_data(batch[f"{mod.INPUT_MODALITY}_valid"], grid_h, grid_w)
  # Named scopes label each branch's ops in profiles (geomeld_jax.bench --profile_dir).
  with jax.named_scope("mae_encoder"):
    feats, _ = model.encoder(x, mask, max_visible_cells=visible_cells, **enc_kw)
  num_masked = grid_h * grid_w - convnextv2.num_visible_cells(grid_h, grid_w, cfg.mask_ratio)
  masked_cells = None
  if cfg.mae_heads_masked_only and num_masked:
    # The visible cells of ~mask are the masked cells; every sample has exactly num_masked.
    masked_cells, _, _ = convnextv2.visible_cell_indices(~mask, num_masked)
  with jax.named_scope("mae_decoders"):
    preds = model.decoder(feats, mask, pixel_cells=masked_cells)
    terms = {t: _target_loss(t, preds[t], batch, mask, stride, cfg.norm_pix_loss, masked_cells)
             for t in cfg.targets}
  metrics: dict[str, jax.Array] = {"mask_ratio": jnp.mean(mask.astype(jnp.float32))}
  # The student's side of the collapse watch (jepa/target_std is the teacher's): the spread
  # of its per-cell-normalised features over the visible cells, for every objective.
  metrics["feature_std"] = _channel_std(
      losses.layer_norm_no_affine(jax.lax.stop_gradient(feats)), where=~mask)

  if cfg.jepa:
    if ema_params is None:
      raise ValueError("JEPA is on: loss_fn needs ema_params (the teacher encoder params)")
    if cfg.jepa_context == "mae_pass":
      context, target, thinned = ~mask, mask, jnp.zeros((b,), bool)
      context_feats = feats  # the MAE pass's features: zero at its masked cells
    else:
      masks, capacity = jepa_masks(cfg, k_jepa, b, grid_h, grid_w)
      context, target, thinned = masks.context, masks.target, masks.thinned
      sparse = capacity < grid_h * grid_w  # at full capacity the gathers would only add work
      with jax.named_scope("jepa_context_encoder"):
        context_feats, _ = model.encoder(x, ~context,
                                         max_visible_cells=capacity if sparse else None,
                                         **enc_kw)
    with jax.named_scope("jepa_predictor"):
      pred = model.jepa_predictor(context_feats, context)
    enc_graphdef, _, enc_rest = nnx.split(model.encoder, nnx.Param, ...)
    teacher = nnx.merge(enc_graphdef, jax.lax.stop_gradient(ema_params), enc_rest)
    with jax.named_scope("jepa_teacher"):
      teacher_feats = jax.lax.stop_gradient(teacher(x, None, deterministic=True)[0])
    terms["jepa"] = losses.jepa_loss(pred, teacher_feats, target & has_data, kind=cfg.jepa_loss)
    metrics["jepa/target_std"] = _channel_std(losses.layer_norm_no_affine(teacher_feats))
    metrics["jepa/pred_std"] = _channel_std(pred)
    metrics["jepa/context_frac"] = jnp.mean(context.astype(jnp.float32))
    metrics["jepa/target_frac"] = jnp.mean(target.astype(jnp.float32))
    metrics["jepa/thinned_frac"] = jnp.mean(thinned.astype(jnp.float32))

  if cfg.itc:
    if cfg.vision_embedding == "visible":
      visible = (~mask & has_data)[..., None]
      f32 = feats.astype(jnp.float32)
      pooled = (jnp.sum(jnp.where(visible, f32, 0.0), axis=(1, 2))
                / jnp.maximum(jnp.sum(visible, axis=(1, 2)), 1).astype(jnp.float32))
      img = model.embed_image(pooled)
    else:
      with jax.named_scope("itc_encoder"):
        img = embed_whole_image(model, x, **enc_kw)
    with jax.named_scope("itc_text_tower"):
      txt = model.embed_text(batch["text_tokens"])
    has_caption = batch["has_caption"]
    logit_scale = model.logit_scale[...]
    if cfg.itc_loss == "clip":
      terms["itc"] = losses.clip_loss(img, txt, logit_scale, has_caption)
    else:
      terms["itc"] = losses.siglip_loss(img, txt, logit_scale, model.logit_bias[...], has_caption)
      metrics["logit_bias"] = model.logit_bias[...]
    metrics["logit_scale"] = logit_scale
    metrics["itc/i2t_top1"] = i2t_top1(img, txt, has_caption)

  total, weights = losses.combine_losses(
      terms, mode=cfg.loss_weighting, fixed_weights=dict(cfg.fixed_weights),
      log_vars=None if model.log_vars is None else model.log_vars[...],
      log_var_range=cfg.log_var_range)
  metrics["loss"] = total
  for name, (value, count) in terms.items():
    metrics[f"loss/{name}"] = value
    metrics[f"count/{name}"] = count
    metrics[f"weight/{name}"] = weights[name]
  return total, metrics


# ----------------------------------------------------------------------------------------
# Batch validation (plain Python, before compiling).
# ----------------------------------------------------------------------------------------


def _kind(dtype) -> str:
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return "bool"
  if jnp.issubdtype(dtype, jnp.floating):
    return "float"
  if jnp.issubdtype(dtype, jnp.signedinteger):
    return "int"
  return str(dtype)


def batch_spec(config: GeoMeldFMConfig, batch: int, height: int,
               width: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """key -> (shape, kind) the config needs; kind is 'float', 'bool' or 'int' (int32)."""
  spec: dict[str, tuple[tuple[int, ...], str]] = {}

  def pixel(name: str) -> None:
    m = mod.pixel_modality(name)
    if m.is_classes:
      spec[name] = ((batch, height, width), "int")
    else:
      spec[name] = ((batch, height, width, m.num_bands), "float")
      spec[f"{name}_valid"] = ((batch, height, width, m.num_bands), "bool")

  pixel(mod.INPUT_MODALITY)
  for t in config.targets:
    if t in mod.PIXEL_MODALITIES:
      pixel(t)
    else:
      target = mod.image_target(t)
      if target.kind is mod.TargetKind.IMAGE_CLASSES:
        spec[t] = ((batch,), "int")
      else:
        spec[t] = ((batch, target.dims), "float")
        spec[f"{t}_valid"] = ((batch,), "bool")
  if config.itc:
    spec["has_caption"] = ((batch,), "bool")
  return spec


def check_batch(config: GeoMeldFMConfig, batch_shapes: Mapping[str, Any]) -> None:
  """Raises ValueError naming the missing or wrong key when a batch does not fit the config.

  Args:
    config: the model config.
    batch_shapes: key -> anything with `.shape` and `.dtype` (arrays, ShapeDtypeStruct).
      Extra keys are allowed.
  """
  x_key = mod.INPUT_MODALITY
  if x_key not in batch_shapes:
    raise ValueError(f"batch is missing key {x_key!r} (the model input); got keys "
                     f"{sorted(batch_shapes)}")
  x_shape = tuple(batch_shapes[x_key].shape)
  if len(x_shape) != 4:
    raise ValueError(f"batch[{x_key!r}] must be (B, H, W, C), got shape {x_shape}")
  b, h, w, _ = x_shape
  stride = config.stride
  if h % stride or w % stride:
    raise ValueError(f"batch[{x_key!r}] is {h}x{w} px, not divisible by the encoder stride "
                     f"{stride}")
  spec = batch_spec(config, b, h, w)
  if config.itc:
    if "text_tokens" not in batch_shapes:
      raise ValueError("batch is missing key 'text_tokens' (ITC is on)")
    tok = batch_shapes["text_tokens"]
    tshape = tuple(tok.shape)
    if len(tshape) != 2 or tshape[0] != b or not 1 <= tshape[1] <= config.text_context:
      raise ValueError(f"batch['text_tokens'] must be (B={b}, L<={config.text_context}), got "
                       f"shape {tshape}")
    spec["text_tokens"] = (tshape, "int")
  for key, (shape, kind) in spec.items():
    if key not in batch_shapes:
      raise ValueError(f"batch is missing key {key!r}: expected {kind} {shape} for config "
                       f"targets {config.targets}")
    got = batch_shapes[key]
    got_shape, got_kind = tuple(got.shape), _kind(got.dtype)
    if got_shape != shape:
      raise ValueError(f"batch[{key!r}] has shape {got_shape}, expected {shape}")
    if got_kind != kind:
      want = "int32" if kind == "int" else kind
      raise ValueError(f"batch[{key!r}] has dtype {np.dtype(got.dtype)}, expected {want}")


def param_counts(params: nnx.State) -> dict[str, int]:
  """Scalar parameter count per top-level submodule, and 'total'."""
  counts: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    top = str(getattr(path[0], "key", path[0]))
    counts[top] = counts.get(top, 0) + int(math.prod(leaf.shape))
  counts["total"] = sum(counts.values())
  return counts
