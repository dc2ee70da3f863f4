"""PyTorch -> Flax ConvNeXtV2 weight conversion: timm parity, FB naming, stem rule, errors."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geomeld_jax import modalities
from geomeld_jax.models import convert
from geomeld_jax.models.convnextv2 import ConvNeXtV2, param_count

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

IMAGE = 64  # px: two 2x2 final grids at stride 32, enough for every stage
BATCH = 2
PARITY_REL_L2 = 1e-5  # objectives.md 3.3: a correct port gives <1e-6; tanh GELU gives 2e-4


def _import_timm():
  """Imports timm; works around a torchvision build that does not match the CPU torch.

  timm imports torchvision, whose _C extension here was built for a CUDA torch; its
  missing ops make `torchvision._meta_registrations` raise at import. Declaring the two
  op schemas it registers fake kernels for lets the pure-Python parts (all timm needs
  for ConvNeXt) import.
  """
  try:
    import timm  # pylint: disable=g-import-not-at-top
    return timm
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
  for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
    del sys.modules[name]
  lib = torch.library.Library("torchvision", "DEF")  # pylint: disable=unused-variable
  lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _import_timm.keepalive = lib  # the schemas live as long as the Library object
  import timm  # pylint: disable=g-import-not-at-top
  return timm


@pytest.fixture(scope="module")
def timm():
  try:
    return _import_timm()
  except ImportError as e:
    pytest.skip(f"timm is not installed (test extra): {e}")


def _timm_model(timm, variant: str, in_chans: int, seed: int):
  """timm convnextv2 in eval mode with every norm, GRN and bias parameter randomised."""
  torch.manual_seed(seed)
  model = timm.create_model(f"convnextv2_{variant}", pretrained=False, num_classes=0,
                            in_chans=in_chans).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # LN / LN2d weight+bias, GRN weight+bias, conv/linear biases
        base = 1.0 if name.endswith("norm.weight") or ".downsample.0.weight" in name or (
            name == "stem.1.weight") else 0.0
        p.copy_(base + 0.3 * torch.randn_like(p))
  return model


def _timm_stages(model, x_nhwc: np.ndarray) -> list[np.ndarray]:
  with torch.no_grad():
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()
    _, stages = model.forward_intermediates(x)
  return [s.permute(0, 2, 3, 1).numpy() for s in stages]


def _rel_l2(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@jax.jit
def _forward(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def _flax_stages(model, x_nhwc) -> list[np.ndarray]:
  graphdef, state = nnx.split(model)
  _, stages = _forward(graphdef, state, jnp.asarray(x_nhwc))
  return [np.asarray(s) for s in stages]


def _abstract_model(variant, in_chans, stem="original"):
  # Abstract: the converter fills every parameter, so the random init would be wasted.
  return nnx.eval_shape(lambda: ConvNeXtV2(variant, in_chans, stem=stem, rngs=nnx.Rngs(0)))


CASES = [("atto", 3), ("atto", 12), ("tiny", 3), ("tiny", 12)]


@pytest.fixture(scope="module")
def parity(timm, tmp_path_factory):
  """Per case: timm stage outputs, Flax stage outputs, both loaded state dicts, reports."""
  out = {}
  tmp = tmp_path_factory.mktemp("ckpt")
  for seed, (variant, in_chans) in enumerate(CASES):
    model = _timm_model(timm, variant, in_chans, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, tmp / f"{variant}{in_chans}.pth")
    safetensors_torch.save_file(state, str(tmp / f"{variant}{in_chans}.safetensors"))
    from_pth = convert.load_torch_state_dict(tmp / f"{variant}{in_chans}.pth")
    from_st = convert.load_torch_state_dict(tmp / f"{variant}{in_chans}.safetensors")
    flax_model = _abstract_model(variant, in_chans)
    report = convert.convert_to_flax(from_st if seed % 2 else from_pth, flax_model)
    x = np.random.default_rng(seed).normal(size=(BATCH, IMAGE, IMAGE, in_chans)).astype(np.float32)
    out[(variant, in_chans)] = dict(
        timm=_timm_stages(model, x), flax=_flax_stages(flax_model, x), pth=from_pth,
        safetensors=from_st, report=report, torch_model=model, flax_model=flax_model)
  return out


@pytest.mark.parametrize("variant,in_chans", CASES)
def test_timm_parity_per_stage(parity, variant, in_chans):
  case = parity[(variant, in_chans)]
  assert len(case["flax"]) == len(case["timm"]) == 4
  for i, (ours, ref) in enumerate(zip(case["flax"], case["timm"])):
    assert ours.shape == ref.shape, (i, ours.shape, ref.shape)
    err = _rel_l2(ours, ref)
    assert err < PARITY_REL_L2, f"stage {i}: relative L2 {err:.2e}"
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_timm_mlp_layouts_both_exercised(parity):
  # atto uses timm's conv_mlp (1x1 Conv2d, 4-D weights), tiny uses nn.Linear (2-D).
  assert parity[("atto", 3)]["pth"]["stages.0.blocks.0.mlp.fc1.weight"].ndim == 4
  assert parity[("tiny", 3)]["pth"]["stages.0.blocks.0.mlp.fc1.weight"].ndim == 2


def test_pth_and_safetensors_read_identically(parity):
  for case in parity.values():
    assert case["pth"].keys() == case["safetensors"].keys()
    for key, value in case["pth"].items():
      assert value.dtype == case["safetensors"][key].dtype
      np.testing.assert_array_equal(value, case["safetensors"][key])


def test_report_lists_ignored_head(parity):
  report = parity[("atto", 12)]["report"]
  assert report.ignored_head == ("head.norm.bias", "head.norm.weight")
  assert report.skipped_stem == () and report.stem_adaptation is None
  assert "stem.0.weight" in report.loaded and "stages.3.blocks.1.mlp.grn.bias" in report.loaded


def _timm_to_fb(state: dict) -> dict:
  """Official FB naming, written independently of the converter's FB -> timm renaming."""
  fb = {}
  for key, value in state.items():
    value = value.clone()
    parts = key.split(".")
    if parts[0] == "stem":
      key = "downsample_layers.0." + ".".join(parts[1:])
    elif parts[0] == "stages" and parts[2] == "downsample":
      key = f"downsample_layers.{parts[1]}." + ".".join(parts[3:])
    elif parts[0] == "stages" and parts[2] == "blocks":
      rest = ".".join(parts[4:])
      rest = {"conv_dw.weight": "dwconv.weight", "conv_dw.bias": "dwconv.bias",
              "mlp.fc1.weight": "pwconv1.weight", "mlp.fc1.bias": "pwconv1.bias",
              "mlp.fc2.weight": "pwconv2.weight", "mlp.fc2.bias": "pwconv2.bias",
              "mlp.grn.weight": "grn.gamma", "mlp.grn.bias": "grn.beta"}.get(rest, rest)
      key = f"stages.{parts[1]}.{parts[3]}.{rest}"
      if rest.startswith("pwconv") and value.ndim == 4:  # FB uses nn.Linear
        value = value[:, :, 0, 0]
      if rest.startswith("grn."):
        value = value.reshape(1, 1, 1, -1)
    elif key.startswith("head.norm."):
      key = key[len("head."):]
    fb[key] = value
  fb["head.weight"] = torch.randn(10, state["head.norm.weight"].shape[0])
  fb["head.bias"] = torch.zeros(10)
  return fb


