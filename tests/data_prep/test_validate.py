"""data_prep.validate: record encoding, no-data filling, counters and every rejection reason."""

import json
import math

import numpy as np
import pytest

from data_prep import validate
from data_prep.sources.base import RawSample, Rejection
from geomeld_jax import modalities as mod
from geomeld_jax import records

T = mod.TILE_SIZE


@pytest.fixture(scope="module")
def feats():
  return records.features()


def _physical(m: mod.PixelModality, rng: np.random.Generator) -> np.ndarray:
  """Random in-range physical values (C, T, T) for a regression modality."""
  vr = m.band_valid_range()
  lo = np.maximum(vr[:, 0], -1000.0)[:, None, None]
  hi = np.minimum(vr[:, 1], 5000.0)[:, None, None]
  x = lo + (hi - lo) * rng.random((m.num_bands, T, T))
  if m is mod.SENTINEL2:
    x = np.round(x)  # DN are integers
  return x.astype(np.float32)


def _sample(rng=None, **overrides) -> RawSample:
  rng = rng or np.random.default_rng(0)
  arrays = {}
  for m in mod.PIXEL_MODALITIES.values():
    if m.is_classes:
      codes = np.asarray(m.class_codes + m.nodata_codes, np.uint8)
      arrays[m.release_key] = codes[rng.integers(0, len(codes), (1, T, T))]
    else:
      arrays[m.release_key] = _physical(m, rng)
  meta = {"tile_id": "t1", "lat": 45.5, "long": -120.25, "acquisition_date": "2019-07-04",
          "terrain_class": "hilly", "file_type_naip": False, "osm_tags": {"landuse": "forest"},
          "water_analysis": {"detected": True, "percentage": 12.5}}
  fields = dict(tile_id="t1", source="test:unit", arrays=arrays, metadata=meta,
                captions=["  A forest.  ", "", "   "])
  fields.update(overrides)
  return RawSample(**fields)


def _ok(result):
  assert not isinstance(result, Rejection), result
  return result


def test_round_trip_every_modality_within_half_a_step(feats):
  raw = _sample()
  example, counters = _ok(validate.to_example(raw))
  records.check_example(example)
  back = feats.deserialize_example_np(feats.serialize_example(example))
  for m in mod.PIXEL_MODALITIES.values():
    src = raw.arrays[m.release_key]
    stored = np.asarray(back[m.name])
    assert stored.shape == (T, T, m.num_bands) and stored.dtype == m.storage_dtype
    if m.is_classes:
      lut = {c: i for i, c in enumerate(m.class_codes)}
      want = np.vectorize(lambda c: lut.get(int(c), mod.CLASS_NODATA))(src[0])
      np.testing.assert_array_equal(stored[..., 0], want)
    else:
      phys, valid = mod.from_storage(m, stored)
      assert valid.all(), m.name
      err = np.abs(phys - src.transpose(1, 2, 0))
      # half a quantisation step, plus float32 rounding of the source values
      assert np.all(err <= m.band_scale() / 2 + 1e-3), (m.name, float(err.max()))
      if m is mod.SENTINEL2:
        np.testing.assert_array_equal(phys, src.transpose(1, 2, 0))  # DN are exact
  assert counters == {}
  assert _text(back["tile_id"]) == "t1" and _text(back["date"]) == "2019-07-04"
  assert float(back["lat"]) == 45.5 and float(back["lon"]) == -120.25
  assert float(back["water_percentage"]) == 12.5
  assert _text(back["terrain_class"]) == "hilly"
  assert [_text(c) for c in back["captions"]] == ["A forest."]
  assert _text(back["block_id"]) == "" and _text(back["caption_provenance"]) == ""
  assert json.loads(_text(back["metadata_json"]))["osm_tags"] == {"landuse": "forest"}
  assert example["metadata_json"] == json.dumps(raw.metadata, sort_keys=True)


def _text(v):
  return v.decode() if isinstance(v, bytes) else str(v)


def test_deterministic_bytes(feats):
  a = _ok(validate.to_example(_sample(np.random.default_rng(3))))[0]
  b = _ok(validate.to_example(_sample(np.random.default_rng(3))))[0]
  assert feats.serialize_example(a) == feats.serialize_example(b)


def test_missing_modalities_are_nodata_and_counted():
  raw = _sample()
  for key in ("sentinel1", "aster", "canopy_height", "esa_worldcover", "dynamic_world"):
    raw.arrays.pop(key)
  del raw.metadata["water_analysis"], raw.metadata["acquisition_date"], raw.metadata["terrain_class"]
  example, counters = _ok(validate.to_example(raw))
  for m in mod.PIXEL_MODALITIES.values():
    if m is not mod.SENTINEL2:
      assert np.all(example[m.name] == m.nodata_stored)
      assert counters[f"modality_missing/{m.name}"] == 1
  assert math.isnan(example["water_percentage"])
  assert example["date"] == "" and counters["date_missing"] == 1
  assert example["terrain_class"] == ""


def test_naip_subset_bands_declared_and_inferred():
  raw = _sample()
  s2 = raw.arrays["sentinel2"]
  keep = [i for i, b in enumerate(mod.SENTINEL2.bands) if b not in ("B2", "B3", "B4")]
  for declared in (True, False):
    r = _sample(np.random.default_rng(0))
    r.arrays["sentinel2"] = s2[keep]
    if declared:
      r.band_names = {"sentinel2": tuple(mod.SENTINEL2.bands[i] for i in keep)}
    else:
      r.metadata["file_type_naip"] = True
    example, counters = _ok(validate.to_example(r))
    phys, valid = mod.from_storage(mod.SENTINEL2, example["sentinel2"])
    for i, band in enumerate(mod.SENTINEL2.bands):
      if band in ("B2", "B3", "B4"):
        assert not valid[..., i].any(), band
      else:
        assert valid[..., i].all(), band
        np.testing.assert_array_equal(phys[..., i], s2[i])
    assert counters["sentinel2_bands_missing"] == 3


