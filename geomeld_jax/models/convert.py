"""PyTorch ConvNeXtV2 weights (timm or official FB checkpoints) -> the Flax NNX ConvNeXtV2.

Reading: ``load_torch_state_dict`` reads ``.safetensors`` with numpy alone (the header is
JSON, the tensors raw little-endian bytes) and ``.pt``/``.pth``/``.bin`` with
``torch.load(weights_only=True)``; torch is imported lazily, only there (a test extra).

Naming: official FB keys (``downsample_layers.0.0``, ``stages.i.j.dwconv``, ``pwconv1``,
``grn.gamma`` shaped (1,1,1,C), ``norm``, ``head``) are first renamed to timm's
(``stem.0``, ``stages.i.blocks.j.conv_dw``, ``mlp.fc1``, ``mlp.grn.weight``,
``head.norm``, ``head.fc``) as timm's ``checkpoint_filter_fn`` does; timm keys pass
through. The encoder has no head, so ``head.*`` keys are ignored and listed in the report.

Layouts (objectives.md section 3.2): conv (O, I, kh, kw) -> (kh, kw, I, O) (the depthwise
(C, 1, 7, 7) -> (7, 7, 1, C) too); Linear (out, in) -> (in, out); timm's 1x1-conv MLP of
atto..nano (out, in, 1, 1) -> (in, out); norms and GRN -> (C,).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from geomeld_jax import modalities
from geomeld_jax.models.convnextv2 import ConvNeXtV2

STEM_RULES = ("mean_rgb", "mean")
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "U64": np.dtype("<u8"),
    "BOOL": np.dtype("?"),
}
_MAX_LISTED = 25  # keys shown per category in an error message


@dataclasses.dataclass(frozen=True)
class ConversionReport:
  """What ``convert_to_flax`` did: loaded keys, ignored head keys, skipped stem keys."""

  loaded: tuple[str, ...]
  ignored_head: tuple[str, ...]  # head.* (classifier/final norm): the encoder has none
  skipped_stem: tuple[str, ...]  # stem.* not loaded because the model has the 'patch' stem
  stem_adaptation: str | None  # how the stem kernel was adapted to in_chans, if it was


# --------------------------------------------------------------------------- reading


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Parses a .safetensors file with numpy only."""
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < 8:
    raise ValueError(f"{path}: too short to be a safetensors file ({len(blob)} bytes)")
  header_len = int.from_bytes(blob[:8], "little")
  if header_len <= 0 or 8 + header_len > len(blob):
    raise ValueError(f"{path}: bad safetensors header length {header_len} "
                     f"for a file of {len(blob)} bytes")
  header = json.loads(blob[8:8 + header_len].decode("utf-8"))
  data = memoryview(blob)[8 + header_len:]
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if not 0 <= begin <= end <= len(data) or end - begin != dtype.itemsize * int(np.prod(shape)):
      raise ValueError(f"{path}: tensor {name!r} offsets {begin}..{end} do not match shape "
                       f"{shape} x {dtype} within a {len(data)}-byte data section")
    tensors[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape).copy()
  return tensors


def _read_torch(path: str) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top  (test extra; only this reader needs it)

  obj = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict (a mapping), got {type(obj).__name__}")
  for container in ("model", "state_dict"):  # FB checkpoints wrap the weights in 'model'
    if container in obj and isinstance(obj[container], Mapping):
      obj = obj[container]
      break
  out = {}
  for name, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
      out[name] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    else:
      out[name] = value.numpy().copy()
  return out


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict as numpy arrays (keys as stored; see ``to_timm_names``).

  ``.safetensors`` is parsed without torch; ``.pt``/``.pth``/``.bin`` need torch
  (``torch.load(weights_only=True)``, so nothing but tensors and containers is
  unpickled). A top-level ``'model'`` or ``'state_dict'`` entry (FB checkpoints) is
  unwrapped, and a DistributedDataParallel ``module.`` prefix is dropped.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".safetensors":
    state = _read_safetensors(path)
  elif suffix in (".pt", ".pth", ".bin"):
    state = _read_torch(path)
  else:
    raise ValueError(f"{path}: unknown checkpoint suffix {suffix!r}; "
                     "expected .safetensors, .pt, .pth or .bin")
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


# --------------------------------------------------------------------------- naming


def to_timm_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames official FB ConvNeXt-V2 keys to timm's (timm keys pass through unchanged)."""
  if any(k.startswith("encoder.") for k in state_dict) or "mask_token" in state_dict:
    raise ValueError(
        "this looks like an FCMAE pretraining checkpoint (sparse MinkowskiEngine 'encoder.*' "
        "keys); only dense ConvNeXt-V2 (fine-tuned/timm) checkpoints are supported; remap "
        "its encoder to dense keys first (ConvNeXt-V2 utils.remap_checkpoint_keys)")
  if "downsample_layers.0.0.weight" not in state_dict:
    return dict(state_dict)
  out = {}
  for key, value in state_dict.items():
    key = key.replace("downsample_layers.0.", "stem.")
    key = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
    key = re.sub(r"^downsample_layers\.(\d+)\.(\d+)\.", r"stages.\1.downsample.\2.", key)
    key = key.replace(".dwconv.", ".conv_dw.").replace(".pwconv", ".mlp.fc")
    if ".grn." in key:
      key = key.replace(".grn.gamma", ".mlp.grn.weight").replace(".grn.beta", ".mlp.grn.bias")
      value = np.asarray(value).reshape(-1)
    if key.startswith("head."):
      key = "head.fc." + key[len("head."):]
    elif key.startswith("norm."):
      key = "head." + key
    out[key] = value
  return out