def test_fb_checkpoint_converts_like_timm(parity, tmp_path):
  case = parity[("atto", 12)]
  fb = _timm_to_fb(case["torch_model"].state_dict())
  assert "stages.0.0.grn.gamma" in fb and fb["stages.0.0.pwconv1.weight"].ndim == 2
  torch.save({"model": fb, "epoch": 7}, tmp_path / "fb.pth")
  loaded = convert.load_torch_state_dict(tmp_path / "fb.pth")
  assert "downsample_layers.0.0.weight" in loaded
  model = _abstract_model("atto", 12)
  report = convert.convert_to_flax(loaded, model)
  assert report.ignored_head == ("head.fc.bias", "head.fc.weight", "head.norm.bias",
                                 "head.norm.weight")
  ours = nnx.state(model, nnx.Param)
  ref = nnx.state(case["flax_model"], nnx.Param)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stem_rule_mean_rgb_arithmetic():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(5, 3, 4, 4)).astype(np.float32)
  # 3 channels (RGB in order): the original kernel, exactly.
  np.testing.assert_array_equal(convert.adapt_stem_kernel(kernel, 3), kernel)
  out = convert.adapt_stem_kernel(kernel, 12)
  s2 = modalities.SENTINEL2
  red, green, blue = s2.band_index("B4"), s2.band_index("B3"), s2.band_index("B2")
  assert (red, green, blue) == (3, 2, 1)
  scale = 3.0 / 12.0
  np.testing.assert_allclose(out[:, red], kernel[:, 0] * scale, rtol=1e-6)
  np.testing.assert_allclose(out[:, green], kernel[:, 1] * scale, rtol=1e-6)
  np.testing.assert_allclose(out[:, blue], kernel[:, 2] * scale, rtol=1e-6)
  others = [b for b in range(12) if b not in (red, green, blue)]
  for band in others:
    np.testing.assert_allclose(out[:, band], kernel.mean(axis=1) * scale, rtol=1e-5, atol=1e-7)
  # The rule's point: summed over bands the adapted kernel equals the RGB sum (grey input).
  np.testing.assert_allclose(out.sum(axis=1), kernel.sum(axis=1), rtol=1e-5, atol=1e-6)
  plain = convert.adapt_stem_kernel(kernel, 5, rule="mean")
  np.testing.assert_allclose(plain, np.repeat(kernel.mean(1, keepdims=True) * 0.6, 5, 1),
                             rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="rgb_indices"):
    convert.adapt_stem_kernel(kernel, 5)
  with pytest.raises(ValueError, match="distinct"):
    convert.adapt_stem_kernel(kernel, 12, rgb_indices=(1, 1, 2))
  with pytest.raises(ValueError, match="stem_rule"):
    convert.adapt_stem_kernel(kernel, 12, rule="copy")


