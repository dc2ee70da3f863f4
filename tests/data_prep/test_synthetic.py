"""data_prep.synthetic: determinism, physical consistency, the NAIP subset and the CLI."""

import filecmp
import subprocess
import sys

import numpy as np
import pytest

from data_prep import synthetic, validate
from data_prep.sources import geomeld, raster
from geomeld_jax import modalities as mod

B = {b: i for i, b in enumerate(mod.SENTINEL2.bands)}


@pytest.fixture(scope="module")
def samples():
  return [synthetic.generate_sample(11, i) for i in range(24)]


def test_shards_are_byte_identical_for_a_seed(tmp_path):
  a = synthetic.write_release_shards(str(tmp_path / "a"), 6, samples_per_shard=4, seed=3,
                                     naip_fraction=0.3)
  b = synthetic.write_release_shards(str(tmp_path / "b"), 6, samples_per_shard=4, seed=3,
                                     naip_fraction=0.3)
  c = synthetic.write_release_shards(str(tmp_path / "c"), 6, samples_per_shard=4, seed=4)
  assert [p.split("/")[-1] for p in a] == [p.split("/")[-1] for p in b]
  assert any(p.endswith("_n.tar") for p in a)
  assert all(filecmp.cmp(x, y, shallow=False) for x, y in zip(a, b))
  assert not filecmp.cmp(a[0], c[0], shallow=False)
  items = [i for u in geomeld.GeoMeldReleaseSource(str(tmp_path / "a")).units()
           for i in geomeld.GeoMeldReleaseSource(u).read(u)]
  assert len(items) == 6
  for item in items:
    example, _ = validate.to_example(item)
    assert example["tile_id"] == item.tile_id


def _ndvi(s2):
  return (s2[B["B8"]] - s2[B["B4"]]) / (s2[B["B8"]] + s2[B["B4"]])


def test_physics(samples):
  ndvi_tree, ndvi_water, vv_tree, vv_water, vv_built = [], [], [], [], []
  canopy_on_trees = canopy_tall = 0
  for s in samples:
    d, meta = s["datasets"], s["metadata"]
    wc = d["esa_worldcover"][0]
    tree, water = wc == 10, wc == 80
    ndvi = _ndvi(d["sentinel2"])
    vv = d["sentinel1"][0]
    ndvi_tree += list(ndvi[tree])
    ndvi_water += list(ndvi[water])
    vv_tree += list(vv[tree])
    vv_water += list(vv[water])
    vv_built += list(vv[wc == 50])
    tall = d["canopy_height"][0] > 3.0
    canopy_tall += tall.sum()
    canopy_on_trees += (tall & tree).sum()
    # VH is lower than VV.
    assert np.nanmean(d["sentinel1"][1]) < np.nanmean(vv)
    # Slope is the DEM's slope; water lies in the DEM lows.
    dem, slope = d["aster"]
    np.testing.assert_allclose(slope, raster.slope_degrees(dem), atol=2e-3)  # float32 DEM
    if water.any() and (~water).any():
      assert dem[water].max() <= dem[~water].min() + 1e-3
    # Metadata agrees with the map.
    assert meta["water_analysis"]["percentage"] == pytest.approx(100 * water.mean(), abs=0.01)
    assert meta["water_analysis"]["detected"] == bool(water.any())
    relief = np.percentile(dem, 95) - np.percentile(dem, 5)
    assert meta["terrain_class"] == synthetic._terrain_from_relief(dem)
    assert (meta["terrain_class"] == "mountainous") == (relief >= 300)
    assert meta["synthetic"] is True and "synthetic" not in s["caption"].lower()
    # Dynamic World follows WorldCover except in a few per cent of pixels.
    mapped = np.vectorize(synthetic.WORLDCOVER_TO_DYNAMIC_WORLD.get)(wc)
    assert (mapped == d["dynamic_world"][0]).mean() > 0.9
    assert 2017 <= int(meta["acquisition_date"][:4]) <= 2022
  assert np.mean(ndvi_tree) > 0.6 > 0.0 > np.mean(ndvi_water)
  assert np.mean(vv_water) < np.mean(vv_tree) - 8 and np.mean(vv_built) > np.mean(vv_tree)
  assert canopy_on_trees / canopy_tall > 0.9


def test_tiles_cluster_into_neighbours(samples):
  lat = np.array([s["metadata"]["lat"] for s in samples])
  lon = np.array([s["metadata"]["long"] for s in samples])
  # Tile 0 and tile 1 of a cluster are one tile (1280 m) apart.
  dx = (lon[1] - lon[0]) * 111320 * np.cos(np.radians(lat[0]))
  assert abs(dx - 1280) < 5 and lat[1] == lat[0]
  assert abs((lat[0] - lat[4]) * 111320 - 1280) < 5
  assert np.all(np.abs(lat) < 70)


def test_naip_sample_layout():
  s = synthetic.generate_sample(0, 3, naip=True)
  assert s["datasets"]["sentinel2"].shape == (9, 128, 128)
  assert s["datasets"]["naip"].shape == mod.NAIP_SHAPE and s["datasets"]["naip"].dtype == np.uint16
  assert s["metadata"]["file_type_naip"] is True


def test_cli(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "data_prep.synthetic", f"--output_dir={tmp_path}", "--num_samples=3",
       "--samples_per_shard=2", "--seed=5"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic-00000.tar", "synthetic-00001.tar"]
  again = synthetic.write_release_shards(str(tmp_path / "again"), 3, samples_per_shard=2, seed=5)
  assert filecmp.cmp(again[0], tmp_path / "synthetic-00000.tar", shallow=False)
