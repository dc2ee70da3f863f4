"""MMEarth (Nedungadi et al. 2024) h5 files as a GeoMeld source.

One h5 of N tiles (layout: shared/reference/mmearth_peer.md §1.3) plus three side files
beside it: ``<stem>_band_stats.json``, ``<stem>_splits.json`` and ``<stem>_tile_info.json``
(per tile id: S2_type, S2_DATE, lat, lon, ...). Units are contiguous index ranges
``'<path.h5>#<start>:<stop>'`` so Beam workers read chunks of one file independently.

Conversions to the release layout (physical units, channels-first):

* sentinel2 (N,13,S,S) uint16, bands B1..B7,B8A,B8,B9,B10,B11,B12 -> reordered BY NAME to
  the registry order; B10 dropped. DN 0 stays 0 (no data for the validator).
* sentinel1 float32 dB, -inf no data -> passed through (non-finite is no data).
* aster int16 -> float32 (elevation m, slope degrees).
* canopy_height_eth int8 -> float32; the writer's 255 placeholder wraps to -1 in int8, so
  every negative value is no data (NaN).
* dynamic_world uint8 0..9 (0 no data) -> passed through (the registry's codes).
* esa_worldcover uint8 codes 10..100; 0 (current writer) and 255 (older writer) are no data
  -> 255 is rewritten to 0 so it is not counted as an unknown class code.
* Location and date from tile_info (lat, lon, S2_DATE); when tile_info lacks them, lat from
  the h5 ``lat`` sin/cos pair (atan2), lon likewise, and no date (only the month is stored).

Only the 128-px variants (MMEarth, MMEarth100k) are supported: MMEarth64 tiles are 64 px
and GeoMeld tiles are 128 px, so they are refused with a clear error rather than resampled.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterator

import h5py
import numpy as np

from data_prep.sources.base import RawSample, Rejection, SourceItem
from data_prep.sources.geomeld import fingerprint_file
from geomeld_jax import modalities as mod

MMEARTH_S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B10", "B11",
                    "B12")
SIDE_FILES = ("band_stats", "splits", "tile_info")
_UNIT_RE = re.compile(r"^(?P<path>.+)#(?P<start>\d+):(?P<stop>\d+)$")
# MMEarth h5 key -> GeoMeld release key, for the arrays that only need a dtype change.
_RENAMED = {"sentinel1": "sentinel1", "aster": "aster", "dynamic_world": "dynamic_world"}


def side_file(h5_path: str, kind: str) -> str:
  stem, _ = os.path.splitext(h5_path)
  return f"{stem}_{kind}.json"


class MMEarthSource:
  """Reads one MMEarth h5 file in chunks of `chunk_size` tiles."""

  name = "mmearth"

  def __init__(self, path_to_h5: str, chunk_size: int = 256):
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    self.path = path_to_h5
    self.chunk_size = chunk_size
    self._tile_info: dict[str, Any] | None = None
    self._num_tiles: int | None = None

  def _check_files(self) -> None:
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"MMEarth h5 {self.path!r} does not exist")
    missing = [side_file(self.path, k) for k in SIDE_FILES if not os.path.isfile(side_file(self.path, k))]
    if missing:
      raise FileNotFoundError(f"MMEarth side files missing beside {self.path}: {missing}")

  def units(self) -> list[str]:
    self._check_files()
    with h5py.File(self.path, "r") as f:
      if "sentinel2" not in f:
        raise ValueError(f"{self.path} has no 'sentinel2' dataset: not an MMEarth h5")
      shape = f["sentinel2"].shape
    if len(shape) != 4 or shape[1] != len(MMEARTH_S2_BANDS):
      raise ValueError(f"{self.path}: sentinel2 must be (N, 13, S, S), got {shape}")
    if shape[2:] != (mod.TILE_SIZE, mod.TILE_SIZE):
      raise ValueError(f"{self.path}: tiles are {shape[2]}x{shape[3]} px; only the 128-px MMEarth "
                       f"variants are supported (MMEarth64 is not: GeoMeld tiles are 128 px)")
    n = self._num_tiles = shape[0]
    return [f"{self.path}#{a}:{min(a + self.chunk_size, n)}" for a in range(0, n, self.chunk_size)]

  def fingerprint(self, unit: str) -> str:
    path, start, stop = _parse_unit(unit)
    return f"{fingerprint_file(path)}#{start}:{stop}"

  def input_bytes(self, unit: str) -> int:
    path, start, stop = _parse_unit(unit)
    if self._num_tiles is None:
      with h5py.File(path, "r") as f:
        self._num_tiles = f["sentinel2"].shape[0]
    return os.path.getsize(path) * (stop - start) // max(1, self._num_tiles)

  def _load_tile_info(self) -> dict[str, Any]:
    if self._tile_info is None:
      self._check_files()
      with open(side_file(self.path, "tile_info")) as f:
        info = json.load(f)
      if not isinstance(info, dict):
        raise ValueError(f"{side_file(self.path, 'tile_info')} must map tile id -> info")
      self._tile_info = info
    return self._tile_info

  def read(self, unit: str) -> Iterator[SourceItem]:
    path, start, stop = _parse_unit(unit)
    tile_info = self._load_tile_info()
    with h5py.File(path, "r") as f:
      if f["sentinel2"].shape[2:] != (mod.TILE_SIZE, mod.TILE_SIZE):
        raise ValueError(f"{path}: only 128-px MMEarth tiles are supported")
      chunk = {k: f[k][start:stop] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    for j in range(stop - start):
      yield self._sample(path, start + j, j, chunk, tile_info)

  def _sample(self, path: str, index: int, j: int, chunk: dict[str, np.ndarray],
              tile_info: dict[str, Any]) -> SourceItem:
    source = f"mmearth:{path}#{index}"
    md = chunk.get("metadata")
    if md is None:
      return Rejection(source, "", "bad_metadata", "h5 has no 'metadata' dataset")
    tile_id = _text(md[j]["tile_id"])
    s2_type = _text(md[j]["S2_type"]) if "S2_type" in md.dtype.names else ""
    if not tile_id:
      return Rejection(source, "", "bad_metadata", f"tile {index} has an empty tile_id")
    info = tile_info.get(tile_id, {})

    arrays: dict[str, np.ndarray] = {}
    s2 = chunk["sentinel2"][j].astype(np.float32)
    arrays["sentinel2"] = np.stack([s2[MMEARTH_S2_BANDS.index(b)] for b in mod.SENTINEL2.bands])
    for key, release_key in _RENAMED.items():
      if key in chunk:
        arrays[release_key] = chunk[key][j].astype(np.uint8 if key == "dynamic_world" else np.float32)
    if "canopy_height_eth" in chunk:
      ch = chunk["canopy_height_eth"][j].astype(np.float32)
      arrays["canopy_height"] = np.where(ch < 0, np.float32(np.nan), ch)  # -1 = wrapped 255
    if "esa_worldcover" in chunk:
      wc = chunk["esa_worldcover"][j]
      arrays["esa_worldcover"] = np.where(wc == 255, 0, wc).astype(np.uint8)

    lat, lon = _finite(info.get("lat")), _finite(info.get("lon"))
    if lat is None and "lat" in chunk:
      lat = _angle(chunk["lat"][j])
    if lon is None and "lon" in chunk:
      lon = _angle(chunk["lon"][j])
    metadata = {
        "tile_id": tile_id, "lat": lat, "long": lon,
        "acquisition_date": _text(info.get("S2_DATE", "")) or None,
        "s2_type": s2_type or info.get("S2_type", ""),
        "mmearth_file": os.path.basename(path), "mmearth_index": index,
    }
    for key in ("biome", "eco_region", "CRS"):
      if key in info:
        metadata[f"mmearth_{key.lower()}"] = info[key]
    return RawSample(tile_id=tile_id, source=source, arrays=arrays, metadata=metadata)


def _parse_unit(unit: str) -> tuple[str, int, int]:
  m = _UNIT_RE.match(unit)
  if not m or int(m["start"]) >= int(m["stop"]):
    raise ValueError(f"MMEarth unit must be '<path.h5>#<start>:<stop>', got {unit!r}")
  return m["path"], int(m["start"]), int(m["stop"])


def _text(v: Any) -> str:
  if isinstance(v, (bytes, np.bytes_)):
    return v.decode("utf-8").rstrip("\x00").strip()
  return str(v).strip()


def _finite(v: Any) -> float | None:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None


def _angle(sin_cos: np.ndarray) -> float | None:
  """Degrees from a (sin, cos) pair; None when MMEarth marked it missing (-inf)."""
  s, c = (float(x) for x in sin_cos[:2])
  if not (math.isfinite(s) and math.isfinite(c)):
    return None
  return math.degrees(math.atan2(s, c))
