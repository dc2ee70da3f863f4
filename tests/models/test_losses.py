"""Loss functions against plain numpy references, and ITC under an 8-device sharded jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from geomeld_jax import losses


def _rng(seed=0):
  return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------
# numpy references (loops, written independently of the vectorised code).
# ----------------------------------------------------------------------------------------


def _np_patch(x, i, j, p):
  """Patch (i, j) of x (H, W, C) flattened in (row, col, channel) order."""
  return x[i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)


def _np_reconstruction(pred, target, valid, mask, p, norm_pix, eps=1e-6):
  total, count = 0.0, 0
  b, gh, gw, _ = pred.shape
  for n in range(b):
    for i in range(gh):
      for j in range(gw):
        if not mask[n, i, j]:
          continue
        t = _np_patch(target[n], i, j, p).astype(np.float64)
        v = _np_patch(valid[n], i, j, p)
        if norm_pix:
          tv = t[v]
          if tv.size < 2:
            continue
          t = (t - tv.mean()) / np.sqrt(tv.var(ddof=1) + eps)
        d = (pred[n, i, j].astype(np.float64) - t)[v]
        total += np.sum(d ** 2)
        count += v.sum()
  return total / max(count, 1), count


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_clip(img, txt, scale, valid):
  img, txt = img[valid].astype(np.float64), txt[valid].astype(np.float64)
  logits = np.exp(scale) * img @ txt.T
  n = len(img)
  i2t = -np.mean(_np_log_softmax(logits)[np.arange(n), np.arange(n)])
  t2i = -np.mean(_np_log_softmax(logits.T)[np.arange(n), np.arange(n)])
  return 0.5 * (i2t + t2i)


def _np_siglip(img, txt, t, b, valid):
  img, txt = img[valid].astype(np.float64), txt[valid].astype(np.float64)
  logits = np.exp(t) * img @ txt.T + b
  z = 2 * np.eye(len(img)) - 1
  return np.sum(np.log1p(np.exp(-z * logits))) / len(img)


# ----------------------------------------------------------------------------------------
# Patches and MP-MAE losses.
# ----------------------------------------------------------------------------------------


def test_patchify_order_and_round_trip():
  x = _rng().normal(size=(2, 8, 12, 12)).astype(np.float32)
  p = 4
  patches = np.asarray(losses.patchify(jnp.asarray(x), p))
  assert patches.shape == (2, 2, 3, p * p * 12)
  np.testing.assert_array_equal(patches[1, 1, 2], _np_patch(x[1], 1, 2, p))
  np.testing.assert_array_equal(np.asarray(losses.unpatchify(jnp.asarray(patches), p, 12)), x)
  with pytest.raises(ValueError, match="not divisible"):
    losses.patchify(jnp.zeros((1, 6, 8, 1)), 4)


@pytest.fixture(scope="module")
def recon_case():
  r = _rng(1)
  b, p, c, g = 3, 4, 5, 2
  target = r.normal(size=(b, g * p, g * p, c)).astype(np.float32)
  valid = r.random(target.shape) > 0.25
  valid[0, :p, :p] = False  # a fully invalid patch
  valid[0, :p, p:2 * p] = False
  valid[0, 0, p] = True  # a patch with exactly one valid value (no variance)
  target[~valid] = np.nan  # no-data must not leak through the target
  mask = r.random((b, g, g)) > 0.4
  mask[0] = True
  pred = r.normal(size=(b, g, g, p * p * c)).astype(np.float32)
  return pred, target, valid, mask, p


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_matches_numpy(recon_case, norm_pix):
  pred, target, valid, mask, p = recon_case
  loss, count = losses.reconstruction_loss(jnp.asarray(pred), jnp.asarray(target),
                                           jnp.asarray(valid), jnp.asarray(mask), p,
                                           norm_pix=norm_pix)
  ref, ref_count = _np_reconstruction(pred, target, valid, mask, p, norm_pix)
  assert np.isfinite(float(loss))
  assert int(count) == ref_count
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_norm_pix_uses_unbiased_variance():
  p, c = 2, 1
  t = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  target = t.reshape(1, p, p, c)
  pred = jnp.zeros((1, 1, 1, 4))
  loss, _ = losses.reconstruction_loss(pred, jnp.asarray(target), jnp.ones((1, 2, 2, 1), bool),
                                       jnp.ones((1, 1, 1), bool), p, norm_pix=True)
  # sum((t-mean)^2 / var_ddof1) / n = (n-1)/n exactly (up to eps) with ddof=1; 1 with ddof=0.
  np.testing.assert_allclose(float(loss), 3 / 4 * t.var(ddof=1) / (t.var(ddof=1) + 1e-6),
                             rtol=1e-6)


def test_reconstruction_counts_masked_patches_only(recon_case):
  pred, target, valid, mask, p = recon_case
  args = (jnp.asarray(target), jnp.asarray(valid), jnp.asarray(mask), p)
  base = losses.reconstruction_loss(jnp.asarray(pred), *args, norm_pix=True)[0]
  changed = np.where(mask[..., None], pred, pred + 100.0)  # perturb visible patches only
  assert float(losses.reconstruction_loss(jnp.asarray(changed), *args, norm_pix=True)[0]) == \
      float(base)


def test_missing_modality_does_not_bias_the_mean(recon_case):
  pred, target, valid, mask, p = recon_case
  valid_missing = valid.copy()
  valid_missing[1:] = False  # samples 1 and 2 lack the modality entirely
  full = losses.reconstruction_loss(jnp.asarray(pred), jnp.asarray(target),
                                    jnp.asarray(valid_missing), jnp.asarray(mask), p)
  alone = losses.reconstruction_loss(jnp.asarray(pred[:1]), jnp.asarray(target[:1]),
                                     jnp.asarray(valid[:1]), jnp.asarray(mask[:1]), p)
  np.testing.assert_allclose(float(full[0]), float(alone[0]), rtol=1e-6)
  assert float(full[1]) == float(alone[1])
  none = losses.reconstruction_loss(jnp.asarray(pred), jnp.asarray(target),
                                    jnp.zeros_like(jnp.asarray(valid)), jnp.asarray(mask), p)
  assert float(none[0]) == 0.0 and float(none[1]) == 0.0


def test_pixel_ce_matches_numpy_and_ignores_nodata():
  r = _rng(2)
  b, p, k, g = 2, 2, 4, 3
  labels = r.integers(-1, k, (b, g * p, g * p)).astype(np.int32)
  mask = r.random((b, g, g)) > 0.5
  logits = r.normal(size=(b, g, g, p * p * k)).astype(np.float32)
  loss, count = losses.pixel_ce_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask),
                                     p)
  total, n = 0.0, 0
  for s in range(b):
    for i in range(g):
      for j in range(g):
        if not mask[s, i, j]:
          continue
        lp = _np_log_softmax(logits[s, i, j].reshape(p * p, k).astype(np.float64))
        lab = _np_patch(labels[s][..., None], i, j, p)
        for q, y in enumerate(lab):
          if y >= 0:
            total -= lp[q, y]
            n += 1
  assert int(count) == n
  np.testing.assert_allclose(float(loss), total / n, rtol=1e-5)


def test_losses_at_cells_equal_the_full_grid(recon_case):
  """Heads on the masked cells only (`cells`) give the full-grid losses; a padding slot on a
  visible cell (a sample with fewer masked cells than K) counts for nothing."""
  pred, target, valid, mask, p = recon_case
  b, g = mask.shape[0], mask.shape[1]
  k = int(mask.reshape(b, -1).sum(1).max())
  # Masked cells first, then visible ones as padding: every masked cell is within the K slots.
  cells = np.argsort(~mask.reshape(b, -1), axis=1, kind="stable")[:, :k]
  grid = np.arange(b * g * g * 2).reshape(b, g, g, 2)
  picked = np.asarray(losses.at_cells(jnp.asarray(grid), jnp.asarray(cells)))
  assert picked.shape == (b, k, 1, 2)
  np.testing.assert_array_equal(picked[1, :, 0], grid[1].reshape(-1, 2)[cells[1]])
  pred_cells = losses.at_cells(jnp.asarray(pred), jnp.asarray(cells))
  for norm_pix in (False, True):
    full = losses.reconstruction_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid),
                                      jnp.asarray(mask), p, norm_pix=norm_pix)
    at = losses.reconstruction_loss(pred_cells, jnp.asarray(target), jnp.asarray(valid),
                                    jnp.asarray(mask), p, norm_pix=norm_pix,
                                    cells=jnp.asarray(cells))
    assert float(at[1]) == float(full[1])
    np.testing.assert_allclose(float(at[0]), float(full[0]), rtol=1e-6)
  labels = _rng(4).integers(-1, 3, (b, g * p, g * p)).astype(np.int32)
  logits = _rng(5).normal(size=(b, g, g, p * p * 3)).astype(np.float32)
  full = losses.pixel_ce_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), p)
  at = losses.pixel_ce_loss(losses.at_cells(jnp.asarray(logits), jnp.asarray(cells)),
                            jnp.asarray(labels), jnp.asarray(mask), p, cells=jnp.asarray(cells))
  assert float(at[1]) == float(full[1])
  np.testing.assert_allclose(float(at[0]), float(full[0]), rtol=1e-6)


def test_image_level_losses():
  r = _rng(3)
  pred = r.normal(size=(4, 2)).astype(np.float32)
  target = r.normal(size=(4, 2)).astype(np.float32)
  valid = np.array([True, False, True, False])
  target[~valid] = np.nan
  loss, count = losses.image_mse_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid))
  np.testing.assert_allclose(float(loss), np.mean((pred[valid] - target[valid]) ** 2), rtol=1e-6)
  assert float(count) == 4
  logits = r.normal(size=(4, 6)).astype(np.float32)
  labels = np.array([2, -1, 5, 0], np.int32)
  loss, count = losses.image_ce_loss(jnp.asarray(logits), jnp.asarray(labels))
  lp = _np_log_softmax(logits.astype(np.float64))
  keep = labels >= 0
  np.testing.assert_allclose(float(loss), -np.mean(lp[keep, labels[keep]]), rtol=1e-6)
  assert float(count) == 3


# ----------------------------------------------------------------------------------------
# JEPA loss.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
def test_jepa_loss_matches_numpy(kind):
  r = _rng(4)
  pred = r.normal(size=(2, 3, 3, 8)).astype(np.float32) * 2
  teacher = r.normal(size=(2, 3, 3, 8)).astype(np.float32) * 3 + 1
  target_mask = r.random((2, 3, 3)) > 0.5
  loss, count = losses.jepa_loss(jnp.asarray(pred), jnp.asarray(teacher),
                                 jnp.asarray(target_mask), kind=kind)
  t = teacher.astype(np.float64)
  h = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5)
  d = pred - h
  e = np.where(np.abs(d) < 1, 0.5 * d ** 2, np.abs(d) - 0.5) if kind == "smooth_l1" else d ** 2
  np.testing.assert_allclose(float(loss), e.mean(-1)[target_mask].mean(), rtol=1e-5)
  assert int(count) == target_mask.sum()


# ----------------------------------------------------------------------------------------
# ITC.
# ----------------------------------------------------------------------------------------


def _embeddings(b=8, e=6, seed=5):
  r = _rng(seed)
  img = np.asarray(losses.l2_normalize(jnp.asarray(r.normal(size=(b, e)), jnp.float32)))
  txt = np.asarray(losses.l2_normalize(jnp.asarray(r.normal(size=(b, e)), jnp.float32)))
  return img, txt


def test_clip_loss_matches_numpy_with_missing_captions():
  img, txt = _embeddings()
  valid = np.array([True, True, False, True, True, False, True, True])
  loss, count = losses.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(2.3),
                                 jnp.asarray(valid))
  np.testing.assert_allclose(float(loss), _np_clip(img, txt, 2.3, valid), rtol=1e-5)
  assert float(count) == valid.sum()


def test_clip_loss_single_caption_is_absent():
  img, txt = _embeddings(b=4)
  loss, count = losses.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(2.0),
                                 jnp.asarray([False, True, False, False]))
  assert float(loss) == 0.0 and float(count) == 0.0


def test_clip_loss_constant_embeddings_is_ln_b():
  b = 16
  z = jnp.ones((b, 4)) / 2.0
  loss, _ = losses.clip_loss(z, z, jnp.asarray(losses.LOGIT_SCALE_INIT))
  np.testing.assert_allclose(float(loss), math.log(b), rtol=1e-6)


def test_siglip_loss_matches_numpy():
  img, txt = _embeddings(seed=6)
  valid = np.array([True, False, True, True, True, True, False, True])
  loss, count = losses.siglip_loss(jnp.asarray(img), jnp.asarray(txt),
                                   jnp.asarray(losses.SIGLIP_SCALE_INIT), jnp.asarray(-3.0),
                                   jnp.asarray(valid))
  np.testing.assert_allclose(float(loss),
                             _np_siglip(img, txt, losses.SIGLIP_SCALE_INIT, -3.0, valid),
                             rtol=1e-5)
  assert float(count) == valid.sum()
  np.testing.assert_allclose(losses.siglip_bias_for_batch(256), math.log(1 / 255))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_itc_sharded_equals_single_device(kind, axis_type):
  if jax.device_count() < 8:
    pytest.skip("needs the 8 forced CPU devices of tests/conftest.py")
  b = 16  # 2 per device
  img, txt = _embeddings(b=b, e=8, seed=7)
  valid = _rng(8).random(b) > 0.25

  def loss(i, t, s, v):
    if kind == "clip":
      return losses.clip_loss(i, t, s, v)[0]
    return losses.siglip_loss(i, t, s, jnp.asarray(-4.0), v)[0]

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  args = (jnp.asarray(img), jnp.asarray(txt), jnp.asarray(2.0), jnp.asarray(valid))
  ref_loss, ref_grads = step(*args)
  types = {"explicit": jax.sharding.AxisType.Explicit, "auto": jax.sharding.AxisType.Auto}
  mesh = jax.make_mesh((8,), ("data",), axis_types=(types[axis_type],))
  shard = NamedSharding(mesh, P("data"))
  with jax.set_mesh(mesh):
    sharded = (jax.device_put(args[0], shard), jax.device_put(args[1], shard), args[2],
               jax.device_put(args[3], shard))
    out_loss, out_grads = step(*sharded)
  assert len(out_grads[0].sharding.device_set) == 8
  np.testing.assert_allclose(float(out_loss), float(ref_loss), atol=1e-6, rtol=0)
  for got, want in zip(out_grads, ref_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------
# Combination.
# ----------------------------------------------------------------------------------------


def _terms():
  return {
      "a": (jnp.asarray(2.0), jnp.asarray(10.0)),
      "b": (jnp.asarray(0.5), jnp.asarray(3.0)),
      "c": (jnp.asarray(0.0), jnp.asarray(0.0)),  # absent from this batch
  }


def test_uncertainty_weighting_formula_and_absent_term():
  s = jnp.asarray([0.3, -0.7, 1.5])
  total, weights = losses.combine_losses(_terms(), mode="uncertainty", log_vars=s)
  want = math.exp(-0.3) * 2.0 + 0.3 + math.exp(0.7) * 0.5 - 0.7  # "c" contributes nothing
  np.testing.assert_allclose(float(total), want, rtol=1e-6)
  np.testing.assert_allclose(float(weights["b"]), math.exp(0.7), rtol=1e-6)
  grads = jax.grad(lambda v: losses.combine_losses(_terms(), mode="uncertainty", log_vars=v)[0])(s)
  np.testing.assert_allclose(np.asarray(grads), [1 - math.exp(-0.3) * 2.0,
                                                 1 - math.exp(0.7) * 0.5, 0.0], rtol=1e-6)
  clipped, w = losses.combine_losses(_terms(), mode="uncertainty",
                                     log_vars=jnp.asarray([9.0, 0.0, 0.0]), log_var_range=(-2, 2))
  np.testing.assert_allclose(float(w["a"]), math.exp(-2.0), rtol=1e-6)
  np.testing.assert_allclose(float(clipped), math.exp(-2.0) * 2.0 + 2.0 + 0.5, rtol=1e-6)


def test_fixed_weighting():
  total, weights = losses.combine_losses(_terms(), mode="fixed", fixed_weights={"a": 0.25})
  np.testing.assert_allclose(float(total), 0.25 * 2.0 + 0.5, rtol=1e-6)
  assert float(weights["b"]) == 1.0
  with pytest.raises(ValueError, match="unknown loss terms"):
    losses.combine_losses(_terms(), mode="fixed", fixed_weights={"zz": 1.0})
  with pytest.raises(ValueError, match="log_vars"):
    losses.combine_losses(_terms(), mode="uncertainty")
