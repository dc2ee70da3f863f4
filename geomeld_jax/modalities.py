"""The modality registry: the one place that knows bands, dtypes, no-data rules and targets.

Every other part of geomeld-jax (data_prep sources and validation, the record codec, the
input pipeline, the model heads, the losses and evaluation) asks this module; none of them
hard-codes a band count, a class count or a no-data value.

Conventions
-----------
* Pixel arrays are channels-last ``(H, W, C)`` everywhere after decoding a source. The
  GeoMeld release stores ``(C, H, W)``; sources transpose once.
* "Physical" values are the units a remote-sensing person expects (Sentinel-2 digital
  numbers = reflectance x 1e4, Sentinel-1 backscatter in dB, elevation in m, slope in
  degrees, canopy height in m). Records store ``round((physical - offset) / scale)`` in a
  compact integer dtype; ``nodata_stored`` marks a missing pixel. Decoding is exact up to
  half a quantisation step (``scale / 2``).
* Class maps are stored as class indices ``0..num_classes-1``; ``CLASS_NODATA`` (255)
  marks no data. Decoded class targets use ``-1`` for no data (the loss ignores it).
* A missing band or modality is stored as no-data and decoded with ``valid == False``;
  nothing is ever zero-filled as if it were measured.
* Normalisation statistics come from the dataset build (``statistics.json`` beside the
  records); the registry says *how* each modality is normalised, the build says *with what*.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Mapping

import numpy as np

TILE_SIZE = 128  # pixels per side of a GeoMeld tile (1280 m at 10 m GSD)
GSD_M = 10.0  # ground sampling distance of every stored pixel modality
CLASS_NODATA = 255  # stored class index for "no data" in class maps
CLASS_IGNORE = -1  # decoded class target for "no data" (ignored by the losses)


class TargetKind(enum.Enum):
  PIXEL_REGRESSION = "pixel_regression"
  PIXEL_CLASSES = "pixel_classes"
  IMAGE_REGRESSION = "image_regression"
  IMAGE_CLASSES = "image_classes"


class Normalization(enum.Enum):
  ZSCORE = "zscore"  # (x - mean) / std per band, statistics from the build
  NONE = "none"  # already bounded (sin/cos, fractions) or categorical


@dataclasses.dataclass(frozen=True)
class PixelModality:
  """A co-registered 128x128 raster modality of a GeoMeld sample."""

  name: str  # key in records, batches and model heads
  release_key: str  # dataset name inside a release .h5 member
  bands: tuple[str, ...]  # canonical order of the channel axis
  kind: TargetKind
  description: str
  units: str
  storage_dtype: np.dtype
  # physical = stored * scale + offset (per band; a scalar broadcasts).
  scale: tuple[float, ...] = (1.0,)
  offset: tuple[float, ...] = (0.0,)
  nodata_stored: int = 0
  # Physical values outside [lo, hi] (per band) are invalid pixels: stored as no-data.
  valid_range: tuple[tuple[float, float], ...] = ((-np.inf, np.inf),)
  normalization: Normalization = Normalization.ZSCORE
  # Classes only: raw release code -> class index, and the class names in index order.
  class_codes: tuple[int, ...] = ()
  class_names: tuple[str, ...] = ()
  # Release codes that mean "no data" (class maps) besides codes outside class_codes.
  nodata_codes: tuple[int, ...] = ()

  @property
  def num_bands(self) -> int:
    return len(self.bands)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def is_classes(self) -> bool:
    return self.kind is TargetKind.PIXEL_CLASSES

  def band_scale(self) -> np.ndarray:
    return np.broadcast_to(np.asarray(self.scale, np.float64), (self.num_bands,))

  def band_offset(self) -> np.ndarray:
    return np.broadcast_to(np.asarray(self.offset, np.float64), (self.num_bands,))

  def band_valid_range(self) -> np.ndarray:
    """(num_bands, 2) physical [lo, hi] per band."""
    vr = np.asarray(self.valid_range, np.float64)
    return np.broadcast_to(vr, (self.num_bands, 2))

  def band_index(self, band: str) -> int:
    try:
      return self.bands.index(band)
    except ValueError:
      raise KeyError(f"{self.name} has no band {band!r}; bands are {self.bands}") from None


@dataclasses.dataclass(frozen=True)
class ImageTarget:
  """An image-level target derived from a sample's metadata."""

  name: str
  kind: TargetKind
  description: str
  dims: int = 1  # regression width
  class_names: tuple[str, ...] = ()

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