def test_naip_array_dropped_and_counted():
  raw = _sample()
  raw.arrays["naip"] = np.zeros(mod.NAIP_SHAPE, np.uint16)
  example, counters = _ok(validate.to_example(raw))
  assert counters["naip_dropped"] == 1 and "naip" not in example
  raw.arrays["naip"] = np.zeros((3, 128, 128), np.uint16)
  assert validate.to_example(raw).reason == "wrong_shape"


def test_counters_for_out_of_range_and_unknown_codes():
  raw = _sample()
  raw.arrays["sentinel1"][0, :2, :5] = 99.0  # 10 pixels beyond +40 dB
  raw.arrays["sentinel1"][1, 0, 0] = -np.inf  # no data, not "out of range"
  raw.arrays["esa_worldcover"][0, 0, :3] = 33  # not a WorldCover code
  example, counters = _ok(validate.to_example(raw))
  assert counters["masked_pixels/sentinel1"] == 10
  assert counters["unknown_class_codes/esa_worldcover"] == 3
  assert example["sentinel1"][0, 0, 1] == mod.SENTINEL1.nodata_stored
  assert np.all(example["esa_worldcover"][0, :3, 0] == mod.CLASS_NODATA)


def test_location_unknown_is_kept_as_nan():
  raw = _sample()
  raw.metadata.update(lat=None, long=None, location_unknown="not recorded by the dataset")
  example, counters = _ok(validate.to_example(raw))
  assert math.isnan(example["lat"]) and math.isnan(example["lon"])
  assert counters["location_unknown"] == 1


def test_date_formats_normalised():
  for given in ("2017-06-13 10:10:31", "2017-06-13T10:10:31", "2017-06-13"):
    raw = _sample()
    raw.metadata["acquisition_date"] = given
    assert _ok(validate.to_example(raw))[0]["date"] == "2017-06-13"


def _set(path, value):
  def change(raw):
    target = raw.metadata
    *parents, last = path
    for p in parents:
      target = target[p]
    if value is _DELETE:
      del target[last]
    else:
      target[last] = value
  return change


_DELETE = object()


@pytest.mark.parametrize("change,reason", [
    (lambda r: r.arrays.update(sentinel2=np.ones((12, 64, 64), np.float32)), "wrong_shape"),
    (lambda r: r.arrays.update(sentinel1=np.ones((7, T, T), np.float32)), "wrong_shape"),
    (lambda r: r.arrays.update(aster=np.ones((T, T), np.float32)), "wrong_shape"),
    (lambda r: r.arrays.update(esa_worldcover=np.full((1, T, T), 10.5, np.float32)), "wrong_dtype"),
    (lambda r: r.arrays.update(aster=np.full((2, T, T), "x")), "wrong_dtype"),
    (lambda r: r.arrays.update(sentinel2=np.full((12, T, T), np.nan, np.float32)),
     "sentinel2_all_nodata"),
    (lambda r: r.arrays.update(sentinel2=np.zeros((12, T, T), np.float32)), "sentinel2_all_nodata"),
    (lambda r: r.arrays.pop("sentinel2"), "missing_sentinel2"),
    (lambda r: setattr(r, "band_names", {"sentinel2": ("B1",) * 12}), "unknown_band"),
    (lambda r: setattr(r, "band_names", {"sentinel2": ("B10",) + mod.SENTINEL2.bands[1:]}),
     "unknown_band"),
    (_set(["lat"], 91.0), "lat_out_of_range"),
    (_set(["long"], -180.5), "lon_out_of_range"),
    (_set(["lat"], _DELETE), "missing_location"),
    (_set(["long"], None), "missing_location"),
    (_set(["acquisition_date"], "13/06/2017"), "bad_date"),
    (_set(["acquisition_date"], "2017-02-30"), "bad_date"),
    (_set(["terrain_class"], 3), "bad_metadata"),
    (_set(["water_analysis"], "lots"), "bad_metadata"),
    (_set(["water_analysis", "percentage"], "12%"), "bad_metadata"),
    (_set(["lat"], True), "bad_metadata"),
    (_set(["osm_tags"], ["a"]), "bad_metadata"),
    (lambda r: setattr(r, "metadata", ["not", "a", "dict"]), "bad_metadata"),
    (lambda r: r.metadata.update(x=object()), "bad_metadata"),
])
def test_rejections(change, reason):
  raw = _sample()
  change(raw)
  result = validate.to_example(raw)
  assert isinstance(result, Rejection), f"expected {reason}, got a record"
  assert result.reason == reason, result
  assert result.source == "test:unit" and result.tile_id == "t1"


def test_nonfinite_metadata_becomes_null_and_is_counted():
  raw = _sample(np.random.default_rng(0))
  raw.metadata.update(cloud_cover=float("nan"), extra={"scores": np.array([1.5, np.inf, -np.inf])})
  example, counters = _ok(validate.to_example(raw))
  meta = json.loads(example["metadata_json"], parse_constant=lambda token: pytest.fail(token))
  assert meta["cloud_cover"] is None and meta["extra"]["scores"] == [1.5, None, None]
  assert counters == {"metadata_nonfinite_to_null": 3}
