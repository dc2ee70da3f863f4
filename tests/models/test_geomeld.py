"""GeoMeld-FM smoke tests: every ablation preset differentiates end to end.

A micro ConvNeXtV2 variant (depths 1,1,1,1) on 32-px tiles with patch 8 (a 4x4 grid) keeps
each preset's jitted forward+backward to one small compile; XLA optimisations are switched
off for this module only (numerics are unaffected, compiles are ~2x faster).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geomeld_jax import losses
from geomeld_jax import modalities as mod
from geomeld_jax.models import convnextv2
from geomeld_jax.models import decoders
from geomeld_jax.models import geomeld
from geomeld_jax.models import jepa

MICRO = "test_micro"
B, HW, PATCH, TEXT_LEN = 4, 32, 8, 12
HAS_CAPTION = np.array([True, True, True, False])


@pytest.fixture(scope="module", autouse=True)
def micro_variant():
  convnextv2.VARIANTS[MICRO] = ((1, 1, 1, 1), (8, 16, 16, 32))
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
  del convnextv2.VARIANTS[MICRO]


def _config(preset, **overrides):
  kw = dict(variant=MICRO, patch_size=PATCH, decoder_width=32, text_vocab_size=64,
            text_context=16, text_width=32, text_layers=1, text_heads=2, embed_dim=16,
            jepa_min_context=2)
  kw.update(overrides)
  return geomeld.GeoMeldFMConfig.preset(preset, **kw)


def _batch(seed=0):
  """A random batch of the contract: NaN at invalid S2 pixels, sample 3 has no Sentinel-1."""
  r = np.random.default_rng(seed)
  out = {}
  for m in mod.PIXEL_MODALITIES.values():
    if m.is_classes:
      out[m.name] = r.integers(-1, m.num_classes, (B, HW, HW)).astype(np.int32)
      continue
    x = r.normal(size=(B, HW, HW, m.num_bands)).astype(np.float32)
    valid = r.random(x.shape) > 0.1
    if m.name == mod.INPUT_MODALITY:
      valid[0, :, :, 2] = False  # a band missing for a whole sample
      x[~valid] = np.nan  # no-data must not propagate
    else:
      x[~valid] = 0.0
    out[m.name], out[f"{m.name}_valid"] = x, valid
  out["sentinel1_valid"][3] = False
  out["sentinel1"][3] = 0.0
  for t in mod.IMAGE_TARGETS.values():
    if t.kind is mod.TargetKind.IMAGE_CLASSES:
      out[t.name] = np.array([0, -1, 2, 1], np.int32)  # -1: unknown terrain
    else:
      out[t.name] = r.normal(size=(B, t.dims)).astype(np.float32)
      out[f"{t.name}_valid"] = np.array([True, True, False, True])
  tok = np.zeros((B, TEXT_LEN), np.int32)
  for i, n in enumerate([5, 12, 7, 0]):
    if n:
      tok[i, :n - 1] = r.integers(2, 64, n - 1)
      tok[i, n - 1] = 1
  out["text_tokens"] = tok
  out["has_caption"] = HAS_CAPTION
  return {k: jnp.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def batch():
  return _batch()


class _Compiled:
  """One preset: config, params, teacher params and its jitted value-and-grad."""

  def __init__(self, preset):
    self.config = _config(preset)
    self.model_def, self.params = geomeld.init(self.config, jax.random.key(0))
    self.ema = (jax.tree.map(lambda x: x * 0.9, geomeld.encoder_params(self.params))
                if self.config.jepa else None)
    fn = lambda p, e, b, r: geomeld.loss_fn(p, e, self.model_def, b, r)
    self.step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))


_CACHE = {}


def _compiled(preset):
  if preset not in _CACHE:
    _CACHE[preset] = _Compiled(preset)
  return _CACHE[preset]


@pytest.fixture(scope="module", autouse=True)
def _clear_cache():
  yield
  _CACHE.clear()


@pytest.mark.parametrize("preset", geomeld.PRESETS)
def test_preset_forward_backward(preset, batch):
  c = _compiled(preset)
  geomeld.check_batch(c.config, batch)
  (loss, metrics), (grads, ema_grads) = c.step(c.params, c.ema, batch, jax.random.key(1))
  assert np.isfinite(float(loss))
  assert {k[5:] for k in metrics if k.startswith("loss/")} == set(c.config.loss_terms)
  for term in c.config.loss_terms:
    assert float(metrics[f"count/{term}"]) > 0, term
    assert np.isfinite(float(metrics[f"loss/{term}"])), term
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) == len(jax.tree.leaves(c.params))
  for path, g in flat:
    name = jax.tree_util.keystr(path)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    assert np.any(g != 0), f"{preset}: no gradient reaches {name}"
  top = {str(p[0].key) for p, _ in flat}
  assert ("jepa_predictor" in top) == c.config.jepa
  assert ("text_encoder" in top) == c.config.itc
  if c.config.jepa:
    # The teacher is run inside stop_gradient: exactly zero, not merely small.
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(ema_grads))
    assert float(metrics["jepa/target_std"]) > 0.1
  if c.config.itc:
    np.testing.assert_allclose(float(metrics["logit_scale"]), losses.LOGIT_SCALE_INIT)
    assert float(metrics["count/itc"]) == HAS_CAPTION.sum()
  assert 0.5 < float(metrics["mask_ratio"]) < 0.8
  assert 0.1 < float(metrics["feature_std"]) < 1.0  # LN'd features of a fresh encoder vary


def test_channel_std_over_chosen_positions():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 5)) * jnp.arange(1.0, 6.0)
  where = jax.random.bernoulli(jax.random.key(1), 0.5, (2, 3, 3))
  rows = np.asarray(x).reshape(-1, 5)[np.asarray(where).reshape(-1)]
  np.testing.assert_allclose(float(geomeld._channel_std(x, where)), rows.std(0).mean(), rtol=1e-5)  # pylint: disable=protected-access
  np.testing.assert_allclose(float(geomeld._channel_std(x)), np.asarray(x).reshape(-1, 5).std(0).mean(), rtol=1e-5)  # pylint: disable=protected-access
  constant = jnp.where(where[..., None], 1.0, x)  # collapsed where it counts
  assert float(geomeld._channel_std(constant, where)) == 0.0  # pylint: disable=protected-access


@pytest.mark.parametrize("flag", ["mae_visible_only", "mae_heads_masked_only"])
def test_sparse_mae_pass_equals_the_dense_one(batch, flag):
  """Encoder MLPs on visible cells (`mae_visible_only`) and pixel heads on masked cells
  (`mae_heads_masked_only`) change how the MAE pass computes, not what: same loss and grads."""
  sparse = _compiled("mp_mae")
  assert sparse.config.mae_visible_only and sparse.config.mae_heads_masked_only
  dense_cfg = dataclasses.replace(sparse.config, **{flag: False})
  model_def = dataclasses.replace(sparse.model_def, config=dense_cfg)
  dense = jax.jit(jax.value_and_grad(
      lambda p, b, r: geomeld.loss_fn(p, None, model_def, b, r), has_aux=True))
  (loss_s, metrics_s), (grads_s, _) = sparse.step(sparse.params, None, batch, jax.random.key(1))
  (loss_d, metrics_d), grads_d = dense(sparse.params, batch, jax.random.key(1))
  np.testing.assert_allclose(float(loss_s), float(loss_d), rtol=1e-5)
  for term in sparse.config.loss_terms:
    np.testing.assert_allclose(float(metrics_s[f"loss/{term}"]), float(metrics_d[f"loss/{term}"]),
                               rtol=1e-4, err_msg=term)
  for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_d)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3,
                               atol=1e-5 * float(np.abs(np.asarray(b)).max()) + 1e-12)


def test_jepa_context_pass_on_cell_slots_equals_the_dense_one(batch):
  """A context never has all 16 cells (targets take >= 1), so at capacity 15/16 nothing is
  thinned: the padded cell-slot pass must give the dense pass's losses and gradients."""
  c = _compiled("mp_mae_jepa")
  assert jepa_capacity(c.config) < 16  # the default config runs the cell-slot pass

  def value_and_grad(capacity):
    model_def = dataclasses.replace(
        c.model_def, config=dataclasses.replace(c.config, jepa_context_capacity=capacity))
    fn = jax.jit(jax.value_and_grad(
        lambda p, b, r: geomeld.loss_fn(p, c.ema, model_def, b, r), has_aux=True))
    return fn(c.params, batch, jax.random.key(4))

  (loss_s, metrics_s), grads_s = value_and_grad(15 / 16)
  (loss_d, metrics_d), grads_d = value_and_grad(1.0)
  assert float(metrics_s["jepa/thinned_frac"]) == 0.0
  np.testing.assert_allclose(float(metrics_s["loss/jepa"]), float(metrics_d["loss/jepa"]),
                             rtol=1e-5)
  np.testing.assert_allclose(float(loss_s), float(loss_d), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_d)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3,
                               atol=1e-5 * float(np.abs(np.asarray(b)).max()) + 1e-12)