_S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")

SENTINEL2 = PixelModality(
    name="sentinel2",
    release_key="sentinel2",
    bands=_S2_BANDS,
    kind=TargetKind.PIXEL_REGRESSION,
    description="Sentinel-2 L1C/L2A, 12 bands (B10 dropped), resampled to 10 m",
    units="digital number (reflectance x 1e4)",
    storage_dtype=np.dtype(np.uint16),
    nodata_stored=0,  # the Sentinel-2 product convention: DN 0 is no data
    valid_range=((1.0, 65535.0),),
)

SENTINEL1 = PixelModality(
    name="sentinel1",
    release_key="sentinel1",
    bands=("VV_asc", "VH_asc", "HH_asc", "HV_asc", "VV_desc", "VH_desc", "HH_desc", "HV_desc"),
    kind=TargetKind.PIXEL_REGRESSION,
    description="Sentinel-1 GRD IW backscatter, ascending and descending orbit",
    units="dB",
    storage_dtype=np.dtype(np.int16),
    scale=(0.01,),  # 0.01 dB steps cover [-327, 327] dB
    nodata_stored=-32768,
    valid_range=((-60.0, 40.0),),  # GRD dB; -inf (log of 0) and NaN are no data
)

ASTER = PixelModality(
    name="aster",
    release_key="aster",
    bands=("elevation", "slope"),
    kind=TargetKind.PIXEL_REGRESSION,
    description="ASTER GDEM elevation and slope",
    units="m, degrees",
    storage_dtype=np.dtype(np.int16),
    scale=(0.5, 0.01),  # 0.5 m covers [-16384, 16383] m; 0.01 degree slope
    nodata_stored=-32768,
    valid_range=((-500.0, 9000.0), (0.0, 90.0)),
)

CANOPY_HEIGHT = PixelModality(
    name="canopy_height",
    release_key="canopy_height",
    bands=("height", "height_std"),
    kind=TargetKind.PIXEL_REGRESSION,
    description="ETH global canopy height 2020 and its standard deviation",
    units="m",
    storage_dtype=np.dtype(np.int16),
    scale=(0.01,),
    nodata_stored=-32768,
    # The ETH product writes 255 for no data: outside the range, so masked.
    valid_range=((0.0, 100.0),),
)

