"""Build and read benchmarks of the data pipeline (CPU, this machine).

  python -m data_prep.bench [--num_samples=256] [--work_dir=DIR] [--decode_seconds=5]

Prints:
* build throughput on the DirectRunner (samples read / s for the Beam pipeline alone and for
  the whole build including metadata, statistics and tokenizer);
* bytes per written sample on disk vs the raw float32 size (26 channels x 128 x 128 x 4 B);
* record decode + normalise throughput on one core, in records/s, reading through
  `grain.sources.ArrayRecordDataSource` (+ tfds feature parsing) and through
  `tfds.data_source`, then `geomeld_jax.records.decode` with the build's Normalizer
  (normalisation on the host, numpy), and the training input pipeline's host path
  (`records.decode_storage`: the step normalises on device, so the host only reads, parses
  and views the stored integers).
Goals: decode+normalise >= 1,000 full-modality records/s per core; on disk <= 40% of raw.
Synthetic shard generation is not timed.
"""

from __future__ import annotations

import glob
import os
import tempfile
import time

from absl import app
from absl import flags

from data_prep import pipeline
from data_prep import splits
from data_prep import synthetic
from geomeld_jax import modalities as mod
from geomeld_jax import records

_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 256, "Synthetic samples to build.")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Scratch folder (default: a temp dir).")
_DECODE_SECONDS = flags.DEFINE_float("decode_seconds", 5.0, "Time budget per decode benchmark.")
_COMPRESSION = flags.DEFINE_enum("compression", "snappy", ["zstd", "snappy", "uncompressed"],
                                 "ArrayRecord compression of the benchmarked build.")

RAW_FLOAT32_BYTES = sum(m.num_bands for m in mod.PIXEL_MODALITIES.values()) * (
    mod.TILE_SIZE * mod.TILE_SIZE * 4)
DECODE_GOAL_RECORDS_PER_S = 1000.0
DISK_GOAL_FRACTION = 0.40


def _rate(fn, n: int, budget_s: float) -> float:
  """Calls fn(i) cycling over n items for about budget_s; returns calls per CPU-second.

  CPU time of this process (not wall time): "per core" even on a machine shared with other
  jobs, where wall time would count the time the process waited for a core.
  """
  fn(0)  # warm-up (lazy parsers, caches)
  calls, start, cpu0 = 0, time.perf_counter(), time.process_time()
  while True:
    fn(calls % n)
    calls += 1
    if time.perf_counter() - start >= budget_s and calls >= 20:
      return calls / max(time.process_time() - cpu0, 1e-9)


