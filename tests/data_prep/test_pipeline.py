"""End-to-end build on synthetic shards: readback, dead letters, determinism, splits, stats."""

import collections
import dataclasses
import json
import logging
import os
import pathlib

import numpy as np
import pytest

from data_prep import pipeline
from data_prep import splits
from data_prep import stats
from data_prep import synthetic
from data_prep import writer
from data_prep.sources import raster
from geomeld_jax import modalities as mod
from geomeld_jax import records

# Chosen so that the 70 synthetic tiles land in all three splits and some in the buffer.
SPLIT_CONFIG = splits.SplitConfig(block_size_m=10_000.0, fractions=(0.5, 0.25, 0.25), seed=1)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  synthetic.write_release_shards(str(root / "good"), 64, samples_per_shard=32, seed=0)
  expected_bad = synthetic.write_bad_shards(str(root / "bad"))
  config = pipeline.BuildConfig(
      sources=(f"synthetic:{root / 'good'}", f"synthetic:{root / 'bad'}"),
      output_dir=str(root / "one_worker"), num_shards=3, split=SPLIT_CONFIG, vocab_size=300)
  one = pipeline.run_build(config)
  two = pipeline.run_build(
      dataclasses.replace(config, output_dir=str(root / "two_workers")),
      ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
  return {"one": one, "two": two, "expected_bad": expected_bad, "config": config}


def _load(path: pathlib.Path | str):
  with open(path) as f:
    return json.load(f)


def _records(dataset_dir: str, split: str) -> list[dict]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.builder_from_directory(dataset_dir).as_data_source(split)
  return [source[i] for i in range(len(source))]


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else v


def test_layout_and_tfds_readback(build):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  result = build["one"]
  d = pathlib.Path(result.dataset_dir)
  assert d.parts[-2:] == ("geomeld", records.RECORD_VERSION)
  for name in ("dataset_info.json", "features.json", "statistics.json", "manifest.json",
               "dead_letters.jsonl", "tokenizer.model"):
    assert (d / name).is_file(), name
  assert not [p for p in d.parent.iterdir() if writer.INCOMPLETE_MARKER in p.name]
  manifest = result.manifest
  builder = tfds.builder_from_directory(str(d))
  for split in splits.SPLITS:
    n = manifest["splits"][split]["records"]
    assert n > 0, f"{split} is empty: the test's split config no longer covers every split"
    files = sorted(p.name for p in d.glob(f"geomeld-{split}.array_record-*"))
    assert files == [writer.shard_filename("geomeld", split, i, len(files))
                     for i in range(len(files))]
    assert builder.info.splits[split].num_examples == n
    assert sum(builder.info.splits[split].shard_lengths) == n
    source = builder.as_data_source(split)
    assert len(source) == n
    by_name = tfds.data_source("geomeld", data_dir=str(d.parent.parent), split=split)
    assert len(by_name) == n
    first, again = source[0], by_name[0]
    assert _text(first["tile_id"]) == _text(again["tile_id"])
    assert first["sentinel2"].shape == (128, 128, 12) and first["sentinel2"].dtype == np.uint16
    np.testing.assert_array_equal(first["sentinel1"], again["sentinel1"])


def test_grain_reads_same_records_and_decode_works(build):
  import grain  # pylint: disable=g-import-not-at-top
  d = pathlib.Path(build["one"].dataset_dir)
  features = records.features()
  normalizer = records.Normalizer.from_file(d / "statistics.json")
  for split in splits.SPLITS:
    files = sorted(str(p) for p in d.glob(f"geomeld-{split}.array_record-*"))
    source = grain.sources.ArrayRecordDataSource(files)
    via_tfds = _records(str(d), split)
    assert len(source) == len(via_tfds)
    ids = [_text(features.deserialize_example_np(source[i])["tile_id"]) for i in range(len(source))]
    assert ids == [_text(r["tile_id"]) for r in via_tfds]
    decoded = records.decode(features.deserialize_example_np(source[0]), normalizer)
    x, valid = decoded["sentinel2"], decoded["sentinel2_valid"]
    assert x.dtype == np.float32 and np.isfinite(x).all() and valid.any()
    assert decoded["esa_worldcover"].shape == (128, 128)


def test_records_sorted_by_tile_id_within_shard_and_unique(build):
  d = pathlib.Path(build["one"].dataset_dir)
  import grain  # pylint: disable=g-import-not-at-top
  features = records.features()
  all_ids = []
  for path in sorted(d.glob("geomeld-*.array_record-*")):
    src = grain.sources.ArrayRecordDataSource([str(path)])
    ids = [_text(features.deserialize_example_np(src[i])["tile_id"]) for i in range(len(src))]
    assert ids == sorted(ids), path.name
    all_ids += ids
  assert len(all_ids) == len(set(all_ids)) == build["one"].manifest["written"]


def test_dead_letters_and_manifest_reconcile(build):
  result = build["one"]
  d = pathlib.Path(result.dataset_dir)
  manifest = _load(d / "manifest.json")
  lines = (d / "dead_letters.jsonl").read_text().splitlines()
  letters = [json.loads(line) for line in lines]
  reasons = collections.Counter(r["reason"] for r in letters)
  # Every deliberately bad input is there with its reason (the good synthetic shards only
  # lose tiles to the spatial buffer).
  for reason, n in build["expected_bad"].items():
    assert reasons[reason] == n, (reason, reasons)
  assert set(reasons) == set(build["expected_bad"]) | {splits.BUFFER}
  assert reasons[splits.BUFFER] > 0
  assert manifest["rejections"] == dict(reasons)
  assert manifest["rejected"] == len(letters) == sum(reasons.values())
  assert manifest["read"] == manifest["written"] + manifest["rejected"]
  assert manifest["written"] == sum(s["records"] for s in manifest["splits"].values())
  unit_reads = [u["read"] for s in manifest["sources"].values() for u in s["units"].values()]
  assert sum(unit_reads) == manifest["read"] == 64 + 14  # 64 good + 11 + 3 members of bad
  for s in manifest["sources"].values():
    assert all(u["fingerprint"] for u in s["units"].values())
  assert manifest["record_version"] == records.RECORD_VERSION
  assert manifest["pipeline_version"] == pipeline.PIPELINE_VERSION
  assert manifest["flags"]["split"]["seed"] == SPLIT_CONFIG.seed
  assert all(isinstance(v, int) and v >= 0 for v in manifest["counters"].values())
  # Deterministic order of the dead letters.
  keys = [(r["source"], r["tile_id"], r["reason"], r["detail"]) for r in letters]
  assert keys == sorted(keys)
  dup = [r for r in letters if r["reason"] == pipeline.DUPLICATE]
  assert dup and all("lowest source wins" in r["detail"] for r in dup)
  assert manifest["tokenizer"].startswith("tokenizer.model")


def test_reconcile_names_the_stage_that_lost_elements():
  plan = [("src:a", "u1"), ("src:a", "u2")]
  units = [{"source": "src:a", "unit": "u1", "read": 5, "emitted": 4, "rejected": 1},
           {"source": "src:a", "unit": "u2", "read": 3, "emitted": 3, "rejected": 0}]
  totals = [{"shard": 0, "received": 4, "written": 3, "rejected": 1},
            {"shard": 1, "received": 3, "written": 3, "rejected": 0}]
  letter = json.dumps({"reason": "corrupt_h5"})
  assert pipeline.reconcile(plan, units, totals, 6, [letter] * 2) == 8

  def fails(match, **kw):
    args = dict(plan=plan, units=units, shard_totals=totals, written=6, rejections=[letter] * 2)
    args.update(kw)
    with pytest.raises(RuntimeError, match=match):
      pipeline.reconcile(**args)

  fails("2 units planned but 1 reported", units=units[:1])
  fails("emitted 7 samples but the write stage received 6",
        shard_totals=[totals[0], dict(totals[1], received=2, written=2)])
  fails("wrote 6 records but its part lines list 5", written=5)
  fails(r"rejected 2 samples but 1 dead letters were written \({'corrupt_h5': 1}\)",
        rejections=[letter])
  fails("read 8 != written 5 \\+ rejected 2",  # the write stage lost a tile silently
        shard_totals=[totals[0], dict(totals[1], written=2)], written=5)


def test_determinism_across_worker_counts(build):
  a, b = pathlib.Path(build["one"].dataset_dir), pathlib.Path(build["two"].dataset_dir)
  files_a = sorted(p.name for p in a.glob("geomeld-*"))
  assert files_a == sorted(p.name for p in b.glob("geomeld-*"))
  for name in files_a + ["dead_letters.jsonl", "statistics.json", "tokenizer.model",
                         "features.json"]:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name
  assert _load(a / "dataset_info.json")["splits"] == _load(b / "dataset_info.json")["splits"]


def test_no_block_or_footprint_shared_across_splits(build):
  d = build["one"].dataset_dir
  split_of_block = {}
  boxes = []
  for split in splits.SPLITS:
    for r in _records(d, split):
      bid = _text(r["block_id"])
      assert bid, "every record carries its block id"
      assert split_of_block.setdefault(bid, split) == split, f"block {bid} in two splits"
      assert splits.assign(float(r["lat"]), float(r["lon"]), SPLIT_CONFIG).block_id == bid
      boxes.append((split, splits.footprint_box(float(r["lat"]), float(r["lon"]))))
  for i, (split_a, (a0, a1, a2, a3)) in enumerate(boxes):
    for split_b, (b0, b1, b2, b3) in boxes[i + 1:]:
      if split_a != split_b:
        overlap = a0 < b1 and b0 < a1 and a2 < b3 and b2 < a3
        assert not overlap, f"{split_a} and {split_b} footprints overlap"


def test_statistics_match_numpy_on_train_records(build):
  d = build["one"].dataset_dir
  statistics = _load(os.path.join(d, "statistics.json"))
  train = _records(d, "train")
  assert statistics["summary"]["num_records"] == len(train)
  for m in stats.regression_modalities():
    entry = statistics[m.name]
    assert entry["bands"] == list(m.bands)
    stored = np.stack([r[m.name] for r in train]).reshape(-1, m.num_bands)
    vr = m.band_valid_range()
    for b in range(m.num_bands):
      s = stored[:, b]
      phys = s[s != m.nodata_stored].astype(np.float64) * m.band_scale()[b] + m.band_offset()[b]
      assert entry["count"][b] == phys.size
      if phys.size == 0:
        assert entry["mean"][b] is None
        continue
      np.testing.assert_allclose(entry["mean"][b], phys.mean(), rtol=1e-9, atol=1e-9)
      np.testing.assert_allclose(entry["std"][b], phys.std(), rtol=1e-7, atol=1e-9)
      assert entry["min"][b] == pytest.approx(phys.min())
      assert entry["max"][b] == pytest.approx(phys.max())
      width = (vr[b, 1] - vr[b, 0]) / stats.HIST_BINS
      for q in stats.PERCENTILES:
        assert abs(entry[f"p{q}"][b] - np.percentile(phys, q)) <= 2 * width, (m.name, b, q)
  for m in stats.class_modalities():
    stored = np.stack([r[m.name] for r in train]).reshape(-1)
    want = np.bincount(stored, minlength=256)
    assert statistics[m.name]["counts"] == want[:m.num_classes].tolist()
    assert statistics[m.name]["nodata_count"] == int(want[mod.CLASS_NODATA])


def test_unlocated_tiles_keep_their_split_whatever_path_reaches_them():
  same = {pipeline.unlocated_block_id(spec, unit) for spec, unit in (
      ("bigearthnet:data/ben", "data/ben/S2A_patch_1"),
      ("bigearthnet:/mnt/x/data/ben", "/mnt/x/data/ben/S2A_patch_1"),
      ("bigearthnet:./data/ben/", "./data/ben/S2A_patch_1/"))}
  assert len(same) == 1
  assert pipeline.unlocated_block_id("bigearthnet:data/ben", "data/ben/S2A_patch_2") not in same
  # A source's split group (BigEarthNet: the product) puts neighbouring patches together.
  group = raster.bigearthnet_product
  assert group("S2B_MSIL2A_20170906T101019_27_42") == group("S2B_MSIL2A_20170906T101019_27_43")
  assert group("S2B_MSIL2A_20170906T101019_27_42") == "S2B_MSIL2A_20170906T101019"


def test_read_lines_splits_at_newlines_only(tmp_path):
  """JSON leaves U+2028/U+2029/U+0085 unescaped in a caption; str.splitlines() would cut there."""
  captions = ["a field\u2028by a road", "water\x85 and trees", "plain"]
  (tmp_path / "captions-00000-of-00001").write_text(
      "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in captions), encoding="utf-8")
  lines = writer.read_lines(str(tmp_path / "captions*"))
  assert [json.loads(line) for line in lines] == captions


def test_a_unit_that_raises_becomes_a_dead_letter_not_a_failed_job(monkeypatch):
  from data_prep.sources.base import RawSample  # pylint: disable=g-import-not-at-top

  good = RawSample("t1", "x:u:t1", {}, {"tile_id": "t1"})
  crash_in_encode = RawSample("t2", "x:u:t2", {}, {"tile_id": "t2"})

  def read(unit):
    yield good
    yield crash_in_encode
    raise IndexError("index 0 out of range(0)")  # e.g. tifffile on a truncated GeoTIFF

  fn = pipeline.ReadEncodeFn(SPLIT_CONFIG, "passthrough", num_shards=1, log_every=0)
  fn.setup()
  fn._sources["raster:/scenes/*"] = type("S", (), {"read": staticmethod(read)})()  # pylint: disable=protected-access

  def encode(item, spec, unit):
    if not isinstance(item, RawSample):
      return item  # a Rejection passes through, as in ReadEncodeFn._encode
    if item is crash_in_encode:
      raise ValueError("an input no check anticipated")
    return 0, ("t1",)

  monkeypatch.setattr(fn, "_encode", encode)
  out = list(fn.process(("raster:/scenes/*", "/scenes/a")))
  rejected = [json.loads(o.value) for o in out if getattr(o, "tag", None) == "rejected"]
  units = [json.loads(o.value) for o in out if getattr(o, "tag", None) == "units"]
  assert [r["reason"] for r in rejected] == ["encode_error", "unreadable_unit"]
  assert rejected[0]["tile_id"] == "t2" and "ValueError" in rejected[0]["detail"]
  assert "IndexError" in rejected[1]["detail"] and "after 2 items" in rejected[1]["detail"]
  # The counts reconcile: 3 items read (2 samples + the unit's unread rest), 1 emitted.
  assert units == [{"source": "raster:/scenes/*", "unit": "/scenes/a", "read": 3, "emitted": 1,
                    "rejected": 2}]


def test_auto_num_shards_bounds():
  mib = 1 << 20
  assert pipeline.auto_num_shards(0, 0, mib) == 1
  assert pipeline.auto_num_shards(5 * mib, 8, mib) == 8  # one per unit at least
  assert pipeline.auto_num_shards(5 * mib + 1, 1, mib) == 6  # and one per shard_bytes
  assert pipeline.auto_num_shards(10**15, 1, mib) == pipeline.MAX_AUTO_SHARDS


def test_one_big_unit_is_spread_over_shards_by_input_bytes(tmp_path, caplog):
  """A single unit (e.g. a whole scene) is not one shard held in one worker's memory."""
  tar, = synthetic.write_release_shards(str(tmp_path / "one"), 12, samples_per_shard=12, seed=3)
  config = pipeline.BuildConfig(sources=(f"synthetic:{tmp_path / 'one'}",),
                                output_dir=str(tmp_path / "out"), vocab_size=100,
                                split=splits.SplitConfig(fractions=(1.0, 0.0, 0.0)),
                                auto_shard_bytes=2 << 20)
  with caplog.at_level(logging.INFO):
    result = pipeline.run_build(config)
  # No runner given: the FnApiRunner, never DirectRunner's first try, a downloaded Prism.
  assert not [r for r in caplog.records if "Prism" in r.getMessage()]
  expected = -(-os.path.getsize(tar) // config.auto_shard_bytes)
  assert expected > 1 and result.manifest["num_shards"] == expected
  assert result.manifest["input_bytes"] == os.path.getsize(tar)
  files = list(pathlib.Path(result.dataset_dir).glob("*.array_record-*"))
  assert len(files) in range(2, expected + 1)  # several files; empty hash buckets write none
  assert result.manifest["written"] == 12


def test_one_id_for_other_pixels_is_a_collision_not_a_duplicate(tmp_path):
  """Scene folders of one name given as separate sources get one id: the other pixels are a
  `tile_id_collision` (rename or prefix a source), the same pixels a duplicate."""
  rng = np.random.default_rng(0)
  pixels = {"2020": rng.integers(1, 5000, (mod.TILE_SIZE,) * 2).astype(np.uint16)}
  pixels["2021"] = pixels["2020"] + 1
  pixels["copy"] = pixels["2020"]
  specs = []
  for name, b02 in pixels.items():
    scene = tmp_path / name / "T18SUJ"
    scene.mkdir(parents=True)
    np.save(scene / "B2.npy", b02)
    (scene / "metadata.json").write_text(json.dumps({"lat": 37.6, "long": -75.6}))
    specs.append(f"raster:{scene}")
  result = pipeline.run_build(pipeline.BuildConfig(
      sources=tuple(specs), output_dir=str(tmp_path / "out"), vocab_size=100,
      split=splits.SplitConfig(fractions=(1.0, 0.0, 0.0))))
  assert result.manifest["written"] == 1
  assert result.manifest["rejections"] == {pipeline.COLLISION: 1, pipeline.DUPLICATE: 1}


def test_tiles_sharing_their_scene_point_are_split_as_one_unlocated_group(tmp_path):
  """Without a georeference every tile of a scene carries the scene's one point: placed by it,
  the buffer would guard the wrong 1280 m, and a point near a block edge dropped every tile."""
  scene = tmp_path / "scene"
  scene.mkdir()
  np.save(scene / "B2.npy", np.full((2 * mod.TILE_SIZE,) * 2, 900, np.uint16))
  lat = 2 * splits.SplitConfig().block_size_m / splits.M_PER_DEG  # on an edge between splits
  (scene / "metadata.json").write_text(json.dumps({"lat": lat, "long": 10.0}))
  assert splits.assign(lat, 10.0, splits.SplitConfig()).split == splits.BUFFER
  result = pipeline.run_build(pipeline.BuildConfig(
      sources=(f"raster:{scene}",), output_dir=str(tmp_path / "out"), vocab_size=100))
  assert result.manifest["written"] == 4 and not result.manifest["rejections"]
  (split,) = [s for s, info in result.manifest["splits"].items() if info["records"]]
  blocks = {_text(r["block_id"]) for r in _records(result.dataset_dir, split)}
  assert blocks == {pipeline.unlocated_block_id(f"raster:{scene}", str(scene))}
