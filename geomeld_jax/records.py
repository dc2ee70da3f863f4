"""The GeoMeld record: TFDS features, serialisation and decoding.

One record is one tile. data_prep writes records with `features().serialize_example(...)`
into TFDS ArrayRecord shards; `tfds.data_source`, grain and the input pipeline read them
back with `decode(...)`. Pixel modalities are stored in the registry's compact dtypes as
raw bytes (channels-last), so a record is a tf.train.Example of a few byte strings. No
pickle is involved anywhere.

Record fields
-------------
``tile_id`` (text), ``source`` (text: where the tile came from, for provenance),
``lat``, ``lon`` (float32, degrees; NaN when unknown), ``date`` (text ``YYYY-MM-DD`` or ''),
``terrain_class`` (text, '' when unknown), ``water_percentage`` (float32, NaN when unknown),
``metadata_json`` (text: the source metadata, e.g. osm_tags, water_analysis, synthetic flag),
``block_id`` (text: the spatial block that decided the split),
``captions`` (sequence of text, possibly empty), ``caption_provenance`` (text JSON, '' when
the captions came with the source), and one ``uint8/int16/uint16`` tensor per pixel modality
of the registry, shape ``(128, 128, C)``.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from geomeld_jax import modalities as mod

RECORD_VERSION = "1.0.0"

# A dataset directory (data_prep.writer writes it, the input pipeline finds it) is built as
# "<version>.incomplete-<id>" and renamed into place when whole; these files, written last,
# mark it complete.
INCOMPLETE_MARKER = ".incomplete-"
COMPLETION_FILES = ("dataset_info.json", "manifest.json")

SCALAR_TEXT_FIELDS = ("tile_id", "source", "date", "terrain_class", "metadata_json", "block_id",
                      "caption_provenance")
SCALAR_FLOAT_FIELDS = ("lat", "lon", "water_percentage")


def features(tile_size: int = mod.TILE_SIZE):
  """The TFDS FeaturesDict of a GeoMeld record (imports tfds lazily: it is slow to import)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  spec: dict[str, Any] = {name: tfds.features.Text() for name in SCALAR_TEXT_FIELDS}
  spec.update({name: tfds.features.Scalar(dtype=np.float32) for name in SCALAR_FLOAT_FIELDS})
  spec["captions"] = tfds.features.Sequence(tfds.features.Text())
  for m in mod.PIXEL_MODALITIES.values():
    spec[m.name] = tfds.features.Tensor(
        shape=(tile_size, tile_size, m.num_bands),
        dtype=m.storage_dtype,
        encoding=tfds.features.Encoding.BYTES,
        doc=f"{m.description}; stored = (physical - offset) / scale, no data = {m.nodata_stored}",
    )
  return tfds.features.FeaturesDict(spec)


def empty_modality(modality: mod.PixelModality, tile_size: int = mod.TILE_SIZE) -> np.ndarray:
  """A stored array meaning "this modality is missing": every pixel is no-data."""
  return np.full((tile_size, tile_size, modality.num_bands), modality.nodata_stored,
                 modality.storage_dtype)


def check_example(example: Mapping[str, Any], tile_size: int = mod.TILE_SIZE) -> None:
  """Raises ValueError naming the field when an example dict does not match the schema."""
  for name in SCALAR_TEXT_FIELDS:
    if not isinstance(example.get(name), str):
      raise ValueError(f"record field {name!r} must be str, got {type(example.get(name))}")
  for name in SCALAR_FLOAT_FIELDS:
    if not isinstance(example.get(name), (float, np.floating)):
      raise ValueError(f"record field {name!r} must be float, got {type(example.get(name))}")
  caps = example.get("captions")
  if not isinstance(caps, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in caps):
    raise ValueError("record field 'captions' must be a list of non-empty str")
  for m in mod.PIXEL_MODALITIES.values():
    a = example.get(m.name)
    want = (tile_size, tile_size, m.num_bands)
    if not isinstance(a, np.ndarray) or a.shape != want or a.dtype != m.storage_dtype:
      got = (getattr(a, "shape", None), getattr(a, "dtype", type(a)))
      raise ValueError(f"record field {m.name!r} must be {m.storage_dtype}{want}, got {got}")
  json.loads(example["metadata_json"] or "{}")


