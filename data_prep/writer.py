"""Writing the dataset directory: ArrayRecord shards, TFDS metadata, JSON side files.

Layout of a finished dataset (what `tfds.builder_from_directory`, `tfds.data_source` and
`grain.sources.ArrayRecordDataSource` read, without TensorFlow)::

  <output_dir>/<name>/<version>/
    <name>-<split>.array_record-00000-of-0000N   records sorted by tile_id, 'group_size:1'
    dataset_info.json, features.json             through tfds.core.DatasetInfo
    statistics.json                               train statistics (data_prep.stats)
    manifest.json, dead_letters.jsonl             counts, reasons, provenance
    tokenizer.model                               SentencePiece (unless no train captions)

A build writes everything into a temporary sibling ``<version>.incomplete-<id>`` and
`commit` renames it into place last: a build that dies midway leaves no directory that looks
like a dataset (no ``<version>`` folder; leftovers carry the ``.incomplete-`` marker).

Paths go through Beam's `FileSystems`, so a ``gs://`` output works as well as a local one;
ArrayRecord itself writes POSIX files, so remote shards are written to a local temporary
file first and copied. On a local filesystem the final rename is one atomic directory
rename; on an object store files are moved one by one with ``dataset_info.json`` and
``manifest.json`` last, so a reader still never sees a dataset before it is complete. An object
store has no directories: a dataset there is "present" when any object lies under its prefix
(`dir_exists`), and replacing one removes the old completion files first, then every old
object, so no stale shard of a larger old build stays beside the new ones.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Mapping, Sequence

from apache_beam.io.filesystems import FileSystems

# Written last when committing to an object store: their presence means "complete".
from geomeld_jax.records import COMPLETION_FILES, INCOMPLETE_MARKER  # noqa: F401 (re-exported)

# group_size:1 keeps every record randomly accessible. Compression trades disk for read speed
# (synthetic full-modality records, 2 cores): zstd (ArrayRecord's default) ~30% of raw float32
# and ~930 reads/s per core; snappy ~38% and ~1,500/s; uncompressed ~48% and ~3,000/s.
COMPRESSION_OPTIONS = {"zstd": "group_size:1", "snappy": "group_size:1,snappy",
                       "uncompressed": "group_size:1,uncompressed"}
FILE_SUFFIX = "array_record"


def is_local(path: str) -> bool:
  return FileSystems.get_scheme(os.fspath(path)) is None


def join(*parts: str) -> str:
  return FileSystems.join(*parts) if not is_local(parts[0]) else os.path.join(*parts)


def exists(path: str) -> bool:
  return FileSystems.exists(path)


def write_bytes(path: str, data: bytes) -> None:
  with FileSystems.create(path) as f:
    f.write(data)


def read_bytes(path: str) -> bytes:
  with FileSystems.open(path) as f:
    return f.read()


def read_lines(pattern: str) -> list[str]:
  """Every line of every file matching `pattern` (e.g. Beam WriteToText shards)."""
  lines: list[str] = []
  for result in FileSystems.match([pattern]):
    for metadata in sorted(result.metadata_list, key=lambda m: m.path):
      # "\n" only, as WriteToText writes: str.splitlines() also splits at U+2028, U+0085 ...,
      # which JSON leaves unescaped inside a caption.
      file_lines = read_bytes(metadata.path).decode("utf-8").split("\n")
      if file_lines[-1] == "":  # after the newline that ends the last line
        file_lines.pop()
      lines.extend(file_lines)
  return lines


def _objects_under(path: str) -> list[str]:
  """Every file below `path` (on an object store: every object under the prefix)."""
  pattern = join(path.rstrip("/"), "**")
  return sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)


def dir_exists(path: str) -> bool:
  """A directory is there. An object store has no directories: `exists` is False for a
  prefix, so this asks whether any object lies under it."""
  if is_local(path):
    return os.path.exists(path)
  return exists(path) or bool(_objects_under(path))


def delete_tree(path: str) -> None:
  """Removes a file or a directory with everything below it; nothing there is fine."""
  if is_local(path):
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    return
  paths = _objects_under(path) or ([path] if exists(path) else [])
  if paths:
    FileSystems.delete(paths)


def write_records(path: str, records: Sequence[bytes], compression: str) -> int:
  """Writes one ArrayRecord file (in the given order); returns its size in bytes."""
  if compression not in COMPRESSION_OPTIONS:
    raise ValueError(f"unknown compression {compression!r}; choose from {sorted(COMPRESSION_OPTIONS)}")
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

  def _write(local_path: str) -> int:
    writer = ArrayRecordWriter(local_path, COMPRESSION_OPTIONS[compression])
    try:
      for record in records:
        writer.write(record)
    finally:
      writer.close()
    return os.path.getsize(local_path)

  if is_local(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return _write(path)
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "shard")
    size = _write(local)
    with open(local, "rb") as src, FileSystems.create(path) as dst:
      shutil.copyfileobj(src, dst, 16 << 20)
    return size


class RecordSerializer:
  """Example dict -> tf.train.Example bytes, byte-identical across processes.

  `FeaturesDict.serialize_example` leaves the order of the proto's feature map to the
  protobuf runtime, which differs from one process to the next; serialising with
  ``deterministic=True`` sorts the map keys, so rebuilds give identical record bytes.
  Readers (tfds, grain + records.decode) are unaffected.
  """

  def __init__(self):
    from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top

    from geomeld_jax import records  # pylint: disable=g-import-not-at-top

    self.features = records.features()
    self._serializer = example_serializer.ExampleSerializer(self.features.get_serialized_info())

  def __call__(self, example) -> bytes:
    proto = self._serializer.get_tf_example(self.features.encode_example(example))
    return proto.SerializeToString(deterministic=True)


def shard_filename(name: str, split: str, index: int, count: int) -> str:
  """The TFDS shard name: ``<name>-<split>.array_record-XXXXX-of-YYYYY``."""
  return f"{name}-{split}.{FILE_SUFFIX}-{index:05d}-of-{count:05d}"


def write_dataset_info(dataset_dir: str, name: str, version: str, description: str,
                       shards: Mapping[str, Sequence[tuple[int, int]]]) -> None:
  """dataset_info.json + features.json through tfds.core.DatasetInfo.

  Args:
    dataset_dir: ``.../<name>/<version>`` (or its temporary sibling).
    name, version: TFDS dataset name and version.
    description: free text for dataset_info.json.
    shards: split -> [(num_examples, num_bytes)] per shard file, in shard order.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import dataset_info as dataset_info_lib  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import naming  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import utils as tfds_utils  # pylint: disable=g-import-not-at-top

  from geomeld_jax import records  # pylint: disable=g-import-not-at-top

  identity = dataset_info_lib.DatasetIdentity(
      name=name, version=tfds_utils.Version(version), data_dir=dataset_dir,
      module_name="data_prep.writer")
  info = tfds.core.DatasetInfo(builder=identity, description=description,
                               features=records.features(),
                               homepage="https://arxiv.org/abs/2604.10591")
  info.set_file_format(FILE_SUFFIX)
  split_infos = []
  for split in sorted(shards):
    template = naming.ShardedFileTemplate(data_dir=dataset_dir, dataset_name=name, split=split,
                                          filetype_suffix=FILE_SUFFIX)
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[n for n, _ in shards[split]],
        num_bytes=sum(b for _, b in shards[split]), filename_template=template))
  info.set_splits(tfds.core.SplitDict(split_infos))
  if is_local(dataset_dir):
    info.write_to_directory(dataset_dir)
    return
  with tempfile.TemporaryDirectory() as tmp:
    info.write_to_directory(tmp)
    for filename in sorted(os.listdir(tmp)):
      with open(os.path.join(tmp, filename), "rb") as f:
        write_bytes(join(dataset_dir, filename), f.read())


