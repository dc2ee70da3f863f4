"""Linear probe on a separable toy problem, and the real-BigEarthNet probe -> metric path."""

import json

import numpy as np

from configs import eval as eval_config
from geomeld_jax.evaluation import geobench
from geomeld_jax.evaluation import probe


def _probe_config(**overrides) -> probe.ProbeConfig:
  return probe.ProbeConfig.from_config({**eval_config.get_config("smoke").probe, **overrides})


CFG = _probe_config(lrs=(1e-2, 1e-1), epochs=30, batch_size=32, weight_decay=1e-4,
                    label_smoothing=0.0)


def _toy(n, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  centres = np.array([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
  return (centres[y] + 0.3 * rng.normal(size=(n, 4))).astype(np.float32), y.astype(np.int32)


def test_linear_probe_learns_a_separable_problem():
  res = probe.linear_probe(_toy(96, 0), _toy(32, 1), _toy(32, 2), kind="multiclass",
                           num_classes=3, cfg=CFG)
  assert res.metric == "top1_acc" and res.test >= 95.0
  assert set(res.val_by_lr) == {1e-2, 1e-1} and res.best_lr in res.val_by_lr
  # Multi-label: two independent separable labels.
  x, y = _toy(96, 3)
  multi = np.stack([y == 0, y == 1], 1).astype(np.int32)
  res = probe.linear_probe((x, multi), (x[:32], multi[:32]), (x[:32], multi[:32]),
                           kind="multilabel", num_classes=2, cfg=CFG)
  assert res.metric == "micro_f1" and res.test >= 95.0


def test_feature_cache_is_npz_without_pickle(tmp_path):
  cache = probe.FeatureCache(tmp_path)
  calls = []

  def compute():
    calls.append(1)
    return np.ones((3, 4), np.float32), np.arange(3)

  a = cache.get_or_compute("k1", compute)
  b = cache.get_or_compute("k1", compute)
  assert len(calls) == 1 and np.array_equal(a[0], b[0])
  (path,) = tmp_path.glob("*.npz")
  with np.load(path, allow_pickle=False) as z:
    assert str(z["key"]) == "k1"


def test_fit_to_stride():
  x = np.ones((1, 120, 120, 2), np.float32)
  assert probe.fit_to_stride(x, 16).shape == (1, 112, 112, 2)
  assert probe.fit_to_stride(x, 16, "pad").shape == (1, 128, 128, 2)
  assert probe.fit_to_stride(x, 8) is x


def test_real_bigearthnet_converted_and_probed(ben_geobench, tiny_encoder, tmp_path):
  task_dir = ben_geobench / "classification_v1.0" / "m-bigearthnet"
  names = {p.name for p in task_dir.iterdir()}
  assert {"band_stats.json", "label_stats.json", "task_specs.pkl"} <= names
  assert {f"{p}_partition.json" for p in geobench.PARTITIONS} <= names
  assert len([n for n in names if n.endswith(".hdf5")]) == 36
  stats = json.loads((task_dir / "band_stats.json").read_text())
  assert set(stats) == set(geobench.TASKS["m-bigearthnet"].band_names) | {"label"}
  assert all(set(v) == set(geobench.STAT_KEYS) for v in stats.values())
  # Real DN values: blue mean in the hundreds to low thousands.
  assert 50 < stats["02 - Blue"]["mean"] < 5000
  task = geobench.GeoBenchTask(ben_geobench, "m-bigearthnet")
  label_stats = json.loads((task_dir / "label_stats.json").read_text())
  sample = task.read_sample("id_0000")
  assert sample.bands["02 - Blue"].shape == (120, 120) and sample.bands["02 - Blue"].dtype == np.float32
  np.testing.assert_array_equal(sample.label, label_stats["id_0000"])
  assert sample.label.sum() >= 1
  cache = probe.FeatureCache(tmp_path / "features")
  feats = {s: probe.task_features(tiny_encoder, task, s, cache=cache, checkpoint_id="random-test",
                                  batch_size=8)
           for s in geobench.SPLITS}
  assert feats["train"][0].shape == (16, tiny_encoder.dims[-1])
  assert feats["test"][1].shape == (10, 43)
  res = probe.linear_probe(feats["train"], feats["valid"], feats["test"], kind="multilabel",
                           num_classes=43, cfg=_probe_config(lrs=(1e-2,), epochs=5,
                                                             batch_size=16))
  assert res.metric == "micro_f1" and 0.0 <= res.test <= 100.0
  assert np.isfinite(res.test)
