"""Spatial blocks -> train/val/test splits, with a buffer so no footprint straddles splits.

Why blocks: neighbouring tiles look alike, so a random per-tile split leaks the test set
into training. Tiles are grouped into square-ish blocks on the ground and a whole block goes
to one split.

The block grid
--------------
* Rows are bands of latitude ``block_size_m`` tall: ``row = floor(lat * M_PER_DEG / block)``.
* Each row is cut into ``ncols = max(1, floor(row circumference / block))`` equal columns,
  where the row circumference uses ``cos`` of the row's centre latitude. A block is therefore
  at least ``block_size_m`` wide (the spacing in longitude grows as ``1 / cos(lat)``), the
  columns tile the row exactly and the antimeridian needs no special case (``col`` wraps).
* ``block_id = "<block_size_m>:<row>:<col>"``; the split is a seeded hash of it, so the
  assignment depends only on (seed, block size, fractions, location): never on the number
  of workers, the input order or the other tiles.

The buffer rule ('spatial_buffer')
----------------------------------
A tile's footprint is the ``TILE_FOOTPRINT_M`` (1280 m) square centred on its (lat, lon).
If the footprint touches any block whose split differs from the split of the block holding
the tile's centre, the tile is written to no split and is dead-lettered as
``spatial_buffer``. Every written tile thus lies entirely inside blocks of its own split,
and blocks are disjoint, so two written tiles of different splits can never overlap: nothing
leaks, at the cost of a margin of at most the footprint's half-diagonal plus 1% (914 m)
along boundaries between blocks of different splits (with 10 km blocks, an estimate scaled
from the 640 m margin's 5% / 20%: about 7% of train and up to ~30% of a val/test block;
larger blocks shrink the loss). Counts still reconcile
because the dropped tiles are rejections, not silent drops.

The footprint is bounded conservatively in degrees: the box holds the circle around the
square (a UTM-aligned tile is turned against north by up to ~3.5 degrees near a zone edge),
and the longitude half-width uses ``cos`` of the box's most poleward latitude.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

from geomeld_jax import modalities as mod

SPLITS = ("train", "val", "test")
# Metres per degree of latitude on the mean Earth sphere (R = 6,371,008.8 m).
M_PER_DEG = 2.0 * math.pi * 6_371_008.8 / 360.0
TILE_FOOTPRINT_M = mod.TILE_SIZE * mod.GSD_M  # 1280 m
BUFFER = "spatial_buffer"  # the Rejection reason of a tile dropped by the buffer rule
# Near the poles cos(lat) -> 0; clamp so a row still has a finite width in degrees.
_MIN_COS = 1e-6


@dataclasses.dataclass(frozen=True)
class SplitConfig:
  """How tiles are assigned to splits."""

  block_size_m: float = 10_000.0
  fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test
  seed: int = 0

  def __post_init__(self):
    if not (self.block_size_m > TILE_FOOTPRINT_M):
      raise ValueError(f"block_size_m must exceed the tile footprint ({TILE_FOOTPRINT_M} m), "
                       f"got {self.block_size_m}")
    if len(self.fractions) != len(SPLITS):
      raise ValueError(f"split fractions need {len(SPLITS)} values {SPLITS}, got {self.fractions}")
    if any(f < 0 for f in self.fractions) or not math.isclose(sum(self.fractions), 1.0,
                                                              abs_tol=1e-6):
      raise ValueError(f"split fractions must be >= 0 and sum to 1, got {self.fractions}")


def parse_fractions(text: str) -> tuple[float, float, float]:
  """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1), with an error naming the bad text."""
  try:
    values = tuple(float(v) for v in text.split(","))
  except ValueError:
    raise ValueError(f"split fractions must be comma-separated numbers, got {text!r}") from None
  if len(values) != len(SPLITS):
    raise ValueError(f"split fractions need {len(SPLITS)} values {SPLITS}, got {text!r}")
  return values  # type: ignore[return-value]


def _row(lat: float, block_size_m: float) -> int:
  return math.floor(lat * M_PER_DEG / block_size_m)


def _row_columns(row: int, block_size_m: float) -> int:
  """Number of columns of a block row: the row circumference at its centre / block size."""
  centre_lat = (row + 0.5) * block_size_m / M_PER_DEG
  centre_lat = max(-90.0, min(90.0, centre_lat))
  cos = max(_MIN_COS, math.cos(math.radians(centre_lat)))
  return max(1, math.floor(360.0 * M_PER_DEG * cos / block_size_m))


def _col(lon: float, row: int, block_size_m: float) -> int:
  ncols = _row_columns(row, block_size_m)
  return math.floor(((lon + 180.0) % 360.0) / 360.0 * ncols) % ncols


def block_of(lat: float, lon: float, block_size_m: float) -> tuple[int, int]:
  """The (row, col) of the block holding a point."""
  row = _row(lat, block_size_m)
  return row, _col(lon, row, block_size_m)


def block_id(row: int, col: int, block_size_m: float) -> str:
  return f"{block_size_m:g}:{row}:{col}"


def split_of_block(bid: str, config: SplitConfig) -> str:
  """Seeded hash of a block id -> split name, following the configured fractions."""
  digest = hashlib.sha256(f"{config.seed}|{bid}".encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  acc = 0.0
  for name, fraction in zip(SPLITS, config.fractions):
    acc += fraction
    if u < acc:
      return name
  # Rounding of the fractions' sum: the last split with a non-zero fraction takes the rest.
  return [n for n, f in zip(SPLITS, config.fractions) if f > 0][-1]


# A tile is square on its own grid, which need not point north: a UTM-aligned tile near a zone
# edge turns by up to ~3.5 degrees, and a WGS84 degree of latitude is up to 0.7% shorter than
# the sphere's. The box therefore holds the tile's circumscribed circle (half-diagonal), plus 1%:
# it contains the footprint however the tile is turned.
FOOTPRINT_RADIUS_FACTOR = math.sqrt(2.0) * 1.01


def footprint_box(lat: float, lon: float,
                  footprint_m: float = TILE_FOOTPRINT_M) -> tuple[float, float, float, float]:
  """(lat_lo, lat_hi, lon_lo, lon_hi) in degrees, a box that contains the tile's footprint."""
  half = footprint_m / 2.0 * FOOTPRINT_RADIUS_FACTOR
  dlat = half / M_PER_DEG
  lat_lo, lat_hi = max(-90.0, lat - dlat), min(90.0, lat + dlat)
  cos = max(_MIN_COS, math.cos(math.radians(max(abs(lat_lo), abs(lat_hi)))))
  dlon = min(180.0, half / (M_PER_DEG * cos))
  return lat_lo, lat_hi, lon - dlon, lon + dlon