def temporary_dir_for(final_dir: str, build_id: str) -> str:
  """The sibling a build writes into before `commit`."""
  return final_dir.rstrip("/") + INCOMPLETE_MARKER + build_id


def commit(tmp_dir: str, final_dir: str, overwrite: bool) -> None:
  """Moves a finished build into place; the old dataset goes only once the new one is whole."""
  if is_local(final_dir):
    old = None
    if os.path.exists(final_dir):
      if not overwrite:
        raise FileExistsError(f"dataset directory {final_dir} already exists; pass --overwrite")
      old = temporary_dir_for(final_dir, "replaced")
      shutil.rmtree(old, ignore_errors=True)
      os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    if old:
      shutil.rmtree(old)
    return
  if dir_exists(final_dir):
    if not overwrite:
      raise FileExistsError(f"dataset directory {final_dir} already exists; pass --overwrite")
    # No atomic rename here: the old dataset stops looking complete first, then goes whole
    # (stale shards of a build with more shards must not stay beside the new ones).
    old = _objects_under(final_dir)
    markers = [p for p in old if p.rsplit("/", 1)[-1] in COMPLETION_FILES]
    for batch in (markers, [p for p in old if p not in markers]):
      if batch:
        FileSystems.delete(batch)
  prefix = tmp_dir.rstrip("/") + "/"
  sources = _objects_under(tmp_dir)
  names = [p[len(prefix):] for p in sources]
  order = sorted(range(len(sources)), key=lambda i: (names[i] in COMPLETION_FILES, names[i]))
  for i in order:
    FileSystems.rename([sources[i]], [join(final_dir, names[i])])
  delete_tree(tmp_dir)


def is_complete(dataset_dir: str) -> bool:
  """True when a committed dataset (records metadata and manifest) is there."""
  return all(exists(join(dataset_dir, f)) for f in COMPLETION_FILES)
