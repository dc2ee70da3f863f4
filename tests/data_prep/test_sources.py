"""Sources: GeoMeld release shards, MMEarth h5, generic raster folders, the spec registry, UTM."""

import collections
import gzip
import io
import json
import math
import os
import tarfile

import h5py
import numpy as np
import pytest
import tifffile

from data_prep import synthetic, validate
from data_prep.sources import geomeld, mmearth, raster
from data_prep.sources.base import RawSample, Rejection
from data_prep.sources.registry import KNOWN_SCHEMES, make_source
from geomeld_jax import modalities as mod

T = mod.TILE_SIZE


def _items(source):
  return [item for unit in source.units() for item in source.read(unit)]


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("release")
  synthetic.write_release_shards(str(d), num_samples=5, samples_per_shard=3, seed=1)
  return d


# ---------------------------------------------------------------------------------------
# GeoMeld release
# ---------------------------------------------------------------------------------------


def test_release_source_reads_every_member(release_dir):
  src = geomeld.GeoMeldReleaseSource(str(release_dir / "*.tar"))
  units = src.units()
  assert [os.path.basename(u) for u in units] == ["synthetic-00000.tar", "synthetic-00001.tar"]
  items = _items(src)
  assert len(items) == 5 and all(isinstance(i, RawSample) for i in items)
  first = items[0]
  assert first.tile_id == "synth-1-000000"
  assert first.source == f"geomeld:{units[0]}:synth-1-000000.h5"
  assert first.arrays["sentinel2"].shape == (12, T, T) and first.arrays["sentinel2"].dtype == np.float32
  assert first.arrays["esa_worldcover"].dtype == np.uint8
  assert first.metadata["synthetic"] is True and len(first.captions) == 1
  size, mtime, sha = src.fingerprint(units[0]).split(":")
  assert int(size) == os.path.getsize(units[0]) and int(mtime) > 0 and len(sha) == 40


def test_release_source_missing_pattern_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing-here"):
    geomeld.GeoMeldReleaseSource(str(tmp_path / "nothing-here*.tar")).units()


def _write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_release_member_variants(tmp_path):
  s = synthetic.generate_sample(5, 0)
  meta = dict(s["metadata"])
  del meta["tile_id"]
  buf = io.BytesIO()
  with h5py.File(buf, "w") as f:
    for k, v in s["datasets"].items():
      f.create_dataset(k, data=v)
    f.create_dataset("metadata", data=json.dumps(meta))
    f.create_dataset("captions", data=np.array([b"first caption", b"second caption"]))
  naip = synthetic.generate_sample(5, 1, naip=True)
  bad_naip = dict(naip["datasets"], naip=np.zeros((3, 128, 128), np.uint16))
  _write_tar(tmp_path / "x_n.tar", [
      ("no_id.h5", buf.getvalue()),
      ("naip.h5", synthetic.sample_h5_bytes(naip["datasets"], naip["metadata"])),
      ("bad_naip.h5", synthetic.sample_h5_bytes(bad_naip, dict(naip["metadata"], tile_id="b"))),
      ("readme.txt", b"hello"),
      ("blank_id.h5", synthetic.sample_h5_bytes(s["datasets"], dict(meta, tile_id=" "))),
      ("int_id.h5", synthetic.sample_h5_bytes(s["datasets"], dict(meta, tile_id=7))),
  ])
  no_id, with_naip, bad, txt, blank_id, int_id = _items(
      geomeld.GeoMeldReleaseSource(str(tmp_path / "x_n.tar")))
  assert no_id.tile_id == "no_id" and no_id.metadata["tile_id_from"] == "member_name"
  assert no_id.metadata["tile_id"] == "no_id"  # the metadata names the id the record carries
  assert blank_id.tile_id == blank_id.metadata["tile_id"] == "blank_id"
  assert validate.to_example(blank_id)[0]["tile_id"] == "blank_id"
  assert int_id.reason == "bad_metadata" and "got int 7" in int_id.detail
  assert no_id.captions == ["first caption", "second caption"]
  assert "naip" not in with_naip.arrays and with_naip.metadata["naip_present"] is True
  assert with_naip.band_names["sentinel2"] == tuple(
      b for b in mod.SENTINEL2.bands if b not in ("B2", "B3", "B4"))
  _, counters = validate.to_example(with_naip)
  assert counters["naip_dropped"] == 1 and counters["sentinel2_bands_missing"] == 3
  assert bad.reason == "wrong_shape" and txt.reason == "unexpected_member"


