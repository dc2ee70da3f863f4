"""Mergeable statistics: exact moments, histogram percentiles, byte coder, Beam combine."""

import json

import apache_beam as beam
from apache_beam.testing.util import assert_that
import numpy as np
import pytest

from data_prep import pipeline
from data_prep import stats
from geomeld_jax import modalities as mod
from geomeld_jax import records


def _random_stored(rng: np.random.Generator) -> dict[str, np.ndarray]:
  out = {}
  for m in mod.PIXEL_MODALITIES.values():
    if m.is_classes:
      codes = rng.choice(list(m.class_codes) + [0], size=(128, 128))
      out[m.name] = mod.codes_to_storage(m, codes)[0]
      continue
    lo, hi = m.band_valid_range()[:, 0], m.band_valid_range()[:, 1]
    phys = rng.uniform(np.maximum(lo, -1e3), np.minimum(hi, 2e4), size=(128, 128, m.num_bands))
    if m is mod.SENTINEL1:  # all-negative bands: a no-data fill of 0 must not become the max
      phys = -np.abs(phys) - 1.0
    phys[rng.random(phys.shape) < 0.1] = np.nan  # no data
    out[m.name] = mod.to_storage(m, phys)[0]
  # One band never observed: its statistics are null, not zero.
  out["sentinel1"][..., 2] = mod.SENTINEL1.nodata_stored
  return out


@pytest.fixture(scope="module")
def samples():
  rng = np.random.default_rng(0)
  return [_random_stored(rng) for _ in range(5)]


def _numpy_band(samples, m, b):
  s = np.stack([x[m.name][..., b] for x in samples]).reshape(-1)
  return s[s != m.nodata_stored].astype(np.float64) * m.band_scale()[b] + m.band_offset()[b]


def test_finalize_matches_numpy(samples):
  acc = stats.empty_accumulator()
  for s in samples:
    stats.add_example(acc, s)
  out = stats.finalize(acc)
  assert out["summary"]["num_records"] == len(samples)
  for m in stats.regression_modalities():
    for b in range(m.num_bands):
      phys = _numpy_band(samples, m, b)
      e = out[m.name]
      assert e["count"][b] == phys.size
      if phys.size == 0:
        assert e["mean"][b] is None and e["std"][b] is None and e["p50"][b] is None
        continue
      assert e["mean"][b] == pytest.approx(phys.mean(), rel=1e-12, abs=1e-9)
      assert e["std"][b] == pytest.approx(phys.std(), rel=1e-9)
      assert (e["min"][b], e["max"][b]) == (pytest.approx(phys.min()), pytest.approx(phys.max()))
      vr = m.band_valid_range()[b]
      width = (vr[1] - vr[0]) / stats.HIST_BINS
      for q in stats.PERCENTILES:
        assert abs(e[f"p{q}"][b] - np.percentile(phys, q)) <= 2 * width
  wc = out["esa_worldcover"]
  stored = np.stack([s["esa_worldcover"] for s in samples]).reshape(-1)
  assert wc["counts"] == np.bincount(stored, minlength=256)[:11].tolist()
  assert wc["nodata_count"] == int((stored == mod.CLASS_NODATA).sum())
  assert sum(wc["frequency"]) == pytest.approx(1.0)
  # The Normalizer reads it (null -> NaN -> neutral) and z-scores to ~N(0, 1).
  norm = records.Normalizer(json.loads(json.dumps(out)))
  x, valid = norm.normalize("sentinel2", np.stack([s["sentinel2"] for s in samples]))
  assert abs(x[valid].mean()) < 1e-3 and abs(x[valid].std() - 1) < 1e-3


def test_merge_is_exact_and_order_independent(samples):
  parts = []
  for s in samples:
    parts.append(stats.add_example(stats.empty_accumulator(), s))
  a = stats.merge([stats.merge(parts[:2]), stats.merge(parts[2:])])
  b = stats.merge(reversed(parts))
  assert json.dumps(stats.finalize(a)) == json.dumps(stats.finalize(b))


def test_histogram_percentile_within_a_bin():
  rng = np.random.default_rng(1)
  x = rng.normal(50, 10, 100_000).clip(0, 100)
  bins = 200
  hist = np.histogram(x, bins=bins, range=(0, 100))[0]
  for q in (1, 2, 50, 98, 99):
    assert abs(stats.histogram_percentile(hist, 0, 100, q) - np.percentile(x, q)) <= 100 / bins
  assert np.isnan(stats.histogram_percentile(np.zeros(4, np.int64), 0, 1, 50))


def test_accumulator_coder_roundtrip_without_pickle(samples):
  acc = stats.add_example(stats.empty_accumulator(), samples[0])
  data = stats.AccumulatorCoder().encode(acc)
  assert isinstance(data, bytes) and data[:2] == b"PK"  # an .npz, read with allow_pickle=False
  back = stats.AccumulatorCoder().decode(data)
  assert set(back) == set(acc)
  for k in acc:
    np.testing.assert_array_equal(back[k], acc[k])


def test_beam_combine_from_serialized_records(samples):
  features = records.features()
  serialized = []
  for s in samples:
    ex = {name: "" for name in records.SCALAR_TEXT_FIELDS}
    ex.update({name: np.float32(0.0) for name in records.SCALAR_FLOAT_FIELDS})
    ex["captions"] = []
    ex.update(s)
    serialized.append(features.serialize_example(ex))
  acc = stats.empty_accumulator()
  for s in samples:
    stats.add_example(acc, s)
  want = json.dumps(stats.finalize(acc), sort_keys=True)
  with beam.Pipeline(runner="FnApiRunner") as p:  # what run_build uses without --runner
    out = (p | beam.Create(serialized, reshuffle=False)
           | beam.CombineGlobally(stats.TrainStatsCombineFn()))
    assert_that(out, lambda got: _equal(got, [want]))


def _equal(got, want):
  assert list(got) == want


def test_sum_counters_combine():
  fn = pipeline.SumCountersFn()
  a = fn.add_input(fn.create_accumulator(), json.dumps({"masked_pixels/aster": 3}))
  b = fn.add_input(fn.create_accumulator(), json.dumps({"masked_pixels/aster": 4, "x": 1}))
  merged = fn.merge_accumulators([pipeline.JsonDictCoder().decode(pipeline.JsonDictCoder().encode(a)), b])
  assert json.loads(fn.extract_output(merged)) == {"masked_pixels/aster": 7, "x": 1}
