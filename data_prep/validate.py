"""Checks a RawSample against the modality registry and encodes it as a record example.

`to_example` is the only place where source arrays become stored record arrays: it calls
`modalities.to_storage` / `modalities.codes_to_storage` (the one quantiser) and fills every
modality or band a sample lacks with the registry's no-data, so a record always carries every
pixel modality. Anything that cannot become a record is returned as a `Rejection` with one
of the reasons below; nothing raises on bad input.

Rejection reasons
-----------------
``missing_sentinel2``    the sample has no Sentinel-2 array (the model input is required).
``wrong_shape``          an array is not (C, 128, 128) with C = the registry's band count or the
                         number of its declared ``band_names``; or NAIP is not (3, 1280, 1280).
``wrong_dtype``          an array is not numeric, or a class map holds fractional values.
``unknown_band``         ``band_names`` names a band the registry does not know (or twice).
``sentinel2_all_nodata`` no Sentinel-2 pixel is valid (all NaN / 0 / out of range).
``missing_location``     metadata has no ``lat`` / ``long``. A source that knows the location
                         is truly unknown says so with ``metadata['location_unknown'] = why``;
                         then lat/lon become NaN and the sample is kept.
``lat_out_of_range``     lat outside [-90, 90].
``lon_out_of_range``     long outside [-180, 180].
``bad_date``             ``acquisition_date`` is present but is not an ISO date.
``bad_metadata``         metadata is not a dict, a known key has the wrong type, or it is not
                         JSON-serialisable; or the tile id is empty.

Counters (second element of the result) are per-sample integers the pipeline sums into the
manifest: ``masked_pixels/<modality>`` (finite values outside the valid range),
``unknown_class_codes/<modality>``, ``modality_missing/<modality>``,
``sentinel2_bands_missing`` (bands absent, e.g. B2-B4 of the NAIP subset), ``naip_dropped``,
``ignored_arrays/<key>``, ``location_unknown``, ``date_missing``.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
from typing import Any

import numpy as np

from data_prep.sources.base import RawSample, Rejection
from geomeld_jax import modalities as mod
from geomeld_jax import records

TILE = mod.TILE_SIZE
_BY_RELEASE_KEY = {m.release_key: m for m in mod.PIXEL_MODALITIES.values()}


class _Reject(Exception):
  """Internal: carries a rejection reason out of the nested checks."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason
    self.detail = detail


def to_example(raw: RawSample) -> tuple[dict, dict[str, int]] | Rejection:
  """RawSample -> (record example, counters), or a Rejection (dead letter).

  The example satisfies `records.check_example`; `block_id` and `caption_provenance` are ''
  (the split and captioning stages fill them). Deterministic: identical input gives
  identical bytes.
  """
  try:
    return _to_example(raw)
  except _Reject as r:
    return Rejection(source=raw.source, tile_id=raw.tile_id if isinstance(raw.tile_id, str) else "",
                     reason=r.reason, detail=r.detail)


def _to_example(raw: RawSample) -> tuple[dict, dict[str, int]]:
  counters: dict[str, int] = {}
  if not isinstance(raw.tile_id, str) or not raw.tile_id.strip():
    raise _Reject("bad_metadata", f"tile_id must be a non-empty str, got {raw.tile_id!r}")
  meta = raw.metadata
  if not isinstance(meta, dict):
    raise _Reject("bad_metadata", f"metadata must be a dict, got {type(meta).__name__}")

  example: dict[str, Any] = {}
  example.update(_pixel_arrays(raw, counters))
  example.update(_scalars(meta, counters))
  example["tile_id"] = raw.tile_id
  example["source"] = str(raw.source)
  example["block_id"] = ""
  example["caption_provenance"] = ""
  example["captions"] = [c.strip() for c in (raw.captions or [])
                         if isinstance(c, str) and c.strip()]
  try:
    example["metadata_json"] = json.dumps(_jsonable(meta, counters), sort_keys=True,
                                          allow_nan=False)
  except (TypeError, ValueError) as e:
    raise _Reject("bad_metadata", f"metadata is not JSON-serialisable: {e}") from None
  records.check_example(example)
  return example, counters


# ----------------------------------------------------------------------------------------
# Pixel modalities.
# ----------------------------------------------------------------------------------------


