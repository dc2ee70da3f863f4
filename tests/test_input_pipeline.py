"""The Grain input pipeline: per-host disjointness, aligned augmentation, captions, iterator state."""

import json
import time

import numpy as np
import pytest

from geomeld_jax import input_pipeline
from geomeld_jax import modalities as mod
from geomeld_jax import records

SIZE = mod.TILE_SIZE


def _coordinate_record() -> dict:
  """A record whose every pixel modality encodes its pixel's (row, col): alignment is checkable."""
  rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
  rec = {m.name: records.empty_modality(m) for m in mod.PIXEL_MODALITIES.values()}
  rec["sentinel2"][..., 0] = rows * SIZE + cols + 1  # uint16, never the no-data 0
  rec["sentinel1"][..., 0] = rows - cols  # int16
  rec["esa_worldcover"][..., 0] = (rows + 2 * cols) % mod.ESA_WORLDCOVER.num_classes
  rec.update(lat=10.0, lon=20.0, date="2020-06-01", terrain_class="hilly", water_percentage=5.0,
             captions=[b"first caption", b"second caption"])
  return rec


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_is_identical_across_modalities(seed):
  process = input_pipeline.ProcessRecord(None, crop_size=32, augment=True, text_len=8)
  ex = process.random_map(_coordinate_record(), np.random.default_rng(seed))
  code = ex["sentinel2"][..., 0].astype(np.int64) - 1
  rows, cols = code // SIZE, code % SIZE
  assert ex["sentinel2"].shape == (32, 32, 12)
  np.testing.assert_array_equal(ex["sentinel1"][..., 0], rows - cols)
  np.testing.assert_array_equal(ex["esa_worldcover"][..., 0],
                                (rows + 2 * cols) % mod.ESA_WORLDCOVER.num_classes)
  # A crop of a rotation/flip: the rows and columns still form a contiguous 32x32 window.
  assert {rows.max() - rows.min(), cols.max() - cols.min()} == {31}
  assert ex["terrain_class"] == mod.TERRAIN_CLASSES.index("hilly")


def test_evaluation_is_a_centre_crop_without_flips():
  process = input_pipeline.ProcessRecord(None, crop_size=32, augment=False, text_len=8)
  ex = process.random_map(_coordinate_record(), np.random.default_rng(0))
  assert ex["sentinel2"][0, 0, 0] == 48 * SIZE + 48 + 1
  assert ex["sentinel2"][0, 1, 0] == 48 * SIZE + 49 + 1


def test_hosts_read_disjoint_slices_and_captions_end_with_eos(demo_dataset):
  files = input_pipeline.locate_dataset(demo_dataset)
  seen = []
  for host in range(2):
    ds = input_pipeline.make_dataset(files, "train", global_batch_size=8, crop_size=32,
                                     text_len=32, seed=3, train=True, process_index=host,
                                     process_count=2)
    batches = [next(iter(ds)) for _ in range(1)]
    assert batches[0]["sentinel2"].shape == (4, 32, 32, 12)
    assert batches[0]["sentinel2"].dtype == np.uint16  # stored form: normalised on device
    tokens = batches[0]["text_tokens"]
    last = (tokens != input_pipeline.PAD_ID).sum(axis=1) - 1
    assert np.all(tokens[np.arange(len(tokens)), last] == input_pipeline.EOS_ID)
    seen.append({b.tobytes() for b in batches[0]["sentinel2"]})
  assert not seen[0] & seen[1]


def test_iterator_state_restores_with_worker_processes(demo_dataset):
  files = input_pipeline.locate_dataset(demo_dataset)

  def make(workers):
    return iter(input_pipeline.make_dataset(files, "train", global_batch_size=4, crop_size=32,
                                            text_len=16, seed=0, train=True,
                                            num_workers=workers))

  # Workers split the host's records between them, so the reference is an uninterrupted run
  # with as many workers (num_workers is a resume key).
  reference = make(2)
  expected = [next(reference)["sentinel2"] for _ in range(5)][3:]
  it = make(2)
  for _ in range(3):
    next(it)
  state = it.get_state()
  resumed = make(2)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["sentinel2"], want)