def footprint_blocks(lat: float, lon: float, block_size_m: float) -> set[tuple[int, int]]:
  """Every block the tile's footprint box touches."""
  lat_lo, lat_hi, lon_lo, lon_hi = footprint_box(lat, lon)
  blocks = set()
  for row in range(_row(lat_lo, block_size_m), _row(lat_hi, block_size_m) + 1):
    ncols = _row_columns(row, block_size_m)
    c_lo = math.floor(((lon_lo + 180.0) / 360.0) * ncols)
    c_hi = math.floor(((lon_hi + 180.0) / 360.0) * ncols)
    for c in range(c_lo, min(c_hi, c_lo + ncols - 1) + 1):
      blocks.add((row, c % ncols))
  return blocks


@dataclasses.dataclass(frozen=True)
class Assignment:
  block_id: str
  split: str  # one of SPLITS, or BUFFER when the footprint touches another split's block
  detail: str = ""


def assign(lat: float, lon: float, config: SplitConfig) -> Assignment:
  """The block and split of a tile centred at (lat, lon) in degrees (finite, in range)."""
  if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90.0 or abs(lon) > 180.0:
    raise ValueError(f"tile location must be finite lat in [-90, 90], lon in [-180, 180]; "
                     f"got ({lat}, {lon})")
  row, col = block_of(lat, lon, config.block_size_m)
  bid = block_id(row, col, config.block_size_m)
  split = split_of_block(bid, config)
  for other in sorted(footprint_blocks(lat, lon, config.block_size_m)):
    other_id = block_id(*other, config.block_size_m)
    other_split = split_of_block(other_id, config)
    if other_split != split:
      return Assignment(bid, BUFFER, f"footprint of a {split} tile in block {bid} touches "
                        f"{other_split} block {other_id}")
  return Assignment(bid, split)
