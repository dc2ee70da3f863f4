"""ConvNeXtV2 backbone: configs, shapes, FCMAE masking invariants, GRN, init, precision."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from geomeld_jax.models import convnextv2 as cv

# (depths, dims) from ConvNeXt-V2 models/convnextv2.py (objectives.md 1.4).
EXPECTED_VARIANTS = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}
BANDS = 12


def _materialise(model, seed: int):
  """Fills an abstract model with seeded numpy values: kernels N(0, 0.05), every 1-D
  parameter (norms, GRN, biases) random, so GRN and LN are far from identity.

  numpy instead of the module's own init: each new parameter shape would cost a jax
  compile, several seconds per model.
  """
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  filled = []
  for leaf in leaves:
    if len(leaf.shape) == 1:
      filled.append(jnp.asarray(0.5 + 0.3 * rng.normal(size=leaf.shape), leaf.dtype))
    else:
      filled.append(jnp.asarray(0.05 * rng.normal(size=leaf.shape), leaf.dtype))
  nnx.update(model, jax.tree.unflatten(treedef, filled))
  return model


def _abstract(variant, in_chans, **kwargs):
  return nnx.eval_shape(lambda: cv.ConvNeXtV2(variant, in_chans, rngs=nnx.Rngs(0), **kwargs))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, mask):
  return nnx.merge(graphdef, state)(x, mask)


def _run(model, x, mask=None):
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, x, mask)


@pytest.fixture(scope="module")
def atto_patch():
  """atto, 12 bands, patch stem with patch 16 (2x2 depthwise stem): 64 px -> 4x4 grid."""
  return _materialise(_abstract("atto", BANDS, stem="patch", patch_size=16), seed=1)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 64, 64, BANDS)), jnp.float32)
  mask = cv.random_patch_mask(jax.random.key(3), 2, 4, 4, mask_ratio=0.6)
  return x, mask


def _block_params(d: int) -> int:
  # dwconv 49d+d, LN 2d, fc1 4d^2+4d, GRN 8d, fc2 4d^2+d
  return 8 * d * d + 65 * d


def _expected_params(variant, in_chans, stem, patch_size=16) -> int:
  depths, dims = EXPECTED_VARIANTS[variant]
  d0 = dims[0]
  if stem == "original":
    total = 16 * in_chans * d0 + d0 + 2 * d0
  else:
    k = patch_size // 8
    total = 9 * in_chans * d0 + d0 + 2 * d0 + k * k * d0 + d0 + 2 * d0
  for i in range(3):
    total += 2 * dims[i] + 4 * dims[i] * dims[i + 1] + dims[i + 1]
  return total + sum(depth * _block_params(dim) for depth, dim in zip(depths, dims))


def test_variant_table_and_unknown_variant():
  assert cv.VARIANTS == EXPECTED_VARIANTS
  with pytest.raises(ValueError, match="atto.*tiny"):
    cv.ConvNeXtV2("gigantic", 3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("variant", sorted(EXPECTED_VARIANTS))
def test_every_variant_config_and_param_count(variant):
  depths, dims = EXPECTED_VARIANTS[variant]
  assert cv.variant_config(variant) == (depths, dims)
  if variant in ("base", "large", "huge"):
    return  # abstract construction still traces every init: skip the big ones
  model = _abstract(variant, BANDS, stem="patch", patch_size=16)
  assert (model.depths, model.dims, model.stride, model.in_chans) == (depths, dims, 16, BANDS)
  assert [len(stage) for stage in model.stages] == list(depths)
  assert cv.param_count(model) == _expected_params(variant, BANDS, "patch")
  original = _abstract(variant, 3, stem="original")
  assert original.stride == 32
  assert cv.param_count(original) == _expected_params(variant, 3, "original")


def test_forward_shapes_128px_patch16():
  # 128-px tile, patch 16 -> 8x8 grid; abstract evaluation, no compute.
  model = _abstract("atto", BANDS, stem="patch", patch_size=16)
  graphdef, state = nnx.split(model)
  out, stages = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                               jax.ShapeDtypeStruct((2, 128, 128, BANDS), jnp.float32))
  assert out.shape == (2, 8, 8, 320)
  assert [s.shape for s in stages] == [(2, 64, 64, 40), (2, 32, 32, 80), (2, 16, 16, 160),
                                       (2, 8, 8, 320)]


def test_mmearth_atto_param_count():
  # mmearth_peer.md 2.1: atto encoder, 12 bands, modified stem ~ 3.39M.
  assert cv.param_count(_abstract("atto", 12)) == 3_389_440


def test_forward_shapes_patch_and_original(atto_patch, inputs):
  x, mask = inputs
  out, stages = _run(atto_patch, x)
  assert out.shape == (2, 4, 4, 320)
  assert [s.shape for s in stages] == [(2, 32, 32, 40), (2, 16, 16, 80), (2, 8, 8, 160),
                                       (2, 4, 4, 320)]
  assert atto_patch.grid_shape(64, 64) == (4, 4)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(stages[-1]))
  assert np.isfinite(np.asarray(out)).all()


def test_bad_inputs_raise_before_compute(atto_patch, inputs):
  x, mask = inputs
  with pytest.raises(ValueError, match="channels"):
    atto_patch(x[..., :3])
  with pytest.raises(ValueError, match="divisible"):
    atto_patch(x[:, :60])
  with pytest.raises(ValueError, match="final grid"):
    atto_patch(x, mask[:, :3])
  with pytest.raises(ValueError, match="channels-last"):
    atto_patch(x[0])
  with pytest.raises(ValueError, match="multiple of 8"):
    cv.ConvNeXtV2("atto", 12, stem="patch", patch_size=12, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="stem"):
    cv.ConvNeXtV2("atto", 12, stem="conv", rngs=nnx.Rngs(0))


def test_random_patch_mask_counts_and_independence():
  for ratio, (gh, gw) in ((0.6, (8, 8)), (0.75, (4, 6))):
    num_cells = gh * gw
    mask = jax.jit(cv.random_patch_mask, static_argnums=(1, 2, 3, 4))(
        jax.random.key(0), 16, gh, gw, ratio)
    assert mask.dtype == jnp.bool_ and mask.shape == (16, gh, gw)
    expected = num_cells - int(num_cells * (1 - ratio))
    np.testing.assert_array_equal(np.asarray(mask).sum(axis=(1, 2)), expected)
    assert len({np.asarray(m).tobytes() for m in mask}) > 1  # per-sample, not shared
  # 8x8 at 0.6: int(64 * 0.4) = 25 kept, 39 masked (FCMAE's truncation).
  assert int(cv.random_patch_mask(jax.random.key(1), 1, 8, 8).sum()) == 39
  with pytest.raises(ValueError, match="mask_ratio"):
    cv.random_patch_mask(jax.random.key(0), 1, 2, 2, 1.0)


def test_upsample_mask_nearest():
  mask = jnp.asarray([[[True, False], [False, True]]])
  up = cv.upsample_mask(mask, 3)
  assert up.shape == (1, 6, 6)
  np.testing.assert_array_equal(np.asarray(up[0, :3, :3]), True)
  np.testing.assert_array_equal(np.asarray(up[0, :3, 3:]), False)
  np.testing.assert_array_equal(np.asarray(cv.upsample_mask(mask[..., None], 2)[0, :, :, 0]),
                                np.kron(np.asarray(mask[0]), np.ones((2, 2), bool)))


def _assert_masked_invariance(model, x, mask):
  """Perturbing masked pixels must leave every visible output exactly unchanged."""
  pixel_mask = cv.upsample_mask(mask, model.stride)[..., None] != 0
  noise = jax.random.normal(jax.random.key(9), x.shape) * 10.0
  perturbed = jnp.where(pixel_mask, x + noise, x)
  out_a, stages_a = _run(model, x, mask)
  out_b, stages_b = _run(model, perturbed, mask)
  grid = mask.shape[1]
  for i, (a, b) in enumerate(zip(stages_a + [out_a], stages_b + [out_b])):
    stage_mask = np.asarray(cv.upsample_mask(mask, a.shape[1] // grid))[..., None] != 0
    a, b = np.asarray(a), np.asarray(b)
    visible = np.broadcast_to(~stage_mask, a.shape)
    assert visible.any() and (~visible).any()
    np.testing.assert_array_equal(a[visible], b[visible], err_msg=f"stage {i} leaks")
    np.testing.assert_array_equal(a[~visible], 0.0)  # encoder output masked
    assert np.abs(a[visible]).max() > 0


def test_fcmae_masked_pixels_do_not_leak(atto_patch, inputs):
  x, mask = inputs
  _assert_masked_invariance(atto_patch, x, mask)


def test_fcmae_original_stem_masked_pixels_do_not_leak():
  model = _materialise(_abstract("femto", 5, stem="original"), seed=2)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 5))
  mask = jnp.asarray([[[1, 0], [0, 0]], [[0, 1], [1, 0]]], jnp.float32)  # float masks work
  _assert_masked_invariance(model, x, mask)


def test_all_visible_mask_equals_unmasked_bit_for_bit(atto_patch, inputs):
  x, _ = inputs
  out, stages = _run(atto_patch, x)
  out_v, stages_v = _run(atto_patch, x, jnp.zeros((2, 4, 4), bool))
  for a, b in zip(stages + [out], stages_v + [out_v]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _loss_and_grad(graphdef, state, x, mask, max_visible_cells):
  def loss(state):
    out, stages = nnx.merge(graphdef, state)(x, mask, max_visible_cells=max_visible_cells)
    return jnp.sum(jnp.square(out)), stages
  return jax.value_and_grad(loss, has_aux=True)(state)


def _assert_same_as_dense(graphdef, state, x, mask, max_visible_cells):
  (loss_d, stages_d), grads_d = _loss_and_grad(graphdef, state, x, mask, None)
  (loss_s, stages_s), grads_s = _loss_and_grad(graphdef, state, x, mask, max_visible_cells)
  np.testing.assert_allclose(loss_s, loss_d, rtol=1e-5)
  for a, b in zip(stages_s, stages_d):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_d)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3,
                               atol=1e-5 * float(np.abs(np.asarray(b)).max()) + 1e-12)


def test_visible_cells_path_equals_dense_masked_path(atto_patch):
  """The gathered (sparse) MLP gives the dense masked encoder's outputs and gradients."""
  x = jax.random.normal(jax.random.key(5), (3, 64, 64, BANDS))
  mask = cv.random_patch_mask(jax.random.key(6), 3, 4, 4, mask_ratio=0.6)
  visible_cells = cv.num_visible_cells(4, 4, 0.6)
  assert visible_cells == 6
  _assert_same_as_dense(*nnx.split(atto_patch), x, mask, visible_cells)