def test_jepa_on_the_mae_pass(batch):
  """jepa_context='mae_pass': the MAE pass's visible cells are the student's context and its
  masked cells the targets. The MAE terms are those of the 'blocks' run (same mask, same
  pass), every parameter still learns, and the second student pass is gone from the graph."""
  blocks = _compiled("full")
  model_def = dataclasses.replace(
      blocks.model_def, config=dataclasses.replace(blocks.config, jepa_context="mae_pass"))
  fn = lambda p, e, b, r: geomeld.loss_fn(p, e, model_def, b, r)
  key = jax.random.key(5)
  (loss, metrics), (grads, ema_grads) = jax.jit(
      jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(blocks.params, blocks.ema, batch, key)
  (_, metrics_blocks), _ = blocks.step(blocks.params, blocks.ema, batch, key)
  assert np.isfinite(float(loss)) and np.isfinite(float(metrics["loss/jepa"]))
  for term in blocks.config.targets:
    assert float(metrics[f"loss/{term}"]) == float(metrics_blocks[f"loss/{term}"]), term
  mask_ratio = float(metrics["mask_ratio"])
  assert float(metrics["jepa/target_frac"]) == mask_ratio
  assert float(metrics["jepa/context_frac"]) == 1.0 - mask_ratio
  assert float(metrics["jepa/thinned_frac"]) == 0.0
  assert float(metrics["count/jepa"]) == round(mask_ratio * B * (HW // PATCH) ** 2)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.any(np.asarray(g) != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(ema_grads))

  def forward_flops(model_def):
    lowered = jax.jit(lambda p, e, b, r: geomeld.loss_fn(p, e, model_def, b, r)[0]).lower(
        blocks.params, blocks.ema, batch, key)
    return lowered.cost_analysis()["flops"]

  encoder_forward = jax.jit(lambda p, x: geomeld.merge(blocks.model_def, p).encoder(x)[0]).lower(
      blocks.params, batch["sentinel2"]).cost_analysis()["flops"]
  saved = forward_flops(blocks.model_def) - forward_flops(model_def)
  # The context pass computes its MLPs on <= 15 of 16 cells: most of a dense forward.
  assert 0.5 * encoder_forward < saved < 1.1 * encoder_forward, (saved, encoder_forward)


def jepa_capacity(cfg):
  return jepa.context_capacity(16, cfg.jepa_context_capacity, cfg.jepa_min_context)


def test_full_uses_the_teacher_and_blocks_nan(batch):
  c = _compiled("full")
  key = jax.random.key(2)
  (loss, metrics), _ = c.step(c.params, c.ema, batch, key)
  other_teacher = jax.tree.map(lambda x: x * 0.5, c.ema)
  (_, metrics2), _ = c.step(c.params, other_teacher, batch, key)
  assert float(metrics["loss/jepa"]) != float(metrics2["loss/jepa"])
  assert float(metrics["loss/sentinel2"]) == float(metrics2["loss/sentinel2"])
  # NaN at invalid input pixels gives exactly the loss of zeros there.
  zeroed = dict(batch)
  zeroed["sentinel2"] = jnp.where(batch["sentinel2_valid"], batch["sentinel2"], 0.0)
  assert np.isnan(np.asarray(batch["sentinel2"])).any()
  (loss_zeroed, _), _ = c.step(c.params, c.ema, zeroed, key)
  assert float(loss) == float(loss_zeroed)


def test_uncertainty_weights_reported(batch):
  c = _compiled("mp_mae")
  (loss, metrics), _ = c.step(c.params, None, batch, jax.random.key(3))
  terms = c.config.loss_terms
  # log-variances start at 0: every weight is 1 and the total is the plain sum.
  assert all(float(metrics[f"weight/{t}"]) == 1.0 for t in terms)
  np.testing.assert_allclose(float(loss), sum(float(metrics[f"loss/{t}"]) for t in terms),
                             rtol=1e-6)


def test_missing_modality_sample_contributes_nothing(batch):
  c = _compiled("mp_mae")
  key = jax.random.key(4)
  (_, metrics), _ = c.step(c.params, None, batch, key)
  noise = dict(batch)
  # Sample 3 has no Sentinel-1: changing its (invalid) values changes nothing.
  noise["sentinel1"] = batch["sentinel1"].at[3].set(123.0)
  (_, metrics2), _ = c.step(c.params, None, noise, key)
  assert float(metrics["loss/sentinel1"]) == float(metrics2["loss/sentinel1"])
  assert float(metrics["count/sentinel1"]) == float(metrics2["count/sentinel1"])


def test_check_batch_errors(batch):
  config = _config("full")
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  geomeld.check_batch(config, shapes)
  geomeld.check_batch(_config("s2_mae"), {k: shapes[k] for k in ("sentinel2", "sentinel2_valid")})

  def broken(**changes):
    out = dict(shapes)
    for k, v in changes.items():
      if v is None:
        del out[k]
      else:
        out[k] = v
    return out

  cases = [
      (broken(sentinel1_valid=None), "missing key 'sentinel1_valid'"),
      (broken(sentinel2=None), "missing key 'sentinel2'"),
      (broken(sentinel1=jax.ShapeDtypeStruct((B, HW, HW, 7), jnp.float32)),
       r"batch\['sentinel1'\]"),
      (broken(esa_worldcover=jax.ShapeDtypeStruct((B, HW, HW), jnp.float32)), "int32"),
      (broken(location_valid=jax.ShapeDtypeStruct((B,), jnp.float32)), "location_valid"),
      (broken(text_tokens=jax.ShapeDtypeStruct((B, 40), jnp.int32)), "text_tokens"),
      (broken(has_caption=None), "has_caption"),
      (broken(sentinel2=jax.ShapeDtypeStruct((B, 36, 36, 12), jnp.float32)), "stride"),
  ]
  for bad, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      geomeld.check_batch(config, bad)


def test_config_validation_and_presets():
  assert _config("s2_mae").loss_terms == ("sentinel2",)
  assert _config("full").loss_terms[-2:] == ("jepa", "itc")
  assert set(_config("mp_mae").targets) == set(mod.PIXEL_MODALITIES) | set(mod.IMAGE_TARGETS)
  with pytest.raises(ValueError, match="unknown preset"):
    geomeld.GeoMeldFMConfig.preset("nope")
  with pytest.raises(ValueError, match="unknown target"):
    geomeld.GeoMeldFMConfig(targets=("sentinel3",))
  with pytest.raises(ValueError, match="unknown loss terms"):
    geomeld.GeoMeldFMConfig(fixed_weights=(("jepa", 1.0),))
  with pytest.raises(ValueError, match="unknown ConvNeXtV2 variant"):
    geomeld.GeoMeldFMConfig(variant="gigantic")
  with pytest.raises(ValueError, match="jepa_context must be one of"):
    geomeld.GeoMeldFMConfig(jepa=True, jepa_context="teacher")
  with pytest.raises(ValueError, match="mask_ratio is 0"):
    geomeld.GeoMeldFMConfig(jepa=True, jepa_context="mae_pass", mask_ratio=0.0)


def test_dwconv_impl_reaches_every_block():
  model = nnx.eval_shape(lambda: geomeld.build(_config("mp_mae", dwconv_impl="taps"),
                                               jax.random.key(0)))
  blocks = [m for _, m in nnx.iter_graph(model) if isinstance(m, convnextv2.Block)]
  assert len(blocks) == 4 + 1  # the micro encoder's 4 stages of 1 block, the decoder's block
  assert {b.dwconv_impl for b in blocks} == {"taps"}


def test_clamp_params_and_encoder_subtree():
  config = _config("mp_mae_itc", decoder_depth=0)
  model_def, params = geomeld.init(config, jax.random.key(0))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, 10.0) if p[0].key in ("logit_scale", "log_vars") else x,
      params)
  clamped = geomeld.clamp_params(config, params)
  np.testing.assert_allclose(float(clamped["logit_scale"][...]), math.log(100.0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(clamped["log_vars"][...]), config.log_var_range[1])
  same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(clamped["decoder"]),
                                               jax.tree.leaves(params["decoder"]))]
  assert all(same)
  model = geomeld.merge(model_def, params)
  enc_state = nnx.split(model.encoder, nnx.Param, ...)[1]
  assert jax.tree.structure(enc_state) == jax.tree.structure(geomeld.encoder_params(params))