class Normalizer:
  """Per-band z-scoring with the build's statistics (``statistics.json``).

  Statistics are in physical units; normalisation works from stored values directly
  (``(stored * scale + offset - mean) / std`` folded into one multiply-add per band), with
  numpy on the host or jax.numpy inside the jitted train step (where it is free, and the host
  ships compact integers instead of float32 + masks).
  """

  def __init__(self, statistics: Mapping[str, Any]):
    self.mul: dict[str, np.ndarray] = {}
    self.add: dict[str, np.ndarray] = {}
    for m in mod.PIXEL_MODALITIES.values():
      if m.normalization is not mod.Normalization.ZSCORE:
        continue
      try:
        st = statistics[m.name]
      except KeyError:
        raise KeyError(f"statistics have no entry for modality {m.name!r}") from None
      if list(st["bands"]) != list(m.bands):
        raise ValueError(f"statistics for {m.name} list bands {st['bands']}, registry has {m.bands}")
      mean = np.asarray(st["mean"], np.float64)
      std = np.asarray(st["std"], np.float64)
      # A band never observed in training (count 0) has mean NaN: it is always invalid, so its
      # value never matters; keep the arithmetic finite.
      mean = np.where(np.isfinite(mean), mean, 0.0)
      std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
      self.mul[m.name] = (m.band_scale() / std).astype(np.float32)
      self.add[m.name] = ((m.band_offset() - mean) / std).astype(np.float32)

  @classmethod
  def from_file(cls, path) -> "Normalizer":
    with open(path) as f:
      return cls(json.load(f))

  @classmethod
  def identity(cls) -> "Normalizer":
    """Physical values unchanged (mean 0, std 1): for benchmarks and tests without a build."""
    return cls({m.name: {"bands": list(m.bands), "mean": [0.0] * m.num_bands,
                         "std": [1.0] * m.num_bands}
                for m in mod.PIXEL_MODALITIES.values()})

  def normalize(self, name: str, stored, xp=np):
    """Stored (..., H, W, C) -> (normalised float32 with 0 at no-data, valid bool)."""
    m = mod.pixel_modality(name)
    valid = stored != m.nodata_stored
    x = stored.astype(xp.float32) * self.mul[name] + self.add[name]
    return xp.where(valid, x, xp.float32(0.0)), valid


def model_inputs(stored: Mapping[str, Any], normalizer: Normalizer, xp=np) -> dict[str, Any]:
  """Stored pixel arrays (see `decode_storage`, batched or not) -> the model's batch contract.

  For each regression modality ``name`` (float32 (..., H, W, C), normalised, 0 where invalid)
  and ``name_valid`` (bool); for each class modality ``name`` (int32 (..., H, W), -1 at no
  data). Every other entry passes through. `xp` is numpy on the host, jax.numpy in the step.
  """
  out = dict(stored)
  for m in mod.PIXEL_MODALITIES.values():
    s = stored[m.name]
    if m.is_classes:
      c = s[..., 0]
      out[m.name] = xp.where(c == mod.CLASS_NODATA, mod.CLASS_IGNORE, c.astype(xp.int32))
    else:
      out[m.name], out[f"{m.name}_valid"] = normalizer.normalize(m.name, s, xp)
  return out


def decode_storage(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A record as read by tfds/grain -> stored pixel arrays (H, W, C) + image-level targets.

  Cheap (no float conversion): what the input pipeline ships to the device.
  """
  out = {m.name: np.asarray(record[m.name]) for m in mod.PIXEL_MODALITIES.values()}
  out.update(image_targets(record))
  return out


def decode(record: Mapping[str, Any], normalizer: Normalizer) -> dict[str, np.ndarray]:
  """A record -> model-ready numpy arrays on the host (`model_inputs` of `decode_storage`).

  Image targets: ``name`` (float32 (dims,)) with ``name_valid`` (bool ()), or int32 () with
  -1 for unknown classes.
  """
  return model_inputs(decode_storage(record), normalizer)


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def image_targets(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
  loc, loc_ok = mod.location_target(float(record["lat"]), float(record["lon"]))
  month, month_ok = mod.month_target(_text(record["date"]))
  water, water_ok = mod.water_target(float(record["water_percentage"]))
  return {
      "location": loc, "location_valid": np.bool_(loc_ok),
      "month": month, "month_valid": np.bool_(month_ok),
      "terrain_class": np.int32(mod.terrain_index(_text(record["terrain_class"]))),
      "water_fraction": water, "water_fraction_valid": np.bool_(water_ok),
  }


def tile_id(record: Mapping[str, Any]) -> str:
  """The record's tile id, for error messages ("?" when even that is missing)."""
  return _text(record["tile_id"]) if "tile_id" in record else "?"


def captions(record: Mapping[str, Any]) -> list[str]:
  return [_text(c) for c in record["captions"]]
