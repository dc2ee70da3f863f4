"""GEO-Bench v1.0 reader: fixtures written in the real format at test time and read back."""

import ast
import datetime
import json
import pickle

import h5py
import numpy as np
import pytest

from geomeld_jax import modalities as mod
from geomeld_jax.evaluation import geobench as gb

S2 = list(mod.SENTINEL2.bands)


def _bigearthnet_sample(path, label, value=100.0):
  tr = gb.Affine(20, 0, 699960, 0, -20, 5620800)
  crs = gb.crs_object(gb.utm_wkt(31))
  bands = [(n, np.full((120, 120), value + i, np.float32),
            gb.band_attrs(gb.sentinel2_info(n), spatial_resolution=10, transform=tr, crs=crs))
           for i, n in enumerate(gb.TASKS["m-bigearthnet"].band_names)]
  return gb.write_sample(path, bands, label=label)


def _so2sat_sample(path, label):
  bands = [(n, np.full((32, 32), 0.5, np.float32),
            gb.band_attrs(gb.sentinel1_info(n), spatial_resolution=10)) for n in gb.SENTINEL1_8]
  bands += [(n, np.full((32, 32), 0.01 * (i + 1), np.float32),
             gb.band_attrs(gb.sentinel2_info(n), spatial_resolution=10))
            for i, n in enumerate(gb._S2_SO2SAT)]
  return gb.write_sample(path, bands, label=label)


def _stats(names, mean=100.0, std=10.0):
  st = {n: {k: 0.0 for k in gb.STAT_KEYS} for n in list(names) + ["label"]}
  for n in names:
    st[n]["mean"], st[n]["std"] = mean, std
  return st


def _write_task(root, task, writer, labels):
  info = gb.TASKS[task]
  d = root / info.benchmark / task
  d.mkdir(parents=True)
  names = [f"id_{i:04d}" for i in range(len(labels))]
  for n, lab in zip(names, labels):
    writer(d / f"{n}.hdf5", lab)
  splits = {"train": names[:2], "valid": names[2:3], "test": names[3:]}
  specs = gb.task_specs_object(info, [gb.sentinel2_info(n) for n in gb._S2_12])
  gb.write_task_files(d, info, splits, _stats(info.band_names), specs)
  return d


def _raw(path):
  with h5py.File(path) as f:
    return ast.literal_eval(f.attrs["pickle"])


def test_pickle_sizes_match_the_audited_real_files(tmp_path):
  # geobench.md §2.4: every real so2sat pickle is 1649 B; bigearthnet (UTM 31N) 2447 B.
  for label in (0, 16):
    assert len(_raw(_so2sat_sample(tmp_path / f"s{label}.hdf5", label))) == 1649
  lab = np.zeros(43, np.int64)
  lab[[3, 40]] = 1
  raw = _raw(_bigearthnet_sample(tmp_path / "b.hdf5", lab))
  assert len(raw) == 2447
  assert raw[:2] == b"\x80\x04"  # protocol 4
  assert b"numpy.core.multiarray" in raw and b"geobench.dataset" in raw


def test_attr_dict_read_back_with_placeholders(tmp_path):
  lab = np.zeros(43, np.int64)
  lab[5] = 1
  path = _bigearthnet_sample(tmp_path / "b.hdf5", lab)
  with h5py.File(path) as f:
    attrs = gb.decode_pickle_attr(f.attrs["pickle"], str(path))
    keys = list(f.keys())
  np.testing.assert_array_equal(attrs["label"], lab)
  assert attrs["label"].dtype == np.int64
  assert attrs["bands_order"] == list(gb.TASKS["m-bigearthnet"].band_names)
  assert keys != attrs["bands_order"] or keys == sorted(keys)  # h5py lists keys alphabetically
  blue = attrs["02 - Blue"]
  assert list(blue) == ["date", "date_id", "spatial_resolution", "band_info", "meta_info",
                        "transform", "crs"]
  assert blue["band_info"].state == {"name": "02 - Blue", "alt_names": ("2", "02", "blue"),
                                     "spatial_resolution": 10, "wavelength": 0.49}
  assert blue["transform"].args == (20.0, 0.0, 699960.0, 0.0, -20.0, 5620800.0)
  assert blue["crs"].state.endswith('AUTHORITY["EPSG","32631"]]')


def test_numpy_core_and_numpy_underscore_core_both_accepted():
  arr = np.arange(3, dtype=np.int64)
  raw = pickle.dumps({"label": arr, "d": datetime.date(2020, 1, 2)}, protocol=4)
  assert b"numpy._core" in raw  # numpy 2 writes the new name
  old = gb.pickle_bytes({"label": arr, "d": datetime.date(2020, 1, 2)})
  assert b"numpy.core.multiarray" in old and b"numpy._core" not in old  # numpy-1 names
  for blob in (raw, old):
    out = gb.decode_pickle_attr(str(blob), "mem")
    np.testing.assert_array_equal(out["label"], arr)
    assert out["d"] == datetime.date(2020, 1, 2)