@pytest.mark.parametrize("shared", [True, False])
def test_decoder_heads_follow_the_registry(shared):
  targets = ("sentinel2", "esa_worldcover", "month", "terrain_class")
  dec = decoders.MultiPretextDecoder(16, targets, PATCH, width=8, shared=shared,
                                     rngs=nnx.Rngs(0))
  assert set(dec.bodies) == ({"shared"} if shared else set(targets))
  # Only bodies that serve an image target carry the image LayerNorm.
  with_norm = {k for k, body in dec.bodies.items() if body.image_norm is not None}
  assert with_norm == ({"shared"} if shared else {"month", "terrain_class"})
  feats = jnp.ones((2, 3, 3, 16))
  out = dec(feats, jnp.zeros((2, 3, 3), bool).at[:, 0].set(True))
  s2 = mod.pixel_modality("sentinel2").num_bands
  wc = mod.pixel_modality("esa_worldcover").num_classes
  assert out["sentinel2"].shape == (2, 3, 3, PATCH * PATCH * s2)
  assert out["esa_worldcover"].shape == (2, 3, 3, PATCH * PATCH * wc)
  assert out["month"].shape == (2, mod.image_target("month").dims)
  assert out["terrain_class"].shape == (2, len(mod.TERRAIN_CLASSES))
  assert all(v.dtype == jnp.float32 for v in out.values())