def test_links_and_mis_shaped_members_are_dead_letters(tmp_path):
  good = synthetic.generate_sample(6, 0)
  good_bytes = synthetic.sample_h5_bytes(good["datasets"], good["metadata"])
  grouped = io.BytesIO()  # 'sentinel2' written as a group, not a dataset
  with h5py.File(grouped, "w") as f:
    f.create_group("sentinel2")
    f.create_dataset("metadata", data=json.dumps(dict(good["metadata"], tile_id="g")))
  path = tmp_path / "links.tar"
  _write_tar(path, [("a.h5", good_bytes), ("grouped.h5", grouped.getvalue())])
  with tarfile.open(path, "a") as tar:  # a hard link: its bytes live in a.h5
    link = tarfile.TarInfo("b.h5")
    link.type, link.linkname = tarfile.LNKTYPE, "a.h5"
    tar.addfile(link)
  a, grouped_item, b = _items(geomeld.GeoMeldReleaseSource(str(path)))
  assert isinstance(a, RawSample)
  assert grouped_item.reason == "corrupt_h5" and "grouped.h5" in grouped_item.detail
  assert b.reason == "unexpected_member" and "not a regular file" in b.detail


def test_bad_shards_give_the_expected_dead_letters(tmp_path):
  expected = synthetic.write_bad_shards(str(tmp_path))
  reasons = collections.Counter()
  tile_ids = collections.Counter()
  for item in _items(make_source(f"geomeld:{tmp_path}")):
    result = item if isinstance(item, Rejection) else validate.to_example(item)
    if isinstance(result, Rejection):
      reasons[result.reason] += 1
    else:
      tile_ids[item.tile_id] += 1
  # Duplicates are the pipeline's job; count them here the way it must.
  reasons["duplicate_tile_id"] = sum(n - 1 for n in tile_ids.values())
  assert dict(reasons) == expected
  assert len(tile_ids) == synthetic.BAD_SHARDS_GOOD_RECORDS


def test_tar_cut_at_member_boundary_is_truncated(tmp_path, release_dir):
  whole = (release_dir / "synthetic-00000.tar").read_bytes()
  with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
    second = tar.getmembers()[1]
  (tmp_path / "cut.tar").write_bytes(whole[: second.offset])  # ends cleanly after member 1
  items = _items(geomeld.GeoMeldReleaseSource(str(tmp_path / "cut.tar")))
  assert isinstance(items[0], RawSample)
  assert [i.reason for i in items[1:]] == ["truncated_tar"]