class _Evil:
  def __reduce__(self):
    import os
    return (os.system, ("echo pwned",))


def test_malicious_pickle_is_rejected_naming_file_and_class(tmp_path):
  path = tmp_path / "evil.hdf5"
  with h5py.File(path, "w") as f:
    f.create_dataset("02 - Blue", data=np.zeros((4, 4), np.float32))
    f.attrs["pickle"] = str(pickle.dumps({"label": _Evil()}, protocol=4))
  with h5py.File(path) as f:
    text = f.attrs["pickle"]
  with pytest.raises(gb.GeoBenchFormatError, match=r"evil\.hdf5.*(posix|os)\.system"):
    gb.decode_pickle_attr(text, str(path))
  with pytest.raises(gb.GeoBenchFormatError, match="not a bytes literal"):
    gb.decode_pickle_attr("__import__('os').system('x')", "f.hdf5")
  builtins_eval = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93."
  with pytest.raises(gb.GeoBenchFormatError, match="builtins.eval"):
    gb.decode_pickle_attr(str(builtins_eval), "g.hdf5")


def test_bigearthnet_and_so2sat_tasks_read_back(tmp_path):
  labs = [np.eye(43, dtype=np.int64)[i] for i in (0, 1, 2, 3)]
  d = _write_task(tmp_path, "m-bigearthnet", _bigearthnet_sample, labs)
  (d / "label_stats.json").write_text(json.dumps({f"id_{i:04d}": l.tolist() for i, l in enumerate(labs)}))
  task = gb.GeoBenchTask(tmp_path, "m-bigearthnet")
  s = task.load_split("train")
  assert s.x.shape == (2, 120, 120, 12) and s.y.shape == (2, 43)
  np.testing.assert_array_equal(s.y[1], labs[1])
  assert s.band_valid.all()
  # value 100 + i, mean 100, std 10 -> band i holds i / 10, in registry order by NAME.
  np.testing.assert_allclose(s.x[0, 0, 0], np.arange(12) / 10.0, atol=1e-6)
  assert len(task.split_names("test")) == 1
  # Partitions: all 8 files, valid/test shared.
  for part in gb.PARTITIONS:
    p = json.loads((d / f"{part}_partition.json").read_text())
    assert p["valid"] == ["id_0002"] and len(p["train"]) >= 1

  _write_task(tmp_path, "m-so2sat", _so2sat_sample, [3, 7, 11, 16])
  so2 = gb.GeoBenchTask(tmp_path, "m-so2sat")  # MMEarth's divisor: band_stats are x1e4 the data
  s = so2.load_split("train")
  assert s.y.tolist() == [3, 7] and s.x.shape == (2, 32, 32, 12)
  # Duplicates as MMEarth: B1 <- B2, B9 <- B8A; every band valid.
  assert so2.layout[S2.index("B1")] == "02 - Blue" and so2.layout[S2.index("B9")] == "08A - Vegetation Red Edge"
  assert s.band_valid.all()
  np.testing.assert_allclose(s.x[0, 0, 0, S2.index("B1")], s.x[0, 0, 0, S2.index("B2")])
  masked = gb.GeoBenchTask(tmp_path, "m-so2sat", fill_missing="mask")
  s = masked.load_split("test")
  assert not s.band_valid[S2.index("B1")] and not s.band_valid[S2.index("B9")]
  assert np.all(s.x[..., S2.index("B1")] == 0)
  # Dropping B2 empties B1 too (its copy): the "without blue" row must see no blue at all.
  x, valid = so2.to_model_input(so2.read_sample(so2.split_names("test")[0]), drop_bands=("B2",))
  assert not valid[S2.index("B1")] and not valid[S2.index("B2")] and valid[S2.index("B3")]
  assert np.all(x[..., S2.index("B1")] == 0) and np.all(x[..., S2.index("B2")] == 0)
  # Dropping the copy (B1) leaves the real blue band (B2) it copies.
  sample = so2.read_sample(so2.split_names("test")[0])
  x, valid = so2.to_model_input(sample, drop_bands=("B1",))
  assert not valid[S2.index("B1")] and valid[S2.index("B2")]
  np.testing.assert_array_equal(x[..., S2.index("B2")], so2.to_model_input(sample)[0][..., S2.index("B2")])
  # The stats-scale check: fixture band_stats (mean 100) are x1e4 the data (0.01..0.1), as
  # MMEarth assumes; with a divisor of 1 the inputs would not be z-scored, and every path that
  # reads a split refuses: the fine-tune path (load_split) and the probe path (iter_batches).
  assert 0.1 <= gb.GeoBenchTask(tmp_path, "m-so2sat").stats_scale_ratio() <= 10
  unscaled = gb.GeoBenchTask(tmp_path, "m-so2sat", stats_divisor=1.0)
  assert unscaled.stats_scale_ratio() < 1e-3
  with pytest.raises(gb.GeoBenchFormatError, match="not be z-scored"):
    unscaled.load_split("train")
  with pytest.raises(gb.GeoBenchFormatError, match="so2sat_stats_divisor=1"):
    next(gb.GeoBenchTask(tmp_path, "m-so2sat", stats_divisor=1.0).iter_batches("test", 4))