def _pixel_arrays(raw: RawSample, counters: dict[str, int]) -> dict[str, np.ndarray]:
  arrays = raw.arrays if isinstance(raw.arrays, dict) else {}
  if mod.SENTINEL2.release_key not in arrays:
    raise _Reject("missing_sentinel2", f"arrays have no {mod.SENTINEL2.release_key!r}: "
                  f"{sorted(arrays)}")
  out: dict[str, np.ndarray] = {}
  for key in sorted(arrays):
    if key == mod.NAIP_RELEASE_KEY:
      _check_naip(arrays[key])
      counters["naip_dropped"] = 1
    elif key not in _BY_RELEASE_KEY:
      counters[f"ignored_arrays/{key}"] = 1
  if raw.metadata.get("naip_present") and mod.NAIP_RELEASE_KEY not in arrays:
    counters["naip_dropped"] = 1  # the source checked and dropped it (see sources/geomeld.py)

  for m in mod.PIXEL_MODALITIES.values():
    if m.release_key not in arrays:
      out[m.name] = records.empty_modality(m)
      counters[f"modality_missing/{m.name}"] = 1
      continue
    array = arrays[m.release_key]
    if m.is_classes:
      stored, unknown = _class_map(m, array)
      if unknown:
        counters[f"unknown_class_codes/{m.name}"] = unknown
    else:
      bands = _band_names(m, raw, counters)
      stored, masked = _regression(m, array, bands)
      if masked:
        counters[f"masked_pixels/{m.name}"] = masked
    out[m.name] = stored

  if not np.any(out[mod.SENTINEL2.name] != mod.SENTINEL2.nodata_stored):
    raise _Reject("sentinel2_all_nodata", "no valid Sentinel-2 pixel (all NaN, 0 or out of range)")
  return out


def _check_naip(array: Any) -> None:
  a = _numeric(mod.NAIP_RELEASE_KEY, array)
  if a.shape != mod.NAIP_SHAPE:
    raise _Reject("wrong_shape", f"naip must be {mod.NAIP_SHAPE}, got {a.shape}")


def _band_names(m: mod.PixelModality, raw: RawSample,
                counters: dict[str, int]) -> tuple[str, ...]:
  """The channel names of a regression array: declared, inferred (NAIP subset) or registry."""
  declared = (raw.band_names or {}).get(m.release_key)
  if declared is None and m is mod.SENTINEL2 and raw.metadata.get("file_type_naip"):
    a = raw.arrays[m.release_key]
    # The release's NAIP subset stores 9 Sentinel-2 channels without naming them.
    if getattr(a, "ndim", 0) == 3 and a.shape[0] == m.num_bands - len(
        mod.NAIP_SUBSET_MISSING_S2_BANDS):
      declared = tuple(b for b in m.bands if b not in mod.NAIP_SUBSET_MISSING_S2_BANDS)
  if declared is None:
    return m.bands
  declared = tuple(str(b) for b in declared)
  unknown = [b for b in declared if b not in m.bands]
  if unknown:
    raise _Reject("unknown_band", f"{m.name} band_names {unknown} not in registry {m.bands}")
  if len(set(declared)) != len(declared):
    raise _Reject("unknown_band", f"{m.name} band_names repeat a band: {declared}")
  missing = m.num_bands - len(declared)
  if missing:
    counters[f"{m.name}_bands_missing"] = missing
  return declared


def _numeric(name: str, array: Any) -> np.ndarray:
  a = np.asarray(array)
  if a.dtype.kind not in "iuf":
    raise _Reject("wrong_dtype", f"{name} must be numeric, got dtype {a.dtype}")
  return a


def _check_chw(name: str, a: np.ndarray, channels: int) -> None:
  if a.shape != (channels, TILE, TILE):
    raise _Reject("wrong_shape", f"{name} must be ({channels}, {TILE}, {TILE}), got {a.shape}")


def _regression(m: mod.PixelModality, array: Any,
                bands: tuple[str, ...]) -> tuple[np.ndarray, int]:
  a = _numeric(m.name, array)
  _check_chw(m.name, a, len(bands))
  full = np.full((TILE, TILE, m.num_bands), np.nan, np.float64)
  for i, band in enumerate(bands):
    full[..., m.band_index(band)] = a[i]
  return mod.to_storage(m, full)


def _class_map(m: mod.PixelModality, array: Any) -> tuple[np.ndarray, int]:
  a = _numeric(m.name, array)
  _check_chw(m.name, a, m.num_bands)
  if a.dtype.kind == "f":
    finite = np.isfinite(a)
    if np.any(a[finite] != np.round(a[finite])):
      raise _Reject("wrong_dtype", f"{m.name} is a class map but holds fractional values")
  return mod.codes_to_storage(m, a[0])


# ----------------------------------------------------------------------------------------
# Scalars from metadata.
# ----------------------------------------------------------------------------------------