def test_padded_cell_slots_equal_dense_masked_path(atto_patch):
  """Samples with fewer visible cells than the bound (a thinned JEPA context) fill the
  spare slots with masked cells; GRN must ignore them and re-masking must erase them."""
  x = jax.random.normal(jax.random.key(9), (3, 64, 64, BANDS))
  visible_counts = np.array([8, 3, 0])
  rank = np.argsort(np.random.default_rng(2).random((3, 16)), axis=1)
  mask = jnp.asarray((rank >= visible_counts[:, None]).reshape(3, 4, 4))
  cells, filled, fits = cv.visible_cell_indices(mask, 8)
  np.testing.assert_array_equal(np.asarray(filled).sum(1), visible_counts)
  assert np.asarray(fits).all()
  flat = np.asarray(mask).reshape(3, 16)
  for i, n in enumerate(visible_counts):  # visible cells first, in raster order, then padding
    np.testing.assert_array_equal(np.asarray(cells[i, :n]), np.flatnonzero(~flat[i]))
    assert flat[i, np.asarray(cells[i, n:])].all()
  _assert_same_as_dense(*nnx.split(atto_patch), x, mask, 8)


def test_more_visible_cells_than_the_bound_poisons_only_that_sample(atto_patch):
  x = jax.random.normal(jax.random.key(7), (2, 64, 64, BANDS))
  mask = cv.random_patch_mask(jax.random.key(8), 2, 4, 4, mask_ratio=0.5)
  masked_cell = int(np.flatnonzero(np.asarray(mask[1]).ravel())[0])
  mask = mask.at[1, masked_cell // 4, masked_cell % 4].set(False)  # sample 1: 9 visible > 8
  graphdef, state = nnx.split(atto_patch)
  (_, stages), _ = _loss_and_grad(graphdef, state, x, mask, 8)
  for stage in stages:
    assert np.isfinite(np.asarray(stage[0])).all() and np.isnan(np.asarray(stage[1])).all()
  with pytest.raises(ValueError, match="max_visible_cells needs a mask"):
    atto_patch(x, None, max_visible_cells=8)
  with pytest.raises(ValueError, match=r"max_visible_cells must be in \[1, 16\], got 0"):
    atto_patch(x, mask, max_visible_cells=0)


def test_stem_patch_depthwise_equals_the_grouped_conv(atto_patch):
  """The stem's windowed multiply-and-sum is the depthwise conv its parameters describe."""
  x = jax.random.normal(jax.random.key(11), (2, 32, 32, 40))
  graphdef, state = nnx.split(atto_patch)

  def outputs(state, use_conv):
    model = nnx.merge(graphdef, state)
    y = model.stem_patch_conv(x) if use_conv else model._stem_patch_depthwise(x)
    return jnp.sum(jnp.square(y)), y

  (_, y_conv), g_conv = jax.value_and_grad(outputs, has_aux=True)(state, True)
  (_, y_sum), g_sum = jax.value_and_grad(outputs, has_aux=True)(state, False)
  np.testing.assert_allclose(np.asarray(y_sum), np.asarray(y_conv), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_sum.stem_patch_conv), jax.tree.leaves(g_conv.stem_patch_conv)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(np.abs(np.asarray(b)).max()))
  assert y_conv.shape == (2, 16, 16, 40)