def test_rgb_checkpoint_into_12_bands_matches_on_grey_input(parity):
  """An RGB checkpoint adapted to 12 bands reproduces the RGB network on a grey image."""
  case = parity[("atto", 3)]
  model = _abstract_model("atto", 12)
  report = convert.convert_to_flax(case["pth"], model)
  assert report.stem_adaptation is not None and "3/12" in report.stem_adaptation
  grey = np.random.default_rng(5).normal(size=(BATCH, IMAGE, IMAGE, 1)).astype(np.float32)
  ref = _timm_stages(case["torch_model"], np.repeat(grey, 3, axis=-1))
  ours = _flax_stages(model, np.repeat(grey, 12, axis=-1))
  for i, (a, b) in enumerate(zip(ours, ref)):
    assert _rel_l2(a, b) < PARITY_REL_L2, i


def test_patch_stem_loads_stages_and_keeps_stem(parity):
  case = parity[("atto", 12)]
  model = _abstract_model("atto", 12, stem="patch")
  # Sentinel stem values stand in for an init: the converter must not touch the stem.
  stem_vars = [model.stem_conv.kernel, model.stem_conv.bias, model.stem_norm.scale,
               model.stem_norm.bias, model.stem_patch_conv.kernel, model.stem_patch_conv.bias,
               model.stem_patch_norm.scale, model.stem_patch_norm.bias]
  for n, var in enumerate(stem_vars):
    var.value = jnp.full(var.value.shape, n + 0.5, var.value.dtype)
  report = convert.convert_to_flax(case["pth"], model)
  assert report.skipped_stem == ("stem.0.bias", "stem.0.weight", "stem.1.bias", "stem.1.weight")
  for n, var in enumerate(stem_vars):
    np.testing.assert_array_equal(np.asarray(var.value), n + 0.5)
  ref = case["flax_model"]
  for i in range(4):
    ours = jax.tree.leaves(nnx.state(model.stages[i], nnx.Param))
    theirs = jax.tree.leaves(nnx.state(ref.stages[i], nnx.Param))
    for a, b in zip(ours, theirs, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"stage {i}")
  for ours, theirs in zip(model.downsample_convs, ref.downsample_convs):
    np.testing.assert_array_equal(np.asarray(ours.kernel.value), np.asarray(theirs.kernel.value))


def test_mismatches_raise_listing_keys_and_leave_model_untouched(parity):
  state = dict(parity[("atto", 3)]["pth"])
  model = _abstract_model("atto", 3)
  broken = dict(state)
  del broken["stages.1.blocks.0.mlp.grn.weight"]
  broken["stages.9.blocks.0.extra"] = np.zeros(3, np.float32)
  broken["stages.2.blocks.0.mlp.fc1.bias"] = np.zeros(7, np.float32)
  with pytest.raises(ValueError) as info:
    convert.convert_to_flax(broken, model)
  message = str(info.value)
  assert "missing (1)" in message and "stages.1.blocks.0.mlp.grn.weight" in message
  assert "unexpected (1)" in message and "stages.9.blocks.0.extra" in message
  assert "mis-shaped (1)" in message and "stages.2.blocks.0.mlp.fc1.bias" in message
  # Nothing was written: every parameter is still abstract.
  assert all(isinstance(leaf, jax.ShapeDtypeStruct)
             for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  with pytest.raises(ValueError, match="mis-shaped"):  # atto weights into femto
    convert.convert_to_flax(state, _abstract_model("femto", 3))
  with pytest.raises(ValueError, match="FCMAE"):
    convert.convert_to_flax({"encoder.stages.0.0.dwconv.kernel": np.zeros(1)}, model)


def test_safetensors_reader_needs_no_torch(parity, tmp_path, monkeypatch):
  tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
             "b": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
             "c": torch.tensor([[1, 2]], dtype=torch.int64)}
  safetensors_torch.save_file(tensors, str(tmp_path / "t.safetensors"))
  monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
  loaded = convert.load_torch_state_dict(tmp_path / "t.safetensors")
  np.testing.assert_array_equal(loaded["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
  assert loaded["b"].dtype.name == "bfloat16"
  np.testing.assert_array_equal(loaded["b"].astype(np.float32), [1.5, -2.25])
  np.testing.assert_array_equal(loaded["c"], [[1, 2]])
  with pytest.raises(ValueError, match="suffix"):
    (tmp_path / "w.npz").write_bytes(b"x")
    convert.load_torch_state_dict(tmp_path / "w.npz")
  with pytest.raises(FileNotFoundError):
    convert.load_torch_state_dict(tmp_path / "absent.safetensors")


def test_param_count_matches_timm(parity):
  for (variant, in_chans), case in parity.items():
    timm_count = sum(p.numel() for name, p in case["torch_model"].named_parameters()
                     if not name.startswith("head."))
    assert param_count(case["flax_model"]) == timm_count, (variant, in_chans)
