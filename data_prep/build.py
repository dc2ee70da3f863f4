r"""Builds a GeoMeld dataset (TFDS ArrayRecord format) from one or more sources.

Usage (DirectRunner, this machine)::

  python -m data_prep.build --source='geomeld:/data/release/*.tar' \
      --source='bigearthnet:/data/bigearthnet' --output_dir=/data/tfds

  geomeld-build --source=synthetic:/tmp/shards --output_dir=/tmp/tfds --overwrite \
      -- --direct_num_workers=2 --direct_running_mode=multi_processing

Flags this module defines come first; everything after them that absl does not know (or
everything after a bare ``--``) goes to Beam as standard pipeline options, so any runner
works. On Dataflow (the launcher needs read access to the inputs, since units are listed
before the job starts; the workers need the same packages, shipped with ``--setup_file`` or
a custom container)::

  python -m data_prep.build \
      --source='geomeld:/mnt/release/*.tar' --output_dir=gs://my-bucket/tfds \
      --num_shards=1024 -- \
      --runner=DataflowRunner --project=my-project --region=europe-west4 \
      --temp_location=gs://my-bucket/tmp --setup_file=./setup.py \
      --machine_type=n2-highmem-4 --max_num_workers=64

Output: ``<output_dir>/<name>/<version>/`` with records, dataset_info.json, features.json,
statistics.json, manifest.json, dead_letters.jsonl and tokenizer.model (see
`data_prep.writer`). An existing dataset directory is only replaced with ``--overwrite``, and
only once the new build is complete. Exit status 1 with a one-line error on bad input.
"""

from __future__ import annotations

import logging
import sys

from absl import app
from absl import flags

from data_prep import splits
from data_prep import tokenizer

FLAGS = flags.FLAGS

_SOURCE = flags.DEFINE_multi_string(
    "source", [], "Input source, repeatable: geomeld:<glob>, synthetic:<dir>, mmearth:<h5>, "
    "virginia:<dir>, eolearn:<dir>, bigearthnet:<dir>, raster:<dir>, s2safe:<glob of .SAFE>.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "TFDS data_dir: the dataset goes to <output_dir>/<name>/<version>/.")
_NAME = flags.DEFINE_string("name", "geomeld", "TFDS dataset name (file prefix).")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False,
                                  "Replace an existing dataset directory once the build succeeds.")
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", 0, "Hash buckets of tile ids = max record files per split; 0 = auto: one per "
    "input unit or one per --auto_shard_mb of input, whichever is more (at most 1024). A "
    "shard's records must fit in a worker's memory.")
_AUTO_SHARD_MB = flags.DEFINE_integer(
    "auto_shard_mb", 256, "With --num_shards=0: about this many MiB of input files per shard "
    "(the write stage holds one shard in memory).")
_BLOCK_SIZE_M = flags.DEFINE_float("block_size_m", 10_000.0,
                                   "Side of the spatial blocks that decide splits, in metres.")
_SPLIT_FRACTIONS = flags.DEFINE_string("split_fractions", "0.8,0.1,0.1",
                                       "train,val,test fractions of blocks (sum to 1).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the block -> split hash.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", tokenizer.DEFAULT_VOCAB_SIZE,
                                   "SentencePiece vocabulary size (an upper bound on small corpora).")
_CAPTIONER = flags.DEFINE_string(
    "captioner", "passthrough",
    "Caption stage: 'passthrough' keeps the sources' captions; 'agentic' (offline agents: "
    "orchestrator, realiser, evaluator, verifier) or 'llm' (an OpenAI-compatible server, "
    "GEOMELD_LLM_* env, falling back to the offline realiser) write verified captions.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 1000, "Log throughput every N samples per worker.")
_COMPRESSION = flags.DEFINE_enum(
    "compression", "snappy", ["zstd", "snappy", "uncompressed"],
    "ArrayRecord compression: zstd is smallest; snappy reads ~1.6x faster at ~1.3x the bytes.")


def config_from_flags():
  """The BuildConfig the parsed flags describe (errors name the bad flag)."""
  from data_prep import pipeline  # pylint: disable=g-import-not-at-top

  if not _OUTPUT_DIR.value:
    raise ValueError("--output_dir is required")
  fractions = splits.parse_fractions(_SPLIT_FRACTIONS.value)
  return pipeline.BuildConfig(
      sources=tuple(_SOURCE.value),
      output_dir=_OUTPUT_DIR.value,
      name=_NAME.value,
      overwrite=_OVERWRITE.value,
      num_shards=_NUM_SHARDS.value,
      auto_shard_bytes=_AUTO_SHARD_MB.value << 20,
      split=splits.SplitConfig(block_size_m=_BLOCK_SIZE_M.value, fractions=fractions,
                               seed=_SEED.value),
      vocab_size=_VOCAB_SIZE.value,
      captioner=_CAPTIONER.value,
      log_every=_LOG_EVERY.value,
      compression=_COMPRESSION.value,
  )


def main(argv: list[str]) -> None:
  from data_prep import pipeline  # pylint: disable=g-import-not-at-top

  beam_args = [a for a in argv[1:] if a != "--"]
  try:
    config = config_from_flags()
    result = pipeline.run_build(config, beam_args)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    # Bad input: one clear line, no traceback.
    print(f"geomeld-build: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(result.summary())


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing that hands unknown flags (Beam's) through instead of failing on them."""
  return FLAGS(argv, known_only=True)


def run(argv: list[str] | None = None) -> None:
  """Console entry point ``geomeld-build``."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  app.run(main, argv=argv if argv is not None else sys.argv, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