@pytest.mark.parametrize("kernel_size", [7, 3])
def test_depthwise_conv_taps_equals_the_grouped_conv(kernel_size):
  """Values and both gradients (hand-written VJP) of the sum of taps against lax.conv; a
  non-square input and a cotangent that is not all ones catch a transposed or unflipped tap."""
  kx, kk, kg = jax.random.split(jax.random.key(12), 3)
  x = jax.random.normal(kx, (2, 12, 9, 5))
  kernel = jax.random.normal(kk, (kernel_size, kernel_size, 5))
  weights = jax.random.normal(kg, (2, 12, 9, 5))
  pad = kernel_size // 2

  def grouped(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel[:, :, None, :], (1, 1), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=5,
        precision=jax.lax.Precision.HIGHEST)

  def loss(fn):
    return jax.value_and_grad(lambda x, k: jnp.sum(weights * fn(x, k)), argnums=(0, 1))

  (v_conv, (dx_conv, dk_conv)) = loss(grouped)(x, kernel)
  (v_taps, (dx_taps, dk_taps)) = jax.jit(loss(cv.depthwise_conv_taps))(x, kernel)
  np.testing.assert_allclose(np.asarray(cv.depthwise_conv_taps(x, kernel)),
                             np.asarray(grouped(x, kernel)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(v_taps), float(v_conv), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dx_taps), np.asarray(dx_conv), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dk_taps), np.asarray(dk_conv), rtol=1e-5, atol=1e-4)
  # bfloat16 in and out, float32 sums inside.
  y16 = cv.depthwise_conv_taps(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(grouped(x, kernel)),
                             rtol=0.05, atol=0.1)