def _seg_sample(path, label, dated):
  date = datetime.date(2019, 11, 5) if dated else None
  tr = gb.Affine(10, 0, 331040, 0, -10, -3714560)
  crs = gb.crs_object(gb.utm_wkt(34, north=False))
  dtype = np.float32 if dated else np.int16
  res = 0.5 if dated else 10
  bands = []
  for i, n in enumerate(gb._S2_12):
    key = f"{n}_{date.isoformat()}" if dated else n
    bands.append((key, np.full((32, 32), 50 + i, dtype),
                  gb.band_attrs(gb.sentinel2_info(n), spatial_resolution=res, date=date,
                                transform=tr, crs=crs)))
  cp = gb.cloud_probability_info(("CPL", "CLD") if dated else ("CPL", "CLM"), 10 if dated else None)
  bands.append((f"Cloud Probability_{date.isoformat()}" if dated else "Cloud Probability",
                np.zeros((32, 32), dtype), gb.band_attrs(cp, spatial_resolution=res, date=date)))
  mask = (np.arange(32 * 32).reshape(32, 32) % (7 if dated else 10)).astype(np.int64 if dated else np.int16)
  lab = gb.band_attrs(gb.segmentation_classes_info(res, 7 if dated else 10), spatial_resolution=res)
  return gb.write_sample(path, bands, label_band=(mask, lab))


@pytest.mark.parametrize("task,dated", [("m-cashew-plant", True), ("m-SA-crop-type", False)])
def test_segmentation_tasks_dates_int16_and_zero_std_guard(tmp_path, task, dated):
  info = gb.TASKS[task]
  d = tmp_path / info.benchmark / task
  d.mkdir(parents=True)
  for i in range(3):
    _seg_sample(d / f"s_{i}.hdf5", None, dated)
  st = _stats(info.band_names, mean=50.0, std=2.0)
  st["Cloud Probability"]["std"] = 0.0  # SA-crop: constant band
  specs = gb.task_specs_object(info, [gb.sentinel2_info(n) for n in gb._S2_12])
  gb.write_task_files(d, info, {"train": ["s_0"], "valid": ["s_1"], "test": ["s_2"]}, st, specs)
  (d / "band_stats.json").write_text(json.dumps(st))
  t = gb.GeoBenchTask(tmp_path, task)
  sample = t.read_sample("s_0")
  assert sample.date == ("2019-11-05" if dated else "")
  assert "label" not in sample.bands and "Cloud Probability" in sample.bands
  assert sample.label.shape == (32, 32) and sample.label.max() == info.num_classes - 1
  with h5py.File(d / "s_0.hdf5") as f:
    assert f["04 - Red" + ("_2019-11-05" if dated else "")].dtype == (np.float32 if dated else np.int16)
    order = gb.decode_pickle_attr(f.attrs["pickle"], "s_0")["bands_order"]
  assert order[-1] == "label"
  s = t.load_split("train")
  np.testing.assert_allclose(s.x[0, 0, 0], np.arange(12) / 2.0)
  assert np.isfinite(t._stats("Cloud Probability")[1]) and t._stats("Cloud Probability")[1] == 1.0


def test_bad_input_errors_name_the_file(tmp_path):
  with pytest.raises(gb.GeoBenchFormatError, match="m-so2sat"):
    gb.GeoBenchTask(tmp_path, "m-so2sat")
  d = _write_task(tmp_path, "m-so2sat", _so2sat_sample, [1, 2, 3, 4])
  (d / "band_stats.json").unlink()
  with pytest.raises(gb.GeoBenchFormatError, match="band_stats.json is missing"):
    gb.GeoBenchTask(tmp_path, "m-so2sat")
  gb.write_task_files(d, gb.TASKS["m-so2sat"], {"train": ["id_0000", "gone"], "valid": [],
                                               "test": []}, _stats(gb.TASKS["m-so2sat"].band_names),
                      gb.task_specs_object(gb.TASKS["m-so2sat"], []))
  t = gb.GeoBenchTask(tmp_path, "m-so2sat")
  with pytest.raises(gb.GeoBenchFormatError, match=r"gone\.hdf5 is missing"):
    t.load_split("train")
  with h5py.File(d / "id_0000.hdf5", "a") as f:
    f.create_dataset("13 - Mystery", data=np.zeros((32, 32), np.float32))
  with pytest.raises(gb.GeoBenchFormatError, match=r"id_0000\.hdf5.*unknown band name '13 - Mystery'"):
    gb.GeoBenchTask(tmp_path, "m-so2sat").band_valid()
  with pytest.raises(ValueError, match="unknown partition"):
    gb.GeoBenchTask(tmp_path, "m-so2sat", partition="0.3x_train")