def test_split_smaller_than_a_batch_is_a_clear_error(demo_dataset):
  files = input_pipeline.locate_dataset(demo_dataset)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    input_pipeline.make_dataset(files, "val", global_batch_size=4096, crop_size=32, text_len=8,
                                seed=0, train=False)


def test_every_host_gets_the_same_number_of_eval_batches(demo_dataset):
  files = input_pipeline.locate_dataset(demo_dataset)
  num_records = len(input_pipeline._split_source(files, "val"))  # pylint: disable=protected-access
  hosts = next(h for h in (3, 4, 5, 7) if num_records % h)  # hosts then get unequal slices

  def per_host_slices(global_batch):  # batches per host if each host sliced the whole split
    return {-(-(num_records - i) // hosts) // (global_batch // hosts) for i in range(hosts)}

  # A batch size at which slicing the whole split would give hosts unequal batch counts (the
  # multi-host hang this guards against), so the test can tell the two apart.
  global_batch = next(b for b in range(hosts, num_records, hosts) if len(per_host_slices(b)) > 1)
  counts, seen = [], []
  for host in range(hosts):
    ds = input_pipeline.make_dataset(files, "val", global_batch_size=global_batch, crop_size=32,
                                     text_len=8, seed=0, train=False, process_index=host,
                                     process_count=hosts)
    batches = list(ds)
    counts.append(len(batches))
    seen.append({b.tobytes() for batch in batches for b in batch["sentinel2"]})
  assert counts == [num_records // global_batch] * hosts, (counts, num_records, global_batch)
  assert sum(len(s) for s in seen) == len(set().union(*seen)) == counts[0] * global_batch


def _fake_build(d):
  d.mkdir(parents=True)
  for name in ("dataset_info.json", "manifest.json", "statistics.json"):
    (d / name).write_text("{}")
  return d


def test_locate_picks_the_newest_committed_build(tmp_path):
  _fake_build(tmp_path / "geomeld" / "1.9.0")
  newest = _fake_build(tmp_path / "geomeld" / "1.10.0")
  _fake_build(tmp_path / "geomeld" / "2.0.0.incomplete-1234")  # a build still being written
  unfinished = tmp_path / "geomeld" / "3.0.0"
  _fake_build(unfinished)
  (unfinished / "manifest.json").unlink()  # killed before its manifest: not committed
  assert input_pipeline.locate_dataset(tmp_path).root == newest
  assert input_pipeline.locate_dataset(newest).root == newest
  with pytest.raises(FileNotFoundError, match="data_prep.build"):
    input_pipeline.locate_dataset(tmp_path / "geomeld" / "2.0.0.incomplete-1234")
  _fake_build(tmp_path / "other" / "1.0.0")
  with pytest.raises(ValueError, match="several datasets"):
    input_pipeline.locate_dataset(tmp_path)


def test_fingerprint_is_content_not_path(demo_dataset, tmp_path):
  import shutil

  files = input_pipeline.locate_dataset(demo_dataset)
  moved = tmp_path / "moved"
  shutil.copytree(files.root, moved)
  assert input_pipeline.fingerprint(input_pipeline.DatasetFiles(moved)) == input_pipeline.fingerprint(files)
  assert input_pipeline.fingerprint(files)["input_bands"] == list(mod.SENTINEL2.bands)
  stats = json.loads((moved / "statistics.json").read_text())
  stats["summary"]["num_records"] += 1
  (moved / "statistics.json").write_text(json.dumps(stats))
  assert (input_pipeline.fingerprint(input_pipeline.DatasetFiles(moved))["statistics_sha256"]
          != input_pipeline.fingerprint(files)["statistics_sha256"])


def test_records_are_read_ahead_by_one_host_batch_only(demo_dataset, monkeypatch):
  """Grain's default read-ahead (500 elements) would hold 500 whole batches."""
  files = input_pipeline.locate_dataset(demo_dataset)
  real_source = input_pipeline._split_source  # pylint: disable=protected-access
  reads = []

  class CountingSource:
    def __init__(self, source):
      self._source = source

    def __len__(self):
      return len(self._source)

    def __getitem__(self, i):
      reads.append(i)
      return self._source[i]

  monkeypatch.setattr(input_pipeline, "_split_source", lambda f, s: CountingSource(real_source(f, s)))
  it = iter(input_pipeline.make_dataset(files, "train", global_batch_size=4, crop_size=32,
                                        text_len=8, seed=0, train=True))
  next(it)
  time.sleep(1.0)  # let the reader threads run ahead as far as they will
  assert len(reads) <= 3 * 4, len(reads)


def test_batches_do_not_depend_on_the_host_count(demo_dataset):
  """Hosts draw their own augmentations: two hosts' batches together are one host's batch
  (keyed by the host-local index, both hosts would repeat the same draws)."""
  files = input_pipeline.locate_dataset(demo_dataset)
  kw = dict(global_batch_size=8, crop_size=32, text_len=16, seed=5, train=True)

  def first_batch(host, hosts):
    batch = next(iter(input_pipeline.make_dataset(files, "train", process_index=host,
                                                  process_count=hosts, **kw)))
    return {(s.tobytes(), t.tobytes()) for s, t in zip(batch["sentinel2"], batch["text_tokens"])}

  assert first_batch(0, 2) | first_batch(1, 2) == first_batch(0, 1)


def test_crop_larger_than_the_tile_is_a_clear_error():
  with pytest.raises(ValueError, match="crop_size 160"):
    input_pipeline.ProcessRecord(None, crop_size=160, augment=False, text_len=8)


def test_a_malformed_record_is_named():
  record = {**_coordinate_record(), "tile_id": b"T32TPS_0042"}
  del record["lat"]
  process = input_pipeline.ProcessRecord(None, crop_size=32, augment=True, text_len=8)
  with pytest.raises(ValueError, match="record 'T32TPS_0042': KeyError"):
    process.random_map(record, np.random.default_rng(0))


def test_a_bucket_url_as_data_dir_says_to_mount_it():
  with pytest.raises(ValueError, match="gcsfuse"):
    input_pipeline.locate_dataset("gs://bucket/geomeld")


@pytest.mark.parametrize("seed", range(16))
def test_caption_directions_turn_with_the_pixels(seed):
  from data_prep.captioning import lexicon

  texts = []

  def tokenizer(text):
    texts.append(text)
    return np.zeros(8, np.int32)

  rec = _coordinate_record()
  rec["captions"] = ["; ".join(f"item {i} in the {w} of the tile" for i, w in enumerate(lexicon.COMPASS))]
  process = input_pipeline.ProcessRecord(tokenizer, crop_size=32, augment=True, text_len=8)
  ex = process.random_map(rec, np.random.default_rng(seed))
  code = ex["sentinel2"][..., 0].astype(np.int64) - 1
  where = {(int(c) // SIZE, int(c) % SIZE): (i, j) for (i, j), c in np.ndenumerate(code)}
  (r0, c0), (i0, j0) = next((rc, ij) for rc, ij in where.items() if ij == (15, 15))
  got = [p.split(" of the tile")[0].split("in the ")[1] for p in texts[0].split("; ")]
  for word, turned in zip(lexicon.COMPASS, got):
    bearing = np.radians(lexicon.compass_angle(word))
    step = (-round(np.cos(bearing)), round(np.sin(bearing)))  # a stored pixel one step `word`-wards
    i1, j1 = where[(r0 + step[0], c0 + step[1])]
    seen = lexicon.compass_of(np.degrees(np.arctan2(j1 - j0, -(i1 - i0))))  # where it is now
    assert turned == seen, (word, turned, seen, texts[0])