def test_damaged_header_appended_archive_and_non_tars_are_dead_letters(tmp_path, release_dir):
  """tarfile ends its loop silently at a damaged header or at the first archive's end
  marker; every member after it would be lost without a trace."""
  whole = (release_dir / "synthetic-00000.tar").read_bytes()  # 3 members
  with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
    second = tar.getmembers()[1]
  damaged = bytearray(whole)
  damaged[second.offset + 150] ^= 0xFF  # inside the header checksum field of member 2
  (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
  items = _items(geomeld.GeoMeldReleaseSource(str(tmp_path / "damaged.tar")))
  assert isinstance(items[0], RawSample) and len(items) == 2
  assert items[1].reason == "corrupt_tar" and f"at byte {second.offset}" in items[1].detail

  (tmp_path / "two.tar").write_bytes(whole + whole)  # `cat a.tar b.tar`
  items = _items(geomeld.GeoMeldReleaseSource(str(tmp_path / "two.tar")))
  assert [type(i).__name__ for i in items] == ["RawSample"] * 3 + ["Rejection"]
  assert items[3].reason == "corrupt_tar"

  gz = tmp_path / "gz"
  gz.mkdir()
  (gz / "gzipped.tar").write_bytes(gzip.compress(whole))  # compressed, named .tar: fine
  (gz / "README.md").write_text("not a shard\n")
  items = _items(geomeld.GeoMeldReleaseSource(f"{gz}/*"))
  assert sum(isinstance(i, RawSample) for i in items) == 3
  assert [(i.reason, i.source) for i in items if isinstance(i, Rejection)] == [
      ("not_a_tar", f"geomeld:{gz}/README.md")]


# ---------------------------------------------------------------------------------------
# MMEarth
# ---------------------------------------------------------------------------------------


def _write_mmearth(d, n=4, size=T):
  path = str(d / "data_tiny.h5")
  rng = np.random.default_rng(0)
  with h5py.File(path, "w") as f:
    s2 = np.zeros((n, 13, size, size), np.uint16)
    for i in range(13):
      s2[:, i] = 100 * (i + 1)  # band i of the MMEarth order holds 100 * (i + 1)
    f.create_dataset("sentinel2", data=s2, chunks=(1, 13, size, size), compression="gzip")
    s1 = rng.normal(-12, 3, (n, 8, size, size)).astype(np.float32)
    s1[:, 2:4] = -np.inf
    f.create_dataset("sentinel1", data=s1)
    f.create_dataset("aster", data=np.full((n, 2, size, size), 250, np.int16))
    ch = np.full((n, 2, size, size), 12, np.int8)
    ch[:, :, :10] = -1  # the wrapped 255 placeholder
    f.create_dataset("canopy_height_eth", data=ch)
    f.create_dataset("dynamic_world", data=np.full((n, 1, size, size), 2, np.uint8))
    wc = np.full((n, 1, size, size), 10, np.uint8)
    wc[:, :, :5] = 255
    f.create_dataset("esa_worldcover", data=wc)
    ang = np.deg2rad(np.array([[30.0, 10.0]] * n))
    f.create_dataset("lat", data=np.stack([np.sin(ang[:, 0]), np.cos(ang[:, 0])], 1).astype(np.float32))
    f.create_dataset("lon", data=np.stack([np.sin(ang[:, 1]), np.cos(ang[:, 1])], 1).astype(np.float32))
    md = np.array([(f"tile{i}".encode(), b"l2a") for i in range(n)],
                  dtype=[("tile_id", "S100"), ("S2_type", "S10")])
    f.create_dataset("metadata", data=md)
  info = {f"tile{i}": {"S2_type": "l2a", "S2_DATE": f"2019-0{i + 1}-15", "lat": 50.0 + i,
                       "lon": 8.0} for i in range(n - 1)}  # the last tile falls back to sin/cos
  stem = path[:-3]
  json.dump(info, open(f"{stem}_tile_info.json", "w"))
  json.dump({"train": list(range(n))}, open(f"{stem}_splits.json", "w"))
  json.dump({}, open(f"{stem}_band_stats.json", "w"))
  return path


def test_mmearth_source(tmp_path):
  path = _write_mmearth(tmp_path)
  src = mmearth.MMEarthSource(path, chunk_size=3)
  assert src.units() == [f"{path}#0:3", f"{path}#3:4"]
  assert [src.input_bytes(u) for u in src.units()] == [
      os.path.getsize(path) * 3 // 4, os.path.getsize(path) // 4]  # a chunk's share of the file
  items = _items(src)
  assert [i.tile_id for i in items] == ["tile0", "tile1", "tile2", "tile3"]
  s2 = items[0].arrays["sentinel2"]
  for out_index, band in enumerate(mod.SENTINEL2.bands):  # reordered by name, B10 dropped
    assert np.all(s2[out_index] == 100 * (mmearth.MMEARTH_S2_BANDS.index(band) + 1)), band
  assert items[1].metadata["lat"] == 51.0 and items[1].metadata["acquisition_date"] == "2019-02-15"
  assert math.isclose(items[3].metadata["lat"], 30.0, abs_tol=1e-4)
  assert items[3].metadata["acquisition_date"] is None
  example, counters = validate.to_example(items[0])
  phys, valid = mod.from_storage(mod.CANOPY_HEIGHT, example["canopy_height"])
  assert not valid[:10].any() and valid[10:].all() and np.all(phys[10:] == 12.0)
  assert np.all(example["esa_worldcover"][:5] == mod.CLASS_NODATA)
  assert "unknown_class_codes/esa_worldcover" not in counters  # 255 is MMEarth's no data
  _, s1_valid = mod.from_storage(mod.SENTINEL1, example["sentinel1"])
  assert not s1_valid[..., 2:4].any() and s1_valid[..., 0].all()
  assert example["date"] == "2019-01-15" and example["lat"] == 50.0


def test_mmearth_errors(tmp_path):
  path = _write_mmearth(tmp_path)
  os.remove(path[:-3] + "_splits.json")
  with pytest.raises(FileNotFoundError, match="_splits.json"):
    mmearth.MMEarthSource(path).units()
  small = tmp_path / "small"
  small.mkdir()
  with pytest.raises(ValueError, match="64x64 px"):
    mmearth.MMEarthSource(_write_mmearth(small, n=2, size=64)).units()


# ---------------------------------------------------------------------------------------
# Generic raster folders
# ---------------------------------------------------------------------------------------


def _geotiff(path, data, ulx, uly, res, epsg=32633, nodata=None):
  geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg)
  tags = [(33550, "d", 3, (res, res, 0.0), False),
          (33922, "d", 6, (0.0, 0.0, 0.0, ulx, uly, 0.0), False),
          (34735, "H", len(geokeys), geokeys, False)]
  if nodata is not None:
    tags.append((42113, "s", 0, str(nodata), False))  # GDAL_NODATA, as GDAL writes it
  tifffile.imwrite(path, data, extratags=tags)


def test_geotiff_nodata_is_missing_and_no_slope_crosses_it(tmp_path):
  scene = tmp_path / "s"
  scene.mkdir()
  rng = np.random.default_rng(2)
  b02 = rng.integers(1, 5000, (128, 128)).astype(np.uint16)
  b02[:, :8] = 65535  # this file's no-data value
  dem = np.tile(np.arange(128, dtype=np.float32) * 2.0, (128, 1))  # 2 m per 10 m pixel: 11.3 deg
  dem[:, 64:] = -9999.0
  _geotiff(scene / "x_B02.tif", b02, 400000.0, 5000000.0, 10.0, nodata=65535)
  _geotiff(scene / "x_DEM.tif", dem, 400000.0, 5000000.0, 10.0, nodata=-9999)
  (tile,) = [i for i in _items(make_source(f"raster:{tmp_path}")) if isinstance(i, RawSample)]
  example, _ = validate.to_example(tile)
  _, s2_valid = mod.from_storage(mod.SENTINEL2, example["sentinel2"])
  assert not s2_valid[:, :8, 1].any() and s2_valid[:, 8:, 1].all()
  aster, aster_valid = mod.from_storage(mod.ASTER, example["aster"])
  assert aster_valid[:, :64, 0].all() and not aster_valid[:, 64:, 0].any()  # elevation
  assert aster_valid[:, :63, 1].all() and not aster_valid[:, 63:, 1].any()  # no slope across the edge
  np.testing.assert_allclose(aster[:, 1:62, 1], np.degrees(np.arctan(0.2)), atol=0.01)


def test_raster_folder_tiles_and_resampling(tmp_path):
  scene = tmp_path / "scene1"
  scene.mkdir()
  rng = np.random.default_rng(0)
  b02 = rng.integers(1, 5000, (256, 300)).astype(np.uint16)
  b05 = rng.integers(1, 5000, (128, 150)).astype(np.uint16)
  _geotiff(scene / "x_B02.tif", b02, 400000.0, 5000000.0, 10.0)
  _geotiff(scene / "x_B05.tif", b05, 400000.0, 5000000.0, 20.0)
  _geotiff(scene / "x_B10.tif", b05, 400000.0, 5000000.0, 20.0)  # cirrus: ignored
  (scene / "metadata.json").write_text(json.dumps({"acquisition_date": "2020-05-01"}))
  items = _items(make_source(f"raster:{tmp_path}"))
  tiles = [i for i in items if isinstance(i, RawSample)]
  assert len(tiles) == 4
  assert sorted(i.reason for i in items if isinstance(i, Rejection)) == ["partial_edge_tile"] * 2
  t = tiles[3]  # row 1, col 1
  assert t.tile_id == "scene1_r001_c001" and t.band_names["sentinel2"] == ("B2", "B5")
  np.testing.assert_array_equal(t.arrays["sentinel2"][0], b02[128:256, 128:256])
  np.testing.assert_array_equal(t.arrays["sentinel2"][1],
                                b05.repeat(2, 0).repeat(2, 1)[128:256, 128:256])
  lat, lon = raster.utm_to_latlon(400000 + 10 * 192, 5000000 - 10 * 192, 33)
  assert math.isclose(t.metadata["lat"], lat, abs_tol=1e-6)
  assert math.isclose(t.metadata["long"], lon, abs_tol=1e-6)
  example, counters = validate.to_example(t)
  assert example["date"] == "2020-05-01" and counters["sentinel2_bands_missing"] == 10


def test_scenes_with_one_folder_name_in_two_places_keep_distinct_tile_ids(tmp_path):
  rng = np.random.default_rng(3)
  for year in ("2020", "2021"):
    scene = tmp_path / year / "T18SUJ"
    scene.mkdir(parents=True)
    _geotiff(scene / "x_B02.tif", rng.integers(1, 5000, (128, 128)).astype(np.uint16),
             400000.0, 5000000.0, 10.0)
  tiles = [i for i in _items(make_source(f"raster:{tmp_path}/*")) if isinstance(i, RawSample)]
  assert sorted(t.tile_id for t in tiles) == ["2020_T18SUJ", "2021_T18SUJ"]  # one tile: no r/c suffix


def _b02_scene(folder, shape, seed=0, georef=True, meta=None):
  folder.mkdir(parents=True)
  data = np.random.default_rng(seed).integers(1, 5000, shape).astype(np.uint16)
  if georef:
    _geotiff(folder / "x_B02.tif", data, 400000.0, 5000000.0, 10.0)
  else:
    np.save(folder / "B2.npy", data)
  if meta is not None:
    (folder / "metadata.json").write_text(json.dumps(meta))


def _tile_ids(source):
  return sorted(i.tile_id for i in _items(source) if isinstance(i, RawSample))


def test_unit_ids_from_folder_names_with_glob_characters_and_join_collisions(tmp_path):
  parent = tmp_path / "run[1]"  # a real folder, not a glob
  _b02_scene(parent / "A", (T, T), seed=1)
  _b02_scene(parent / "B", (T, T), seed=2)
  assert _tile_ids(raster.RasterStackSource(str(parent))) == ["A", "B"]
  clash = tmp_path / "clash"
  _b02_scene(clash / "a" / "b_c", (T, T), seed=3)
  _b02_scene(clash / "a_b" / "c", (T, T), seed=4)
  with pytest.raises(ValueError, match="would give the same tile ids .'a_b_c'."):
    raster.RasterStackSource(f"{clash}/*").units()


def test_fixed_tile_prefix_keeps_the_scenes_of_a_parent_folder_apart(tmp_path):
  parent = tmp_path / "scenes"
  _b02_scene(parent / "A", (T, T), seed=1)
  _b02_scene(parent / "B", (T, 2 * T), seed=2)
  fixed = raster.RasterStackSource(str(parent), tile_prefix="ds")
  assert _tile_ids(fixed) == ["ds_A", "ds_B_r000_c000", "ds_B_r000_c001"]
  s2_pixel = mod.SENTINEL2.num_bands * 2  # every band of the modality, uint16: as records
  assert [fixed.input_bytes(u) for u in fixed.units()] == [T * T * s2_pixel, T * 2 * T * s2_pixel]
  assert _tile_ids(raster.RasterStackSource(f"{parent}/*", tile_prefix="ds")) == [
      "ds_A", "ds_B_r000_c000", "ds_B_r000_c001"]
  assert _tile_ids(raster.virginia_source(str(parent))) == [
      "virginia_s2l1c_A", "virginia_s2l1c_B_r000_c000", "virginia_s2l1c_B_r000_c001"]
  # A single-scene pattern keeps the bare prefix (the released Virginia ids).
  assert _tile_ids(raster.virginia_source(str(parent / "A"))) == ["virginia_s2l1c"]
  assert _tile_ids(raster.RasterStackSource(str(parent / "B") + "/", tile_prefix="ds")) == [
      "ds_r000_c000", "ds_r000_c001"]


def test_folder_point_of_a_multi_tile_scene_is_kept_as_scene_lat(tmp_path):
  folder_point = {"lat": 45.0, "long": 14.0}
  _b02_scene(tmp_path / "big", (2 * T, 2 * T), meta=folder_point)
  scene, _ = raster.load_scene(str(tmp_path / "big"))
  tiles = _items(raster.RasterStackSource(str(tmp_path / "big")))  # no partial strips
  assert len(tiles) == 4
  for t in tiles:
    r, c = int(t.tile_id[-8:-5]), int(t.tile_id[-3:])
    lat, lon = scene.latlon(r * T, c * T, T, T)
    assert (t.metadata["lat"], t.metadata["long"]) == (round(lat, 7), round(lon, 7)), t.tile_id
    assert (t.metadata["scene_lat"], t.metadata["scene_long"]) == (45.0, 14.0)
    assert "location_scope" not in t.metadata
    example, _ = validate.to_example(t)
    assert math.isclose(example["lat"], lat, abs_tol=1e-6)
  assert len({(t.metadata["lat"], t.metadata["long"]) for t in tiles}) == 4
  assert all(abs(t.metadata["lat"] - 45.0) > 0.1 for t in tiles)  # UTM 33N (400 km E, 5000 km N)

  # One tile that is the whole scene: the folder's point is the tile's.
  _b02_scene(tmp_path / "one", (T, T), meta=folder_point)
  (t,) = _items(raster.RasterStackSource(str(tmp_path / "one")))
  assert (t.metadata["lat"], t.metadata["long"]) == (45.0, 14.0)
  assert "scene_lat" not in t.metadata and "location_scope" not in t.metadata

  # A null lat says nothing: the georeference gives the position.
  _b02_scene(tmp_path / "null", (T, T), meta={"lat": None, "long": None})
  (t,) = _items(raster.RasterStackSource(str(tmp_path / "null")))
  assert t.metadata["lat"] == round(scene.latlon(0, 0, T, T)[0], 7)  # same corner as "big"
  assert "scene_lat" not in t.metadata and "location_unknown" not in t.metadata

  # Several tiles but no georeference: the folder's point stays, marked as the scene's.
  _b02_scene(tmp_path / "plain", (2 * T, T), georef=False, meta=folder_point)
  tiles = _items(raster.RasterStackSource(str(tmp_path / "plain")))
  assert [(t.metadata["lat"], t.metadata["location_scope"]) for t in tiles] == [(45.0, "scene")] * 2
  assert not any("scene_lat" in t.metadata for t in tiles)


def test_raster_npy_folder_padded(tmp_path):
  rng = np.random.default_rng(1)
  (tmp_path / "p").mkdir()
  b2 = rng.integers(1, 3000, (120, 120)).astype(np.uint16)
  np.save(tmp_path / "p" / "B2.npy", b2)
  np.save(tmp_path / "p" / "B1.npy", rng.integers(1, 3000, (20, 20)).astype(np.uint16))
  # A 20 m DEM (half the finest band's size) rising 2 m per pixel: slope atan(2 / 20).
  np.save(tmp_path / "p" / "DEM.npy", np.tile(np.arange(60, dtype=np.float32) * 2.0, (60, 1)))
  np.save(tmp_path / "p" / "VV.npy", np.full((120, 120), -10.0, np.float32))
  (tile,) = _items(raster.RasterStackSource(str(tmp_path / "p"), pad=True))
  assert tile.tile_id == "p" and tile.metadata["lat"] is None and tile.metadata["s1_orbit"] == "unknown"
  example, counters = validate.to_example(tile)
  _, s2_valid = mod.from_storage(mod.SENTINEL2, example["sentinel2"])
  assert s2_valid[:120, :120, 1].all() and not s2_valid[120:].any() and not s2_valid[:, 120:].any()
  aster, aster_valid = mod.from_storage(mod.ASTER, example["aster"])
  assert aster_valid[:120, :120].all() and not aster_valid[120:].any()  # slope computed from DEM
  np.testing.assert_allclose(aster[:120, :120, 1], np.degrees(np.arctan(0.1)), atol=0.01)
  _, s1_valid = mod.from_storage(mod.SENTINEL1, example["sentinel1"])
  assert s1_valid[:120, :120, 0].all() and not s1_valid[..., 1:].any()
  assert counters["location_unknown"] == 1


def test_band_names_from_file_names():
  assert raster.band_from_name("S2A_MSIL2A_x_B8A") == ("sentinel2", "B8A")
  assert raster.band_from_name("s2_B01") == ("sentinel2", "B1")
  assert raster.band_from_name("s2_B10") is None
  assert raster.band_from_name("S1_VH_desc") == ("sentinel1", "VH_desc")
  assert raster.band_from_name("preview") is None


# ---------------------------------------------------------------------------------------
# UTM and registry
# ---------------------------------------------------------------------------------------


def test_utm_known_points():
  lat, lon = raster.utm_to_latlon(500000.0, 0.0, 33)
  assert abs(lat) < 1e-9 and math.isclose(lon, 15.0)
  # On the central meridian, northing = k0 * meridian arc; the WGS84 arc to 45 deg is
  # 4 984 944.378 m (a standard geodesy table value).
  lat, lon = raster.utm_to_latlon(500000.0, 0.9996 * 4984944.378, 18)
  assert abs(lat - 45.0) < 1e-5 and math.isclose(lon, -75.0)
  # Southern hemisphere uses a 10 000 km false northing.
  lat, _ = raster.utm_to_latlon(500000.0, 10000000.0 - 0.9996 * 4984944.378, 18, north=False)
  assert abs(lat + 45.0) < 1e-5
  for la, lo, zone in ((37.67, -75.62, 18), (45.87, 14.56, 33), (-33.9, 18.4, 34), (64.1, -21.9, 27)):
    e, n = raster.latlon_to_utm(la, lo, zone)
    back = raster.utm_to_latlon(e, n, zone, north=la >= 0)
    assert abs(back[0] - la) < 1e-7 and abs(back[1] - lo) < 1e-7  # ~1 cm


def test_registry():
  assert isinstance(make_source("geomeld:/x/*.tar"), geomeld.GeoMeldReleaseSource)
  syn = make_source("synthetic:/x")
  assert isinstance(syn, geomeld.GeoMeldReleaseSource) and syn.name == "synthetic"
  assert isinstance(make_source("mmearth:/x.h5"), mmearth.MMEarthSource)
  assert isinstance(make_source("raster:/x"), raster.RasterStackSource)
  assert make_source("virginia:/x").name == "virginia"
  assert isinstance(make_source("eolearn:/x"), raster.EOLearnSource)
  assert isinstance(make_source("bigearthnet:/x"), raster.BigEarthNetSource)
  assert make_source("s2safe:/x").name == "s2safe"
  assert set(KNOWN_SCHEMES) == {"geomeld", "synthetic", "mmearth", "raster", "virginia", "eolearn",
                                "bigearthnet", "s2safe"}
  with pytest.raises(ValueError, match="bigearthnet, eolearn, geomeld"):
    make_source("s3:/bucket")
  with pytest.raises(ValueError, match="no path"):
    make_source("geomeld:")