def run_bench(work_dir: str, num_samples: int, decode_seconds: float,
              compression: str = "snappy") -> dict[str, float]:
  shard_dir = os.path.join(work_dir, "shards")
  if not glob.glob(os.path.join(shard_dir, "*.tar")):
    synthetic.write_release_shards(shard_dir, num_samples, samples_per_shard=64)
  config = pipeline.BuildConfig(sources=(f"synthetic:{shard_dir}",),
                                output_dir=os.path.join(work_dir, "out"), overwrite=True,
                                split=splits.SplitConfig(), vocab_size=1000,
                                compression=compression)
  cpu0 = time.process_time()
  result = pipeline.run_build(config)
  build_cpu_s = time.process_time() - cpu0
  m = result.manifest
  record_bytes = sum(s["bytes"] for s in m["splits"].values())
  per_sample = record_bytes / max(m["written"], 1)

  import grain  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  files = sorted(glob.glob(os.path.join(result.dataset_dir, "geomeld-train.array_record-*")))
  normalizer = records.Normalizer.from_file(os.path.join(result.dataset_dir, "statistics.json"))
  features = records.features()
  source = grain.sources.ArrayRecordDataSource(files)
  n = len(source)
  raw = [source[i] for i in range(n)]
  read_only = _rate(lambda i: source[i], n, decode_seconds / 2)
  parse_only = _rate(lambda i: features.deserialize_example_np(raw[i]), n, decode_seconds / 2)
  grain_rate = _rate(lambda i: records.decode(features.deserialize_example_np(source[i]),
                                              normalizer), n, decode_seconds)
  tfds_source = tfds.builder_from_directory(result.dataset_dir).as_data_source("train")
  tfds_rate = _rate(lambda i: records.decode(tfds_source[i], normalizer), n, decode_seconds)
  pipeline_rate = _rate(lambda i: records.decode_storage(features.deserialize_example_np(source[i])),
                        n, decode_seconds)
  parsed = [features.deserialize_example_np(r) for r in raw[:64]]
  decode_only = _rate(lambda i: records.decode(parsed[i], normalizer), len(parsed),
                      decode_seconds / 2)
  return {
      "compression": compression,
      "samples": m["read"],
      "written": m["written"],
      "pipeline_samples_per_s": m["read"] / m["pipeline_seconds"],
      "build_samples_per_s": m["samples_per_s"],
      "build_samples_per_cpu_s": m["read"] / build_cpu_s,
      "bytes_per_sample": per_sample,
      "raw_float32_bytes": RAW_FLOAT32_BYTES,
      "disk_fraction": per_sample / RAW_FLOAT32_BYTES,
      "array_record_read_per_s": read_only,
      "parse_per_s": parse_only,
      "decode_normalise_per_s": decode_only,
      "grain_read_parse_decode_per_s": grain_rate,
      "tfds_read_parse_decode_per_s": tfds_rate,
      "grain_read_parse_storage_per_s": pipeline_rate,
  }


def format_report(r: dict[str, float]) -> str:
  ok = lambda good: "meets goal" if good else "BELOW GOAL"  # noqa: E731
  best = max(r["grain_read_parse_decode_per_s"], r["tfds_read_parse_decode_per_s"],
             r["grain_read_parse_storage_per_s"])
  return "\n".join([
      f"build (DirectRunner, {r['samples']:.0f} samples, {r['written']:.0f} written): "
      f"{r['pipeline_samples_per_s']:.1f} samples/s pipeline, "
      f"{r['build_samples_per_s']:.1f} samples/s whole build (wall), "
      f"{r['build_samples_per_cpu_s']:.1f} samples per CPU-second",
      f"on disk: {r['bytes_per_sample'] / 1e3:.1f} kB/sample = {100 * r['disk_fraction']:.1f}% "
      f"of raw float32 ({r['raw_float32_bytes'] / 1e6:.2f} MB) "
      f"[goal <= {100 * DISK_GOAL_FRACTION:.0f}%: {ok(r['disk_fraction'] <= DISK_GOAL_FRACTION)}]",
      "one core, records per CPU-second:",
      f"  ArrayRecord read ({r['compression']:12s})        {r['array_record_read_per_s']:9.0f}",
      f"  tf.Example parse (tfds, numpy)            {r['parse_per_s']:9.0f}",
      f"  records.decode + Normalizer               {r['decode_normalise_per_s']:9.0f}",
      f"  grain source + parse + decode + normalise {r['grain_read_parse_decode_per_s']:9.0f}",
      f"  tfds.data_source + decode + normalise     {r['tfds_read_parse_decode_per_s']:9.0f}",
      f"  grain source + parse + stored arrays      {r['grain_read_parse_storage_per_s']:9.0f}"
      "   (training input path: normalised on device)",
      f"  [goal >= {DECODE_GOAL_RECORDS_PER_S:.0f}/s end to end: "
      f"{ok(best >= DECODE_GOAL_RECORDS_PER_S)}]",
  ])


def main(argv: list[str]) -> None:
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if _WORK_DIR.value:
    report = run_bench(_WORK_DIR.value, _NUM_SAMPLES.value, _DECODE_SECONDS.value,
                       _COMPRESSION.value)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      report = run_bench(tmp, _NUM_SAMPLES.value, _DECODE_SECONDS.value, _COMPRESSION.value)
  print(format_report(report))


if __name__ == "__main__":
  app.run(main)
