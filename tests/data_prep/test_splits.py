"""Spatial block grid, seeded block -> split hash and the footprint buffer rule."""

import collections
import math

import numpy as np
import pytest

from data_prep import splits
from data_prep.sources import raster


def test_blocks_are_at_least_block_size_and_wrap_the_antimeridian():
  bs = 10_000.0
  for lat in (0.0, 45.0, 70.0, -80.0):
    row, col = splits.block_of(lat, 10.0, bs)
    ncols = splits._row_columns(row, bs)
    centre = (row + 0.5) * bs / splits.M_PER_DEG
    width_m = 360.0 / ncols * splits.M_PER_DEG * math.cos(math.radians(centre))
    assert bs <= width_m < 1.01 * bs + 1, (lat, width_m)
  assert splits.block_of(10.0, 180.0, bs) == splits.block_of(10.0, -180.0, bs)
  # Lon spacing scales with 1 / cos(lat): two points 0.1 degree apart at 80 N share a block.
  assert splits.block_of(80.0, 20.0, bs) == splits.block_of(80.0, 20.1, bs)
  assert splits.block_of(0.0, 20.0, bs) != splits.block_of(0.0, 20.1, bs)


def test_split_hash_is_seeded_and_follows_fractions():
  config = splits.SplitConfig(seed=3)
  ids = [splits.block_id(r, c, 10_000.0) for r in range(100) for c in range(100)]
  counts = collections.Counter(splits.split_of_block(b, config) for b in ids)
  assert counts["train"] / len(ids) == pytest.approx(0.8, abs=0.02)
  assert counts["val"] / len(ids) == pytest.approx(0.1, abs=0.02)
  other = splits.SplitConfig(seed=4)
  assert [splits.split_of_block(b, config) for b in ids[:50]] != [
      splits.split_of_block(b, other) for b in ids[:50]]
  assert splits.split_of_block(ids[7], config) == splits.split_of_block(ids[7], config)
  only_train = splits.SplitConfig(fractions=(1.0, 0.0, 0.0))
  assert {splits.split_of_block(b, only_train) for b in ids[:200]} == {"train"}


def test_written_footprints_never_overlap_across_splits():
  config = splits.SplitConfig(block_size_m=5_000.0, fractions=(0.4, 0.3, 0.3), seed=0)
  rng = np.random.default_rng(0)
  # A dense 40 x 40 km patch at 60 N (cos = 0.5) and one across the antimeridian.
  pts = np.concatenate([
      np.stack([60 + rng.uniform(0, 0.36, 600), 10 + rng.uniform(0, 0.72, 600)], 1),
      np.stack([rng.uniform(-0.1, 0.1, 300), rng.choice([-1, 1], 300) * rng.uniform(179.9, 180, 300)], 1),
  ])
  kept = []
  counts = collections.Counter()
  for lat, lon in pts:
    a = splits.assign(float(lat), float(lon), config)
    counts[a.split] += 1
    if a.split != splits.BUFFER:
      kept.append((a.split, splits.footprint_box(float(lat), float(lon))))
    else:
      assert "touches" in a.detail
  assert counts[splits.BUFFER] > 0 and len({s for s, _ in kept}) == 3
  for i, (sa, (a0, a1, a2, a3)) in enumerate(kept):
    for sb, (b0, b1, b2, b3) in kept[i + 1:]:
      if sa == sb:
        continue
      lon_overlap = any(a2 < b3 + k and b2 + k < a3 for k in (-360.0, 0.0, 360.0))
      assert not (a0 < b1 and b0 < a1 and lon_overlap), (sa, sb)


def test_footprint_box_contains_the_tile():
  lat_lo, lat_hi, lon_lo, lon_hi = splits.footprint_box(60.0, 10.0)
  assert (lat_hi - lat_lo) * splits.M_PER_DEG >= 1280.0 * math.sqrt(2)
  # At 60 N one degree of longitude is half as long: the box is wider than 2 x 640 m / cos(60).
  assert (lon_hi - lon_lo) * splits.M_PER_DEG * 0.5 >= 1280.0 * math.sqrt(2)


@pytest.mark.parametrize("northing", [1_000.0, 5_000_000.0, 6_650_000.0, 8_300_000.0])
@pytest.mark.parametrize("easting", [500_000.0, 330_000.0, 670_000.0])  # zone centre, near its edges
def test_footprint_box_contains_a_utm_aligned_tile(easting, northing):
  # A 1280 m square on the UTM grid (as raster and MMEarth tiles are): its corners, turned by the
  # grid's convergence against north, must lie in the box around its centre.
  lat, lon = raster.utm_to_latlon(easting, northing, 33)
  lat_lo, lat_hi, lon_lo, lon_hi = splits.footprint_box(lat, lon)
  for dx in (-640.0, 640.0):
    for dy in (-640.0, 640.0):
      clat, clon = raster.utm_to_latlon(easting + dx, northing + dy, 33)
      assert lat_lo < clat < lat_hi and lon_lo < clon < lon_hi, (lat, lon, dx, dy)


def test_bad_configs_and_locations_raise():
  with pytest.raises(ValueError, match="sum to 1"):
    splits.SplitConfig(fractions=(0.8, 0.1, 0.2))
  with pytest.raises(ValueError, match="footprint"):
    splits.SplitConfig(block_size_m=1000.0)
  with pytest.raises(ValueError, match="3 values"):
    splits.parse_fractions("0.5,0.5")
  with pytest.raises(ValueError, match="numbers"):
    splits.parse_fractions("a,b,c")
  with pytest.raises(ValueError, match="lat"):
    splits.assign(float("nan"), 0.0, splits.SplitConfig())