def _scalars(meta: dict, counters: dict[str, int]) -> dict[str, Any]:
  _check_types(meta)
  lat = _coordinate(meta, "lat")
  lon = _coordinate(meta, "long")
  if lat is None or lon is None:
    why = meta.get("location_unknown")
    if not (isinstance(why, str) and why):
      raise _Reject("missing_location", "metadata has no lat/long (and no 'location_unknown')")
    counters["location_unknown"] = 1
    lat = lon = math.nan
  else:
    if not mod.LAT_RANGE[0] <= lat <= mod.LAT_RANGE[1]:
      raise _Reject("lat_out_of_range", f"lat {lat} outside {mod.LAT_RANGE}")
    if not mod.LON_RANGE[0] <= lon <= mod.LON_RANGE[1]:
      raise _Reject("lon_out_of_range", f"long {lon} outside {mod.LON_RANGE}")

  date = _date(meta.get("acquisition_date"))
  if not date:
    counters["date_missing"] = 1

  terrain = meta.get("terrain_class")
  if terrain is None:
    terrain = ""
  if not isinstance(terrain, str):
    raise _Reject("bad_metadata", f"terrain_class must be str, got {type(terrain).__name__}")

  return {"lat": float(lat), "lon": float(lon), "date": date, "terrain_class": terrain.strip(),
          "water_percentage": _water_percentage(meta)}


def _is_number(v: Any) -> bool:
  return isinstance(v, (numbers.Real, np.floating, np.integer)) and not isinstance(v, (bool, np.bool_))


def _coordinate(meta: dict, key: str) -> float | None:
  """A finite float, or None when absent/null/NaN; wrong types are bad metadata."""
  v = meta.get(key)
  if v is None:
    return None
  if isinstance(v, str):
    try:
      v = float(v)
    except ValueError:
      raise _Reject("bad_metadata", f"{key} is not a number: {v!r}") from None
  if not _is_number(v):
    raise _Reject("bad_metadata", f"{key} must be a number, got {type(v).__name__}")
  v = float(v)
  return v if math.isfinite(v) else None


def _date(v: Any) -> str:
  """'YYYY-MM-DD' from an ISO date or datetime string; '' when absent."""
  if v is None or (isinstance(v, str) and not v.strip()):
    return ""
  if not isinstance(v, str):
    raise _Reject("bad_date", f"acquisition_date must be a str, got {type(v).__name__}")
  s = v.strip()
  try:
    parsed = datetime.date.fromisoformat(s) if len(s) == 10 else datetime.datetime.fromisoformat(s)
  except ValueError:
    raise _Reject("bad_date", f"unparsable acquisition_date {v!r}") from None
  return f"{parsed.year:04d}-{parsed.month:02d}-{parsed.day:02d}"


def _water_percentage(meta: dict) -> float:
  wa = meta.get("water_analysis")
  if wa is None:
    return math.nan
  if not isinstance(wa, dict):
    raise _Reject("bad_metadata", f"water_analysis must be a dict, got {type(wa).__name__}")
  p = wa.get("percentage")
  if p is None:
    return math.nan
  if not _is_number(p):
    raise _Reject("bad_metadata", f"water_analysis.percentage must be a number, got {p!r}")
  return float(p)


def _check_types(meta: dict) -> None:
  osm = meta.get("osm_tags")
  if osm is not None and not isinstance(osm, dict):
    raise _Reject("bad_metadata", f"osm_tags must be a dict, got {type(osm).__name__}")
  tid = meta.get("tile_id")
  if tid is not None and not isinstance(tid, str):
    raise _Reject("bad_metadata", f"metadata tile_id must be str, got {type(tid).__name__}")


def _jsonable(v: Any, counters: dict[str, int]) -> Any:
  """numpy scalars/arrays -> plain Python, so json.dumps is stable and never fails on them.

  NaN and +-Inf become null (counted): json.dumps would write the bare tokens NaN/Infinity,
  which strict JSON readers (JavaScript, jq, Go...) refuse.
  """
  if isinstance(v, dict):
    return {str(k): _jsonable(x, counters) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable(x, counters) for x in v]
  if isinstance(v, np.ndarray):
    return _jsonable(v.tolist(), counters)
  if isinstance(v, np.generic):
    return _jsonable(v.item(), counters)
  if isinstance(v, bytes):
    return v.decode("utf-8", errors="replace")
  if isinstance(v, float) and not math.isfinite(v):
    counters["metadata_nonfinite_to_null"] = counters.get("metadata_nonfinite_to_null", 0) + 1
    return None
  return v
