"""The dataset writer on an object store (gs:// and the like): no directories, prefixes only.

`MemoryObjectStore` is a Beam FileSystem with the semantics that matter here: `exists` is
true for objects only, listing is by prefix, rename is per object. Beam finds it by its scheme.
"""

import io

import pytest
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystem import FileSystem

from data_prep import pipeline
from data_prep import writer

ROOT = "memobj://bucket"


class _Upload(io.BytesIO):

  def __init__(self, store: "MemoryObjectStore", path: str):
    super().__init__()
    self._store, self._path = store, path

  def close(self):
    if not self.closed:
      self._store.objects[self._path] = self.getvalue()
      self._store.log.append(("put", self._path))
    super().close()


class MemoryObjectStore(FileSystem):
  objects: dict[str, bytes] = {}
  log: list[tuple[str, str]] = []

  @classmethod
  def scheme(cls):
    return "memobj"

  def join(self, basepath, *paths):
    return "/".join([basepath.rstrip("/")] + [p.strip("/") for p in paths])

  def split(self, path):
    head, _, tail = path.rpartition("/")
    return head, tail

  def mkdirs(self, path):
    pass

  def has_dirs(self):
    return False

  def _list(self, dir_or_prefix):
    for path, data in sorted(self.objects.items()):
      if path.startswith(dir_or_prefix):
        yield FileMetadata(path, len(data), 0.0)

  def create(self, path, mime_type="application/octet-stream",
             compression_type=CompressionTypes.AUTO):
    return _Upload(self, path)

  def open(self, path, mime_type="application/octet-stream",
           compression_type=CompressionTypes.AUTO):
    return io.BytesIO(self.objects[path])

  def copy(self, source_file_names, destination_file_names):
    for src, dst in zip(source_file_names, destination_file_names):
      self.objects[dst] = self.objects[src]

  def rename(self, source_file_names, destination_file_names):
    for src, dst in zip(source_file_names, destination_file_names):
      self.objects[dst] = self.objects.pop(src)
      self.log.append(("rename", dst))

  def exists(self, path):
    return path in self.objects

  def size(self, path):
    return len(self.objects[path])

  def last_updated(self, path):
    return 0.0

  def checksum(self, path):
    return str(len(self.objects[path]))

  def metadata(self, path):
    return FileMetadata(path, len(self.objects[path]), 0.0)

  def delete(self, paths):
    missing = [p for p in paths if p not in self.objects]
    if missing:
      raise BeamIOError("Delete operation failed", {p: FileNotFoundError(p) for p in missing})
    for path in paths:
      del self.objects[path]
      self.log.append(("delete", path))


@pytest.fixture
def store():
  MemoryObjectStore.objects = {}
  MemoryObjectStore.log = []
  return MemoryObjectStore


def _put(store, path: str, data: bytes = b"x") -> None:
  store.objects[f"{ROOT}/{path}"] = data


def _names_under(store, prefix: str) -> list[str]:
  return sorted(p[len(f"{ROOT}/{prefix}/"):] for p in store.objects
                if p.startswith(f"{ROOT}/{prefix}/"))


def test_a_prefix_is_a_directory_and_deletes_as_one(store):
  _put(store, "out/v/shard-0")
  _put(store, "out/v/_parts/train-00000.array_record")
  _put(store, "out/v2/keep")  # shares the prefix 'out/v' but not the directory 'out/v/'
  assert not writer.exists(f"{ROOT}/out/v")  # what made the old checks pass silently
  assert writer.dir_exists(f"{ROOT}/out/v") and writer.dir_exists(f"{ROOT}/out/v/_parts")
  assert not writer.dir_exists(f"{ROOT}/out/w")
  writer.delete_tree(f"{ROOT}/out/v")
  assert sorted(store.objects) == [f"{ROOT}/out/v2/keep"]
  writer.delete_tree(f"{ROOT}/out/v")  # nothing there is fine
  writer.delete_tree(f"{ROOT}/out/v2/keep")  # one object
  assert not store.objects


def test_commit_replaces_an_object_store_dataset_whole(store):
  final = f"{ROOT}/out/geomeld/1.0.0"
  old = ["geomeld-train.array_record-00000-of-00003", "geomeld-train.array_record-00001-of-00003",
         "geomeld-train.array_record-00002-of-00003", "statistics.json",
         "dataset_info.json", "manifest.json"]
  for name in old:
    _put(store, f"out/geomeld/1.0.0/{name}", b"old")
  tmp = writer.temporary_dir_for(final, "build1")
  new = ["geomeld-train.array_record-00000-of-00002", "geomeld-train.array_record-00001-of-00002",
         "statistics.json", "dataset_info.json", "manifest.json"]
  for name in new:
    _put(store, tmp[len(ROOT) + 1:] + f"/{name}", b"new")

  with pytest.raises(FileExistsError, match="pass --overwrite"):
    writer.commit(tmp, final, overwrite=False)
  assert _names_under(store, "out/geomeld/1.0.0") == sorted(old)  # untouched

  writer.commit(tmp, final, overwrite=True)
  assert _names_under(store, "out/geomeld/1.0.0") == sorted(new)  # no stale shard stays
  assert all(data == b"new" for data in store.objects.values())
  assert not [p for p in store.objects if writer.INCOMPLETE_MARKER in p]
  assert writer.is_complete(final)
  # The old dataset stopped looking complete before anything else went; the new one looks
  # complete only once every other file is in place.
  deletes = [p.rsplit("/", 1)[-1] for op, p in store.log if op == "delete"]
  assert set(deletes[:2]) == set(writer.COMPLETION_FILES)
  renames = [p.rsplit("/", 1)[-1] for op, p in store.log if op == "rename"]
  assert set(renames[-2:]) == set(writer.COMPLETION_FILES) and len(renames) == len(new)


def test_build_refuses_an_existing_object_store_dataset_before_any_work(store, tmp_path):
  _put(store, "out/geomeld/1.0.0/manifest.json")
  config = pipeline.BuildConfig(sources=(str(tmp_path / "missing"),), output_dir=f"{ROOT}/out")
  with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
    pipeline.run_build(config)
