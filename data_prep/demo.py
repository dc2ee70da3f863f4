"""Builds the small embedded demo dataset: synthetic release shards -> the full build.

  python -m data_prep.demo --output_dir=/tmp/geomeld_demo [--num_samples=256]

Writes ``<output_dir>/synthetic_shards/*.tar`` and the dataset into
``<output_dir>/<name>/<version>/``. Idempotent: shards that already exist are reused (they
are a pure function of the seed) and a dataset that is already complete is not rebuilt; in
both cases the summary is printed. Runs on the DirectRunner in about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from data_prep import pipeline
from data_prep import splits
from data_prep import synthetic
from data_prep import writer

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder for the demo shards and dataset.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 256, "Synthetic samples to generate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic samples and of the split hash.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 1000, "Tokenizer vocabulary (small corpus).")
_BLOCK_SIZE_M = flags.DEFINE_float("block_size_m", 10_000.0, "Spatial block size in metres.")
_CAPTIONER = flags.DEFINE_string("captioner", "agentic",
                                 "Caption stage: agentic (offline agents), llm or passthrough.")


def build_demo(output_dir: str, num_samples: int = 256, seed: int = 0, vocab_size: int = 1000,
               block_size_m: float = 10_000.0, beam_args: tuple[str, ...] = (),
               captioner: str = "agentic") -> str:
  """Ensures the demo dataset exists; returns the text summary."""
  shard_dir = os.path.join(output_dir, "synthetic_shards")
  expected = -(-num_samples // 64)
  have = sorted(f for f in os.listdir(shard_dir) if f.endswith(".tar")) if os.path.isdir(
      shard_dir) else []
  if len(have) != expected:
    synthetic.write_release_shards(shard_dir, num_samples, samples_per_shard=64, seed=seed)
  config = pipeline.BuildConfig(
      sources=(f"synthetic:{shard_dir}",), output_dir=output_dir, vocab_size=vocab_size,
      captioner=captioner,
      split=splits.SplitConfig(block_size_m=block_size_m, seed=seed), overwrite=True)
  if writer.is_complete(config.dataset_dir):
    with open(os.path.join(config.dataset_dir, "manifest.json")) as f:
      result = pipeline.BuildResult(config.dataset_dir, json.load(f))
    return "demo dataset already complete (not rebuilt)\n" + result.summary()
  return pipeline.run_build(config, beam_args).summary()


def main(argv: list[str]) -> None:
  if not _OUTPUT_DIR.value:
    raise app.UsageError("--output_dir is required")
  print(build_demo(_OUTPUT_DIR.value, _NUM_SAMPLES.value, _SEED.value, _VOCAB_SIZE.value,
                   _BLOCK_SIZE_M.value, tuple(a for a in argv[1:] if a != "--"),
                   _CAPTIONER.value))


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: flags.FLAGS(argv, known_only=True))