def test_block_taps_equals_the_conv_block():
  """dwconv_impl='taps' is the same block: same params, output and gradients, masked too."""
  conv_block = cv.Block(16, rngs=nnx.Rngs(3))
  _materialise(conv_block, seed=4)  # random biases, GRN and LN affine: nothing is zero
  graphdef, state = nnx.split(conv_block)
  taps_graphdef, taps_state = nnx.split(cv.Block(16, dwconv_impl="taps", rngs=nnx.Rngs(0)))
  assert jax.tree.structure(taps_state) == jax.tree.structure(state)
  x = jax.random.normal(jax.random.key(6), (2, 8, 8, 16))
  mask = jax.random.bernoulli(jax.random.key(7), 0.5, (2, 8, 8, 1))

  def value_and_grad(gd):
    return jax.jit(jax.value_and_grad(
        lambda st: jnp.sum(jnp.square(nnx.merge(gd, st)(x, mask)))))(state)

  v_conv, g_conv = value_and_grad(graphdef)
  v_taps, g_taps = value_and_grad(taps_graphdef)
  np.testing.assert_allclose(float(v_taps), float(v_conv), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_taps), jax.tree.leaves(g_conv)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(np.abs(np.asarray(b)).max()) + 1e-12)
  with pytest.raises(ValueError, match="unknown dwconv_impl"):
    cv.Block(16, dwconv_impl="fft", rngs=nnx.Rngs(0))