def test_unmasked_eval_metric_equals_the_unmasked_training_view(batch):
  # The eval-only metric embeds the whole image; a model trained with
  # vision_embedding='unmasked' scores its in-batch top-1 the same way inside loss_fn.
  config = _config("mp_mae_itc", vision_embedding="unmasked")
  model_def, params = geomeld.init(config, jax.random.key(3))
  _, metrics = jax.jit(lambda p: geomeld.loss_fn(p, None, model_def, batch, jax.random.key(4),
                                                 deterministic=True))(params)
  unmasked = jax.jit(lambda p: geomeld.unmasked_itc_metrics(p, model_def, batch))(params)
  assert float(unmasked["itc/i2t_top1_unmasked"]) == float(metrics["itc/i2t_top1"])
  assert 0.0 <= float(metrics["itc/i2t_top1"]) <= 1.0


def test_cells_without_input_data_are_no_jepa_target(batch):
  """A swath edge: the right half of every tile has no valid Sentinel-2 pixel, so its cells
  (columns 2-3 of the 4x4 grid) hold nothing for JEPA to predict."""
  c = _compiled("full")
  key = jax.random.key(5)
  edge = dict(batch)
  edge["sentinel2_valid"] = batch["sentinel2_valid"].at[:, :, HW // 2:].set(False)
  (loss, metrics), _ = c.step(c.params, c.ema, edge, key)
  _, k_jepa, _ = jax.random.split(key, 3)  # as loss_fn splits its key
  masks, _ = geomeld.jepa_masks(c.config, k_jepa, B, HW // PATCH, HW // PATCH)
  assert float(metrics["count/jepa"]) == float(jnp.sum(masks.target[:, :, :2]))
  assert float(jnp.sum(masks.target[:, :, 2:])) > 0 and np.isfinite(float(loss))


def test_mask_ratio_leaving_no_visible_cell_is_a_clear_error(batch):
  c = _compiled("mp_mae")
  model_def = dataclasses.replace(c.model_def, config=dataclasses.replace(c.config, mask_ratio=0.95))
  with pytest.raises(ValueError, match="mask_ratio 0.95 leaves no visible cell of the 4x4 grid"):
    jax.eval_shape(lambda: geomeld.loss_fn(c.params, None, model_def, batch, jax.random.key(0)))