ESA_WORLDCOVER = PixelModality(
    name="esa_worldcover",
    release_key="esa_worldcover",
    bands=("class",),
    kind=TargetKind.PIXEL_CLASSES,
    description="ESA WorldCover v100 (2020), 11 classes",
    units="class index",
    storage_dtype=np.dtype(np.uint8),
    nodata_stored=CLASS_NODATA,
    normalization=Normalization.NONE,
    class_codes=(10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
    class_names=(
        "tree_cover", "shrubland", "grassland", "cropland", "built_up", "bare_sparse_vegetation",
        "snow_and_ice", "permanent_water_bodies", "herbaceous_wetland", "mangroves",
        "moss_and_lichen",
    ),
    nodata_codes=(0,),
)

DYNAMIC_WORLD = PixelModality(
    name="dynamic_world",
    release_key="dynamic_world",
    bands=("class",),
    kind=TargetKind.PIXEL_CLASSES,
    description="Dynamic World label (yearly mode), 9 classes",
    units="class index",
    storage_dtype=np.dtype(np.uint8),
    nodata_stored=CLASS_NODATA,
    normalization=Normalization.NONE,
    # As in the MMEarth release the GeoMeld release derives from: labels 1..9, 0 = no data.
    class_codes=(1, 2, 3, 4, 5, 6, 7, 8, 9),
    class_names=(
        "water", "trees", "grass", "flooded_vegetation", "crops", "shrub_and_scrub", "built",
        "bare", "snow_and_ice",
    ),
    nodata_codes=(0,),
)

PIXEL_MODALITIES: Mapping[str, PixelModality] = {
    m.name: m for m in (SENTINEL2, SENTINEL1, ASTER, CANOPY_HEIGHT, ESA_WORLDCOVER, DYNAMIC_WORLD)
}

INPUT_MODALITY = SENTINEL2.name  # the encoder's input; every other modality is a target

# Sentinel-2 bands absent from the release's NAIP subset (its sentinel2 has 9 channels).
NAIP_SUBSET_MISSING_S2_BANDS = ("B2", "B3", "B4")

# NAIP RGB (3,1280,1280) uint16 at 1 m exists only in `*_n.tar` release shards. It is not a
# pretraining input or target, so records do not carry it; sources count it in the manifest.
NAIP_RELEASE_KEY = "naip"
NAIP_SHAPE = (3, 1280, 1280)

# Terrain vocabulary of `metadata.terrain_class` (matched case-insensitively; anything else
# decodes as unknown). Geomorphon-style classes, also used by the captioning orchestrator.
TERRAIN_CLASSES = ("flat", "plain", "hilly", "mountainous", "valley", "ridge")

IMAGE_TARGETS: Mapping[str, ImageTarget] = {
    t.name: t
    for t in (
        ImageTarget("location", TargetKind.IMAGE_REGRESSION,
                    "sin/cos of latitude and longitude: (sin lat, cos lat, sin lon, cos lon)", dims=4),
        ImageTarget("month", TargetKind.IMAGE_REGRESSION,
                    "sin/cos of 2*pi*month/12 of the acquisition date", dims=2),
        ImageTarget("terrain_class", TargetKind.IMAGE_CLASSES, "metadata terrain class",
                    class_names=TERRAIN_CLASSES),
        ImageTarget("water_fraction", TargetKind.IMAGE_REGRESSION,
                    "metadata water_analysis.percentage / 100", dims=1),
    )
}

LAT_RANGE = (-90.0, 90.0)
LON_RANGE = (-180.0, 180.0)


def pixel_modality(name: str) -> PixelModality:
  try:
    return PIXEL_MODALITIES[name]
  except KeyError:
    raise KeyError(f"unknown modality {name!r}; known: {sorted(PIXEL_MODALITIES)}") from None


def image_target(name: str) -> ImageTarget:
  try:
    return IMAGE_TARGETS[name]
  except KeyError:
    raise KeyError(f"unknown image target {name!r}; known: {sorted(IMAGE_TARGETS)}") from None


# ----------------------------------------------------------------------------------------
# Physical <-> storage conversion. The only code that knows storage dtypes and sentinels.
# ----------------------------------------------------------------------------------------


def to_storage(modality: PixelModality, physical: np.ndarray) -> tuple[np.ndarray, int]:
  """Quantises physical values (H, W, C) to the storage dtype.

  Non-finite values and values outside the band's valid range become no-data.

  Returns:
    (stored array, number of finite pixels that were out of range and masked).
  """
  if modality.is_classes:
    raise TypeError(f"{modality.name} is a class map: use codes_to_storage")
  x = np.asarray(physical, np.float64)
  if x.ndim != 3 or x.shape[-1] != modality.num_bands:
    raise ValueError(f"{modality.name}: expected (H, W, {modality.num_bands}), got {x.shape}")
  vr = modality.band_valid_range()
  finite = np.isfinite(x)
  in_range = finite & (x >= vr[:, 0]) & (x <= vr[:, 1])
  q = np.round((np.where(in_range, x, 0.0) - modality.band_offset()) / modality.band_scale())
  info = np.iinfo(modality.storage_dtype)
  lo, hi = info.min, info.max
  # The sentinel must stay unambiguous: clip real values away from it.
  if modality.nodata_stored == lo:
    lo += 1
  elif modality.nodata_stored == hi:
    hi -= 1
  q = np.clip(q, lo, hi)
  if modality.nodata_stored == 0 and lo <= 0:  # S2: DN 0 is no data; a valid 0.4 rounds to 1
    q = np.maximum(q, 1)
  stored = np.where(in_range, q, modality.nodata_stored).astype(modality.storage_dtype)
  return stored, int(np.count_nonzero(finite & ~in_range))


def from_storage(modality: PixelModality, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Storage array (H, W, C) -> (physical float32 with NaN at no-data, valid bool)."""
  valid = stored != modality.nodata_stored
  phys = stored.astype(np.float32) * modality.band_scale().astype(np.float32)
  phys += modality.band_offset().astype(np.float32)
  return np.where(valid, phys, np.float32(np.nan)), valid


def codes_to_storage(modality: PixelModality, codes: np.ndarray) -> tuple[np.ndarray, int]:
  """Release class codes (H, W) or (H, W, 1) -> stored class indices (H, W, 1).

  Returns:
    (stored uint8 array, number of pixels whose code is neither a class nor a no-data code).
  """
  if not modality.is_classes:
    raise TypeError(f"{modality.name} is not a class map")
  c = np.asarray(codes)
  if c.ndim == 3:
    if c.shape[-1] != 1:
      raise ValueError(f"{modality.name}: expected one channel, got {c.shape}")
    c = c[..., 0]
  if c.ndim != 2:
    raise ValueError(f"{modality.name}: expected (H, W), got {c.shape}")
  finite = np.isfinite(c) if np.issubdtype(c.dtype, np.floating) else np.ones(c.shape, bool)
  ci = np.where(finite, c, -1).astype(np.int64)
  lut = np.full(256, CLASS_NODATA, np.uint8)
  lut[list(modality.class_codes)] = np.arange(modality.num_classes, dtype=np.uint8)
  in_lut = (ci >= 0) & (ci < 256)
  stored = np.where(in_lut, lut[np.clip(ci, 0, 255)], CLASS_NODATA).astype(np.uint8)
  known = np.isin(ci, list(modality.class_codes) + list(modality.nodata_codes))
  return stored[..., None], int(np.count_nonzero(~known & finite))


def class_targets(stored: np.ndarray) -> np.ndarray:
  """Stored class indices (H, W, 1) -> int32 (H, W) targets with CLASS_IGNORE at no data."""
  s = stored[..., 0]
  # Cast first: np.where(mask, -1, uint8) stays uint8 under NumPy 2 promotion and gives 255.
  return np.where(s == CLASS_NODATA, CLASS_IGNORE, s.astype(np.int32))


# ----------------------------------------------------------------------------------------
# Image-level targets from metadata.
# ----------------------------------------------------------------------------------------


def location_target(lat: float, lon: float) -> tuple[np.ndarray, bool]:
  if not (np.isfinite(lat) and np.isfinite(lon)):
    return np.zeros(4, np.float32), False
  la, lo = np.deg2rad(lat), np.deg2rad(lon)
  return np.array([np.sin(la), np.cos(la), np.sin(lo), np.cos(lo)], np.float32), True


def month_target(date: str) -> tuple[np.ndarray, bool]:
  """`YYYY-MM-DD` (or '' when unknown) -> (sin, cos) of 2*pi*month/12."""
  if not date:
    return np.zeros(2, np.float32), False
  month = int(date[5:7])
  a = 2.0 * np.pi * month / 12.0
  return np.array([np.sin(a), np.cos(a)], np.float32), True


def terrain_index(terrain_class: str | None) -> int:
  """Terrain vocabulary index, or CLASS_IGNORE when unknown."""
  if not terrain_class:
    return CLASS_IGNORE
  t = str(terrain_class).strip().lower()
  return TERRAIN_CLASSES.index(t) if t in TERRAIN_CLASSES else CLASS_IGNORE


def water_target(percentage: float) -> tuple[np.ndarray, bool]:
  if not np.isfinite(percentage):
    return np.zeros(1, np.float32), False
  return np.array([np.clip(percentage, 0.0, 100.0) / 100.0], np.float32), True
