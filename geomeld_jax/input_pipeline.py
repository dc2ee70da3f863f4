"""Grain input pipeline over a built GeoMeld dataset (TFDS ArrayRecord, see data_prep).

Per record: decode + normalise with the build's statistics (geomeld_jax.records), the same
random crop / flips / 90-degree rotations applied to every pixel modality, one caption drawn,
its in-tile directions ("in the north-east of the tile", "north-facing") turned with the
pixels, and tokenised with the build's SentencePiece model. Per host: a disjoint slice of a globally
shuffled, repeated index space, batched to the host's share of the global batch. The
iterator is a grain DatasetIterator, so its position is saved with each checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

import grain
import numpy as np

from data_prep.captioning import lexicon  # the caption vocabulary, compass words included
from geomeld_jax import modalities as mod
from geomeld_jax import records

# SentencePiece ids fixed by data_prep.tokenizer (T5 style).
PAD_ID, EOS_ID = 0, 1


@dataclasses.dataclass(frozen=True)
class DatasetFiles:
  """Where the parts of a built dataset live (one versioned TFDS directory)."""

  root: pathlib.Path

  @property
  def statistics(self) -> pathlib.Path:
    return self.root / "statistics.json"

  @property
  def tokenizer(self) -> pathlib.Path:
    return self.root / "tokenizer.model"

  @property
  def manifest(self) -> pathlib.Path:
    return self.root / "manifest.json"


def _is_built(d: pathlib.Path) -> bool:
  return (records.INCOMPLETE_MARKER not in d.name and (d / "statistics.json").is_file()
          and all((d / f).is_file() for f in records.COMPLETION_FILES))


def _version_key(d: pathlib.Path) -> tuple:
  return tuple(int(x) if x.isdigit() else -1 for x in d.name.split("."))


def locate_dataset(path: str | pathlib.Path, build_hint: str = "") -> DatasetFiles:
  """Finds the committed dataset under `path`: the dir itself, or `<name>/<version>`.

  Unfinished builds (``<version>.incomplete-*``, or no manifest yet) are never picked. Of
  several versions of one dataset, the highest (1.10.0 > 1.9.0) is used.

  Raises:
    FileNotFoundError: with the command that builds the dataset when nothing is there.
    ValueError: for an object-store URL, or when `path` holds several different datasets.
  """
  if str(path).startswith(("gs://", "s3://")):
    raise ValueError(
        f"data_dir {path} is an object-store URL, which ArrayRecord cannot read (google/"
        "array_record#120). Mount the bucket and point data_dir inside the mount: on a TPU VM, "
        "launch/tpu.sh run --data-bucket=gs://BUCKET mounts it (gcsfuse) at /tmp/gcsfuse, so "
        "--config.input.data_dir=/tmp/gcsfuse/<path in the bucket>.")
  p = pathlib.Path(path)
  if _is_built(p):
    return DatasetFiles(p)
  versions = [d for d in sorted(p.glob("*/*")) + sorted(p.glob("*")) if _is_built(d)]
  names = sorted({d.parent for d in versions})
  if len(names) > 1:
    raise ValueError(f"{p} holds several datasets ({', '.join(str(n) for n in names)}): point "
                     "data_dir at one of them")
  if versions:
    return DatasetFiles(max(versions, key=_version_key))
  hint = build_hint or "python -m data_prep.build --source=geomeld:'<shards>/*.tar' --output_dir=" + str(p)
  raise FileNotFoundError(f"no built GeoMeld dataset under {p} (looked for a committed build: "
                          f"dataset_info.json, manifest.json, statistics.json). Build one with:\n"
                          f"  {hint}")


def fingerprint(files: DatasetFiles) -> dict[str, Any]:
  """What a saved iterator position and the model's input depend on: split sizes, statistics,
  tokenizer, and the input bands in the order this code feeds them (the export records them).

  Content, not path or build time: the same data moved or rebuilt keeps its fingerprint.
  """
  def digest(f: pathlib.Path) -> str | None:
    return hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.is_file() else None

  manifest = json.loads(files.manifest.read_text())
  return {"name": manifest["name"], "version": manifest["version"],
          "record_version": manifest["record_version"],
          "splits": {k: v for k, v in sorted(manifest["splits"].items())},
          "statistics_sha256": digest(files.statistics), "tokenizer_sha256": digest(files.tokenizer),
          "input_bands": list(mod.PIXEL_MODALITIES[mod.INPUT_MODALITY].bands)}


class Tokenizer:
  """SentencePiece ids with sticky EOS, padded to a fixed length."""

  def __init__(self, model_path: pathlib.Path, max_len: int):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
    if self._sp.pad_id() != PAD_ID or self._sp.eos_id() != EOS_ID:
      raise ValueError(f"{model_path}: pad/eos ids are {self._sp.pad_id()}/{self._sp.eos_id()}, "
                       f"expected {PAD_ID}/{EOS_ID} (data_prep.tokenizer)")
    self.max_len = max_len
    self.vocab_size = self._sp.get_piece_size()

  def __call__(self, text: str) -> np.ndarray:
    ids = self._sp.encode(text.lower())[: self.max_len - 1] + [EOS_ID]
    out = np.full(self.max_len, PAD_ID, np.int32)
    out[: len(ids)] = ids
    return out


class ProcessRecord(grain.transforms.RandomMap):
  """Record -> example: stored arrays, augmented identically across modalities, tokenised.

  Pixel modalities stay in their compact storage dtypes (uint16/int16/uint8): the train step
  normalises them on device (`records.model_inputs`), which costs the host nothing and halves
  the bytes sent to the accelerator.
  """

  def __init__(self, tokenizer: Tokenizer | None, *, crop_size: int, augment: bool,
               text_len: int):
    if not 0 < crop_size <= mod.TILE_SIZE:
      raise ValueError(f"crop_size {crop_size} must be in 1..{mod.TILE_SIZE} (the tile size)")
    self._tokenizer = tokenizer
    self._crop = crop_size
    self._augment = augment
    self._text_len = text_len

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    try:
      return self._process(record, rng)
    except Exception as e:  # a bad record stops every host: say which one
      raise ValueError(f"record {records.tile_id(record)!r}: {type(e).__name__}: {e}") from e

  def _process(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    ex = records.decode_storage(record)
    size = ex[mod.INPUT_MODALITY].shape[0]
    if self._augment:
      top, left = rng.integers(0, size - self._crop + 1, size=2)
      flip_h, flip_v = rng.integers(0, 2, size=2)
      k = int(rng.integers(0, 4))
    else:  # evaluation: a centre crop, no flips
      top = left = (size - self._crop) // 2
      flip_h = flip_v = k = 0
    for key, v in ex.items():
      if v.ndim < 2 or v.shape[0] != size:  # image-level targets
        continue
      v = v[top:top + self._crop, left:left + self._crop]
      if flip_h:
        v = v[:, ::-1]
      if flip_v:
        v = v[::-1]
      ex[key] = np.ascontiguousarray(np.rot90(v, k, axes=(0, 1)))
    caps = records.captions(record)
    if self._tokenizer is not None and caps:
      caption = lexicon.reorient_caption(caps[int(rng.integers(len(caps)))], flip_lr=bool(flip_h),
                                         flip_ud=bool(flip_v), rot90=k)
      ex["text_tokens"] = self._tokenizer(caption)
      ex["has_caption"] = np.bool_(True)
    else:
      ex["text_tokens"] = np.zeros(self._text_len, np.int32)
      ex["has_caption"] = np.bool_(False)
    return ex


def _split_source(files: DatasetFiles, split: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder_from_directory(str(files.root))
  if split not in builder.info.splits:
    raise ValueError(f"dataset {files.root} has no split {split!r}; it has {list(builder.info.splits)}")
  return builder.as_data_source(split=split)


def make_dataset(files: DatasetFiles, split: str, *, global_batch_size: int, crop_size: int,
                 text_len: int, seed: int, train: bool, process_index: int = 0,
                 process_count: int = 1, num_workers: int = 0,
                 max_eval_batches: int | None = None) -> grain.IterDataset:
  """The host-local batched dataset of one split, in storage form.

  Batches hold the stored pixel arrays; `records.model_inputs(batch, normalizer(files))` (on
  device in the train step, or with numpy) turns them into the model's batch contract.

  Train: shuffled with `seed` (a new permutation each epoch), repeated forever, augmented.
  Eval: in order, one pass, centre-cropped, whole global batches only (the same number on
  every host), truncated to `max_eval_batches` batches.
  """
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} hosts")
  per_host = global_batch_size // process_count
  tokenizer = Tokenizer(files.tokenizer, text_len) if files.tokenizer.is_file() else None
  ds = grain.MapDataset.source(_split_source(files, split))
  if len(ds) < global_batch_size:
    raise ValueError(f"split {split!r} has {len(ds)} records, fewer than one global batch "
                     f"({global_batch_size})")
  if train:
    ds = ds.shuffle(seed=seed).repeat(None)
  else:
    # Whole global batches only, so every host runs the same number of eval steps (a host
    # with one batch more would wait forever in the step's collectives).
    num_batches = len(ds) // global_batch_size
    if max_eval_batches is not None:
      num_batches = min(num_batches, max_eval_batches)
    ds = ds[:num_batches * global_batch_size]
  # Augmentation draws are keyed by the global index (before the host slice), so hosts draw
  # independently (keyed by the host-local index, every host repeated the same draws).
  ds = ds.random_map(ProcessRecord(tokenizer, crop_size=crop_size, augment=train,
                                   text_len=text_len), seed=seed + 1)
  ds = ds[process_index::process_count]  # disjoint per host: same permutation everywhere
  # Records are read ahead by grain's threads into a buffer of one host batch; grain's default
  # (500 elements) would hold up to 500 batches had the batching come first. Grain wants no
  # more threads than buffer slots.
  threads = min(grain.ReadOptions().num_threads, per_host)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=per_host))
  it = it.batch(per_host, drop_remainder=True)
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def normalizer(files: DatasetFiles) -> records.Normalizer:
  return records.Normalizer.from_file(files.statistics)