# --------------------------------------------------------------------------- stem rule


def adapt_stem_kernel(kernel: np.ndarray, in_chans: int, *, rule: str = "mean_rgb",
                      rgb_indices: tuple[int, int, int] | None = None) -> np.ndarray:
  """Adapts an RGB stem kernel (O, 3, kh, kw), torch layout, to ``in_chans`` inputs.

  Rules (every kernel is scaled by 3/N, N = in_chans, so that for N bands carrying the
  same signal the conv output equals the RGB model's output on the grey image: the sum
  of N kernels of weight 3/N reproduces the sum of the 3 RGB kernels, keeping the
  activation scale that the following LayerNorm and blocks were trained on):

  * ``'mean_rgb'``: the bands at ``rgb_indices`` (R, G, B) get the R, G and B kernels
    (x 3/N); every other band gets the mean of the three RGB kernels (x 3/N). Sentinel-2
    B4, B3, B2 are red, green and blue, so with N = 12 the default ``rgb_indices`` are
    their registry indices (``modalities.SENTINEL2.band_index``). For N = 3 and the
    default indices (0, 1, 2) the kernel is returned unchanged.
  * ``'mean'``: every band gets the mean RGB kernel (x 3/N), for inputs without RGB bands.
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 4 or kernel.shape[1] != 3:
    raise ValueError(f"stem adaptation needs an RGB kernel (O, 3, kh, kw), got {kernel.shape}")
  if rule not in STEM_RULES:
    raise ValueError(f"unknown stem_rule {rule!r}; known rules: {STEM_RULES}")
  if in_chans < 1:
    raise ValueError(f"in_chans must be positive, got {in_chans}")
  scale = 3.0 / in_chans
  mean_kernel = kernel.astype(np.float64).mean(axis=1, keepdims=True)
  out = np.repeat(mean_kernel * scale, in_chans, axis=1)
  if rule == "mean_rgb":
    if rgb_indices is None:
      rgb_indices = default_rgb_indices(in_chans)
    rgb_indices = tuple(int(i) for i in rgb_indices)
    if len(rgb_indices) != 3 or len(set(rgb_indices)) != 3 or not all(
        0 <= i < in_chans for i in rgb_indices):
      raise ValueError(f"rgb_indices must be 3 distinct band indices in [0, {in_chans}), "
                       f"got {rgb_indices}")
    for color, band in enumerate(rgb_indices):
      out[:, band] = kernel[:, color].astype(np.float64) * scale
  return out.astype(kernel.dtype)


def default_rgb_indices(in_chans: int) -> tuple[int, int, int]:
  """R, G, B input indices: (0, 1, 2) for 3 bands, Sentinel-2 B4, B3, B2 for 12 bands."""
  if in_chans == 3:
    return (0, 1, 2)
  s2 = modalities.SENTINEL2
  if in_chans == s2.num_bands:
    return (s2.band_index("B4"), s2.band_index("B3"), s2.band_index("B2"))
  raise ValueError(
      f"no default RGB bands for {in_chans} input channels (known: 3 = RGB, "
      f"{s2.num_bands} = Sentinel-2); pass rgb_indices=(r, g, b) or stem_rule='mean'")


# --------------------------------------------------------------------------- conversion


def _conv(w: np.ndarray) -> np.ndarray:
  if w.ndim != 4:
    raise ValueError(f"expected a 4-D conv weight, got shape {w.shape}")
  return w.transpose(2, 3, 1, 0)


def _dense(w: np.ndarray) -> np.ndarray:
  if w.ndim == 4 and w.shape[2:] == (1, 1):  # timm conv_mlp (atto..nano): 1x1 Conv2d
    w = w[:, :, 0, 0]
  if w.ndim != 2:
    raise ValueError(f"expected a Linear (out, in) or 1x1 conv weight, got shape {w.shape}")
  return w.T


def _vector(w: np.ndarray) -> np.ndarray:
  return w.reshape(-1)


def _targets(model: ConvNeXtV2) -> dict[str, tuple[nnx.Variable, object]]:
  """timm key -> (the model's variable, layout function)."""
  targets: dict[str, tuple[nnx.Variable, object]] = {}

  def conv(prefix, module):
    targets[prefix + ".weight"] = (module.kernel, _conv)
    targets[prefix + ".bias"] = (module.bias, _vector)

  def dense(prefix, module):
    targets[prefix + ".weight"] = (module.kernel, _dense)
    targets[prefix + ".bias"] = (module.bias, _vector)

  def norm(prefix, module):
    targets[prefix + ".weight"] = (module.scale, _vector)
    targets[prefix + ".bias"] = (module.bias, _vector)

  if model.stem == "original":
    conv("stem.0", model.stem_conv)
    norm("stem.1", model.stem_norm)
  for i, stage in enumerate(model.stages):
    if i > 0:
      norm(f"stages.{i}.downsample.0", model.downsample_norms[i - 1])
      conv(f"stages.{i}.downsample.1", model.downsample_convs[i - 1])
    for j, block in enumerate(stage):
      prefix = f"stages.{i}.blocks.{j}"
      conv(prefix + ".conv_dw", block.dwconv)
      norm(prefix + ".norm", block.norm)
      dense(prefix + ".mlp.fc1", block.pwconv1)
      targets[prefix + ".mlp.grn.weight"] = (block.grn.gamma, _vector)
      targets[prefix + ".mlp.grn.bias"] = (block.grn.beta, _vector)
      dense(prefix + ".mlp.fc2", block.pwconv2)
  return targets


def _listing(title: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def convert_to_flax(state_dict: Mapping[str, np.ndarray], model: ConvNeXtV2, *,
                    stem_rule: str = "mean_rgb",
                    rgb_indices: tuple[int, int, int] | None = None) -> ConversionReport:
  """Fills ``model``'s parameters in place from a timm or FB ConvNeXt-V2 state dict.

  Every stage, block and downsampler weight must be present with a matching shape;
  otherwise a ValueError lists the missing, unexpected and mis-shaped keys, and the model
  is left untouched (all checks run before any write). ``head.*`` keys are ignored.

  Only the 'original' stem is weight-compatible. Converting into a 'patch'-stem model
  loads every stage and downsample weight and leaves the stem as initialised (its keys
  are reported in ``skipped_stem``). When the checkpoint stem is RGB and the model has a
  different ``in_chans``, the stem kernel is adapted by ``stem_rule`` (see
  ``adapt_stem_kernel``; bias and LayerNorm are copied as they are).

  The model may be abstract (``nnx.eval_shape``) when every parameter is loaded, which
  skips the cost of a random init. Returns a ``ConversionReport`` (also logged).
  """
  if stem_rule not in STEM_RULES:
    raise ValueError(f"unknown stem_rule {stem_rule!r}; known rules: {STEM_RULES}")
  state = {k: np.asarray(v) for k, v in to_timm_names(state_dict).items()}
  targets = _targets(model)
  ignored_head = sorted(k for k in state if k.startswith("head."))
  skipped_stem = sorted(k for k in state if k.startswith("stem.")) if model.stem == "patch" else []
  skip = set(ignored_head) | set(skipped_stem)
  unexpected = sorted(k for k in state if k not in targets and k not in skip)
  missing = sorted(k for k in targets if k not in state)

  stem_adaptation = None
  converted: dict[str, np.ndarray] = {}
  misshaped: list[str] = []
  for key, (variable, layout) in targets.items():
    if key not in state:
      continue
    value = state[key]
    if key == "stem.0.weight" and value.ndim == 4 and value.shape[1] != model.in_chans:
      if value.shape[1] != 3:
        misshaped.append(f"{key}: checkpoint stem has {value.shape[1]} input channels, the "
                         f"model {model.in_chans}; only an RGB (3-channel) stem can be adapted")
        continue
      value = adapt_stem_kernel(value, model.in_chans, rule=stem_rule, rgb_indices=rgb_indices)
      stem_adaptation = (f"{stem_rule}: RGB stem -> {model.in_chans} channels, scaled by "
                         f"3/{model.in_chans}")
    try:
      value = layout(value)
    except ValueError as e:
      misshaped.append(f"{key}: {e}")
      continue
    expected = tuple(variable.value.shape)
    if value.shape != expected:
      misshaped.append(f"{key}: checkpoint {tuple(state[key].shape)} -> {value.shape}, "
                       f"model expects {expected}")
      continue
    converted[key] = value

  if missing or unexpected or misshaped:
    parts = [f"checkpoint does not match ConvNeXtV2({model.variant!r}, in_chans="
             f"{model.in_chans}, stem={model.stem!r}):"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        parts.append(_listing(title, items))
    raise ValueError("\n".join(parts))

  for key, value in converted.items():
    variable = targets[key][0]
    variable.value = jnp.asarray(value, dtype=variable.value.dtype)
  report = ConversionReport(loaded=tuple(sorted(converted)), ignored_head=tuple(ignored_head),
                            skipped_stem=tuple(skipped_stem), stem_adaptation=stem_adaptation)
  logging.info("ConvNeXtV2 weights: loaded %d tensors; ignored head keys %s; skipped stem keys "
               "%s; stem adaptation: %s", len(report.loaded), list(report.ignored_head),
               list(report.skipped_stem), report.stem_adaptation)
  return report