def test_gather_scatter_cells_round_trip():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  cells = jnp.asarray([[0, 3], [2, 1]])  # a 2x2 grid of 4x4-pixel cells
  tokens = cv.gather_cells(x, cells, 4)
  assert tokens.shape == (2, 2 * 16, 3)
  np.testing.assert_array_equal(tokens[0, :16].reshape(4, 4, 3), x[0, :4, :4])
  np.testing.assert_array_equal(tokens[1, :16].reshape(4, 4, 3), x[1, 4:, :4])
  back = cv.scatter_cells(tokens, cells, 4, 8, 8)
  keep = np.zeros((2, 8, 8, 1), bool)
  keep[0, :4, :4] = keep[0, 4:, 4:] = keep[1, 4:, :4] = keep[1, :4, 4:] = True
  np.testing.assert_array_equal(back, np.where(keep, x, 0.0))


def _grn_numpy(x, gamma, beta, mask=None):
  x = x.astype(np.float64)
  visible = x if mask is None else np.where(mask, 0.0, x)
  gx = np.sqrt((visible ** 2).sum(axis=(1, 2), keepdims=True) + 1e-6)
  nx = gx / (gx.mean(axis=-1, keepdims=True) + 1e-6)
  return gamma * (x * nx) + beta + x


@functools.partial(jax.jit, static_argnums=0)
def _grn_apply(graphdef, state, x, mask):
  return nnx.merge(graphdef, state)(x, mask)


def test_grn_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
  mask = rng.random(size=(2, 5, 6, 1)) < 0.5
  grn = cv.GRN(7)
  graphdef, zero_state = nnx.split(grn)
  np.testing.assert_array_equal(np.asarray(_grn_apply(graphdef, zero_state, x, None)), x)
  gamma, beta = rng.normal(size=7), rng.normal(size=7)
  grn.gamma.value = jnp.asarray(gamma, jnp.float32)
  grn.beta.value = jnp.asarray(beta, jnp.float32)
  state = nnx.state(grn)
  np.testing.assert_allclose(np.asarray(_grn_apply(graphdef, state, x, None)),
                             _grn_numpy(x, gamma, beta), rtol=1e-5, atol=1e-5)
  a = np.asarray(_grn_apply(graphdef, state, x, mask))
  np.testing.assert_allclose(a, _grn_numpy(x, gamma, beta, mask), rtol=1e-5, atol=1e-5)
  # Statistics ignore masked sites: changing them changes no visible output.
  changed = np.where(mask, 100.0, x).astype(np.float32)
  b = np.asarray(_grn_apply(graphdef, state, changed, mask))
  visible = np.broadcast_to(~mask, a.shape)
  np.testing.assert_array_equal(a[visible], b[visible])


def test_grn_gradient_finite_for_all_zero_channel():
  grn = cv.GRN(4)
  grn.gamma.value = jnp.asarray([0.5, -1.0, 2.0, 0.3])
  grn.beta.value = jnp.asarray([0.1, 0.2, 0.3, 0.4])
  graphdef, state = nnx.split(grn)

  @jax.jit
  def grads(state, x):
    loss = lambda s, v: jnp.sum(nnx.merge(graphdef, s)(v) ** 2)
    return jax.grad(loss, argnums=(0, 1))(state, x)

  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4)).at[..., 1].set(0.0)
  for inp in (x, jnp.zeros_like(x)):
    grad_state, grad_x = grads(state, inp)
    assert np.isfinite(np.asarray(grad_x)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad_state))


