"""Real rasters in shared/data through the raster adapters and the validator."""

import json

import numpy as np
import pytest
import tifffile

from data_prep import validate
from data_prep.sources import raster
from data_prep.sources.base import RawSample, Rejection
from geomeld_jax import modalities as mod
from geomeld_jax import records

T = mod.TILE_SIZE


def _items(source):
  return [item for unit in source.units() for item in source.read(unit)]


def _examples(items):
  out = []
  for item in items:
    if isinstance(item, RawSample):
      result = validate.to_example(item)
      assert not isinstance(result, Rejection), result
      out.append((item, *result))
  return out


@pytest.fixture(scope="module")
def virginia(shared_data):
  folder = shared_data / "sentinel2_l1c_scene_subset_virginia"
  items = _items(raster.virginia_source(str(folder)))
  bands = {b: tifffile.imread(folder / f"s2_{b}.jp2") for b in ("B02", "B05", "B01", "B8A", "B12")}
  return items, _examples(items), bands


def test_virginia_full_tiles_equal_source_pixels(virginia):
  items, examples, bands = virginia
  assert len(examples) == 225  # 1947 x 1933 px -> 15 x 15 full tiles
  assert sum(isinstance(i, Rejection) and i.reason == "partial_edge_tile" for i in items) == 31
  i = np.arange(15 * T)
  # Nearest rule from the georeferences: the 20 m grid starts 10 m west of the 10 m grid,
  # the 60 m grid 10 m west and 20 m north (README table).
  r20, c20 = (10 * i + 5) // 20, (10 * i + 15) // 20
  r60, c60 = (10 * i + 25) // 60, (10 * i + 15) // 60
  expected = {
      "B2": bands["B02"][:15 * T, :15 * T],
      "B5": bands["B05"][np.ix_(r20, c20)], "B8A": bands["B8A"][np.ix_(r20, c20)],
      "B12": bands["B12"][np.ix_(r20, c20)], "B1": bands["B01"][np.ix_(r60, c60)],
  }
  for raw, example, counters in examples:
    r, c = int(raw.tile_id[-8:-5]), int(raw.tile_id[-3:])
    phys, valid = mod.from_storage(mod.SENTINEL2, example["sentinel2"])
    assert valid.all() and "masked_pixels/sentinel2" not in counters
    for band, full in expected.items():
      want = full[r * T:(r + 1) * T, c * T:(c + 1) * T]
      np.testing.assert_array_equal(phys[..., mod.SENTINEL2.band_index(band)], want, err_msg=raw.tile_id)
  # Scene centre about 37.67 N, 75.62 W (README).
  lats = [e["lat"] for _, e, _ in examples]
  lons = [e["lon"] for _, e, _ in examples]
  assert abs(np.mean(lats) - 37.67) < 0.03 and abs(np.mean(lons) + 75.62) < 0.03


def test_virginia_record_round_trip(virginia):
  _, examples, _ = virginia
  feats = records.features()
  _, example, _ = examples[17]
  back = feats.deserialize_example_np(feats.serialize_example(example))
  np.testing.assert_array_equal(back["sentinel2"], example["sentinel2"])


def test_eolearn_with_dem_and_padding(shared_data):
  folder = shared_data / "eolearn_slovenia_s2_dem_lulc"
  source = raster.EOLearnSource(str(folder))
  assert all(source.input_bytes(u) == 101 * 100 * 13 * 4 for u in source.units())  # one float32 date
  items = _items(source)
  examples = _examples(items)
  assert len(items) == len(examples) == 5
  assert sorted(e["date"] for _, e, _ in examples) == [
      "2015-07-11", "2015-07-31", "2015-08-20", "2015-08-30", "2015-09-09"]
  assert len({raw.tile_id for raw, _, _ in examples}) == 5
  toa = np.load(folder / "REFERENCE_SCENES.npy")
  dem = np.load(folder / "TestEOPatch" / "data_timeless" / "DEM.npy")[..., 0]
  for k, (raw, example, _) in enumerate(examples):
    s2, s2_valid = mod.from_storage(mod.SENTINEL2, example["sentinel2"])
    assert s2_valid[:101, :100].all() and not s2_valid[101:].any() and not s2_valid[:, 100:].any()
    np.testing.assert_array_equal(s2[:101, :100, mod.SENTINEL2.band_index("B8")],
                                  np.round(toa[k, ..., 7] * 1e4))
    aster, aster_valid = mod.from_storage(mod.ASTER, example["aster"])
    assert aster_valid[:101, :100].all() and not aster_valid[101:].any()
    assert np.abs(aster[:101, :100, 0] - dem).max() <= 0.25
    np.testing.assert_allclose(aster[:101, :100, 1], raster.slope_degrees(dem), atol=0.005)
    assert not (example["esa_worldcover"] != mod.CLASS_NODATA).any()  # LULC is not WorldCover
    meta = json.loads(example["metadata_json"])
    assert abs(sum(meta["lulc_fractions"].values()) - 1.0) < 1e-3
    assert meta["lulc_fractions"]["forest"] > 0.7
    assert abs(example["lat"] - 45.87) < 0.02 and abs(example["lon"] - 14.56) < 0.02


def test_bigearthnet_patches(shared_data):
  source = raster.BigEarthNetSource(str(shared_data / "bigearthnet"))
  assert all(source.input_bytes(u) > 10_000 for u in source.units())  # 12 bands of 120x120 or more
  items = _items(source)
  examples = _examples(items)
  assert len(items) == len(examples) == 36
  orbits = {}
  for raw, example, counters in examples:
    _, s2_valid = mod.from_storage(mod.SENTINEL2, example["sentinel2"])
    assert s2_valid[:120, :120].all() and not s2_valid[120:].any() and not s2_valid[:, 120:].any()
    _, s1_valid = mod.from_storage(mod.SENTINEL1, example["sentinel1"])
    per_band = s1_valid[:120, :120].all(axis=(0, 1))
    assert per_band.sum() == 2 and not s1_valid[120:].any(), raw.tile_id
    assert counters["sentinel1_bands_missing"] == 6
    meta = json.loads(example["metadata_json"])
    assert meta["bigearthnet_labels_43"]
    orbits[meta["bigearthnet_patch"]] = (meta["s1_orbit"], tuple(np.flatnonzero(per_band)))
    assert example["date"].startswith(("2017", "2018"))
  # 16:50 UTC at ~13.7 E is evening local solar time -> ascending slots (VV_asc, VH_asc);
  # 06:47 UTC at ~8 W is morning -> descending slots (VV_desc, VH_desc); the mock: unknown.
  assert orbits["S2A_MSIL2A_20170613T101031_87_48"] == ("ascending", (0, 1))
  assert orbits["S2A_MSIL2A_20170617T113321_36_85"] == ("descending", (4, 5))
  assert orbits["S2B_MSIL2A_20180515T094029_51_28"] == ("unknown", (0, 1))
  located = [e for _, e, _ in examples if np.isfinite(e["lat"])]
  assert len(located) == 6  # the GeoTIFF examples; the mock keeps no coordinates
  # The mock's patches of one product share a split group (they have no location to split by).
  groups = {raw.metadata["bigearthnet_patch"]: raw.metadata.get("split_group") for raw, _, _ in examples
            if not np.isfinite(raw.metadata.get("lat") or np.nan)}
  assert groups["S2B_MSIL2A_20180515T094029_51_28"] == "S2B_MSIL2A_20180515T094029"
  assert len(set(groups.values())) < len(groups)  # some products hold several mock patches