def test_no_data_strip_does_not_blow_up_the_initial_gradient(inputs):
  """Zero (no-data) input over a whole 3x3 neighbourhood gave the stem LayerNorm an all-equal
  vector when the stem bias started at zero: zero variance, a 1000x backward per norm, and
  here a gradient norm of 7e5 against 0.7 (2.4e9 against 42 in the MP-MAE loss)."""
  make = lambda: cv.ConvNeXtV2("atto", BANDS, stem="patch", patch_size=16, rngs=nnx.Rngs(1))
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  state = jax.jit(lambda: nnx.split(make())[1])()  # the module's own init, one compile
  x, _ = inputs
  # A loss with a gradient everywhere, also where the features are 0 (as a decoder's is).
  weights = jax.random.normal(jax.random.key(1), (2, 4, 4, 320))

  @jax.jit
  def grad_norm(state, x):
    loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(x)[0] * weights)
    return optax.global_norm(jax.grad(loss)(state))

  strip = x.at[:, :, 40:].set(0.0)  # the right columns of both tiles are no data
  ratio = float(grad_norm(state, strip) / grad_norm(state, x))
  assert 0.1 < ratio < 10.0, ratio


def test_kernel_init_matches_timm_trunc_normal():
  # timm's trunc_normal_(std=.02) has absolute bounds +-2: in effect untruncated N(0, .02^2)
  # (jax's default +-2 sigma truncation would give std 0.0176 and max 0.04).
  kernel = np.asarray(cv.KERNEL_INIT(jax.random.key(0), (300, 300)))
  assert 0.0197 < kernel.std() < 0.0203 and np.abs(kernel).max() > 0.07


@pytest.fixture(scope="module")
def block():
  return cv.Block(24, drop_path=0.5, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _block_apply(graphdef, state, x, deterministic, key):
  return nnx.merge(graphdef, state)(x, deterministic=deterministic, rngs=key)


def test_block_init(block):
  assert block.dwconv.kernel.value.shape == (7, 7, 1, 24)
  assert block.pwconv1.kernel.value.shape == (24, 96)
  assert block.pwconv2.kernel.value.shape == (96, 24)
  assert 0.015 < float(jnp.std(block.pwconv1.kernel.value)) < 0.025
  np.testing.assert_array_equal(np.asarray(block.pwconv1.bias.value), 0.0)
  np.testing.assert_array_equal(np.asarray(block.dwconv.bias.value), 0.0)
  np.testing.assert_array_equal(np.asarray(block.norm.scale.value), 1.0)
  np.testing.assert_array_equal(np.asarray(block.norm.bias.value), 0.0)
  np.testing.assert_array_equal(np.asarray(block.grn.gamma.value), 0.0)
  np.testing.assert_array_equal(np.asarray(block.grn.beta.value), 0.0)


def test_block_drop_path_is_per_sample_and_rescaled(block):
  graphdef, state = nnx.split(block)
  x = jax.random.normal(jax.random.key(1), (64, 4, 4, 24))
  key = jax.random.key(5)
  dense = np.asarray(_block_apply(graphdef, state, x, True, key))
  y = np.asarray(_block_apply(graphdef, state, x, False, key))
  x, branch = np.asarray(x), dense - np.asarray(x)
  assert np.abs(branch).max() > 1e-3
  kept = ~np.all(y == x, axis=(1, 2, 3))
  assert 10 < kept.sum() < 54  # one draw per sample, about half kept
  np.testing.assert_allclose(y[kept], (x + 2.0 * branch)[kept], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(y[~kept], x[~kept])


def test_bfloat16_compute_close_to_float32(atto_patch, inputs):
  x, mask = inputs
  model16 = _abstract("atto", BANDS, stem="patch", patch_size=16, dtype=jnp.bfloat16)
  nnx.update(model16, nnx.state(atto_patch, nnx.Param))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model16)))
  ref, _ = _run(atto_patch, x, mask)
  out, stages = _run(model16, x, mask)
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out.astype(jnp.float32))
  assert np.isfinite(out).all() and all(np.isfinite(np.asarray(s)).all() for s in stages)
  rel = np.linalg.norm(out - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
  assert rel < 5e-2, rel
