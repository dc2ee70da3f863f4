"""The GeoMeld release: webdataset-style `.tar` shards of one `.h5` file per sample.

Layout of a member (see ARCHITECTURE.md): datasets ``sentinel2`` (12,128,128) float32 —
(9,128,128) in the NAIP subset (``*_n.tar``, B2-B4 absent) —, ``sentinel1`` (8,...),
``aster`` (2,...), ``canopy_height`` (2,...), ``esa_worldcover`` / ``dynamic_world``
(1,...) uint8, ``metadata`` (a JSON string), optionally ``naip`` (3,1280,1280) uint16 and a
caption (``caption`` or ``captions``: one string or an array of strings).

Shards are streamed with `tarfile` and each member is opened from memory with h5py; nothing
is extracted to disk. Every member becomes exactly one RawSample or one Rejection:

* ``truncated_tar``     the shard ends inside a member (or lacks its end-of-archive blocks):
                        the members before it are yielded, then this one Rejection.
* ``corrupt_h5``        a member is not a readable HDF5 file.
* ``bad_metadata``      the ``metadata`` dataset is missing or not a JSON object.
* ``missing_sentinel2`` the member has no ``sentinel2`` dataset.
* ``wrong_shape``       ``naip`` is present with a shape other than (3,1280,1280).
* ``unexpected_member`` a tar member that is not an ``.h5`` file.

NAIP is not carried into records (see modalities.NAIP_RELEASE_KEY): it is shape-checked here,
dropped, and flagged with ``metadata['naip_present'] = True`` so validation counts it.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import pathlib
import tarfile
from typing import Any, Iterator

import h5py
import numpy as np

from data_prep.sources.base import RawSample, Rejection, SourceItem
from geomeld_jax import modalities as mod

_FINGERPRINT_BYTES = 64 * 1024
_TAR_BLOCK = 512


def fingerprint_file(path: str) -> str:
  """`size:mtime_ns:sha1(first 64 KiB)` of a file: cheap, and changes when the file does."""
  st = os.stat(path)
  with open(path, "rb") as f:
    head = f.read(_FINGERPRINT_BYTES)
  return f"{st.st_size}:{st.st_mtime_ns}:{hashlib.sha1(head).hexdigest()}"


def expand_pattern(pattern: str, suffixes: tuple[str, ...] = (".tar",)) -> list[str]:
  """A file, a directory (its files with one of `suffixes`) or a glob -> sorted paths."""
  p = pathlib.Path(pattern)
  if p.is_dir():
    matches = [str(x) for x in p.iterdir() if x.is_file() and str(x).endswith(suffixes)]
  elif p.is_file():
    matches = [str(p)]
  else:
    matches = [m for m in glob.glob(pattern) if os.path.isfile(m)]
  if not matches:
    raise FileNotFoundError(f"no input matches {pattern!r} (missing path or empty glob)")
  return sorted(matches)


class GeoMeldReleaseSource:
  """Reads GeoMeld release shards; one unit per `.tar` shard."""

  name = "geomeld"

  def __init__(self, pattern: str, scheme: str = "geomeld"):
    self.pattern = pattern
    self.scheme = scheme  # provenance prefix ('synthetic' for generated release shards)
    self.name = scheme

  def units(self) -> list[str]:
    return expand_pattern(self.pattern, (".tar", ".tar.gz", ".tgz"))

  def fingerprint(self, unit: str) -> str:
    return fingerprint_file(unit)

  def input_bytes(self, unit: str) -> int:
    return os.path.getsize(unit)

  def read(self, unit: str) -> Iterator[SourceItem]:
    provenance = f"{self.scheme}:{unit}"
    current, last, seen = "", "-", 0
    try:
      with tarfile.open(unit, mode="r|*") as tar:
        for member in tar:
          seen += 1
          if member.isdir():
            continue
          if not member.isfile():  # links, devices: their content is not in this member
            yield Rejection(f"{provenance}:{member.name}", "", "unexpected_member",
                            f"{member.name} is not a regular file (tar type {member.type!r})")
            continue
          current = member.name
          data = tar.extractfile(member).read()
          if len(data) != member.size:
            raise tarfile.ReadError(f"member {member.name} is short")
          yield self._member(f"{provenance}:{member.name}", member.name, data)
          last, current = member.name, ""
        end, comptype = tar.offset, tar.fileobj.comptype
    except (tarfile.ReadError, EOFError, OSError) as e:
      if not seen:
        yield Rejection(provenance, "", "not_a_tar", f"not a (compressed) tar file: {e}")
      else:
        yield Rejection(source=f"{provenance}:{current}", tile_id="", reason="truncated_tar",
                        detail=f"shard ends inside member {current or '?'}: {e}")
      return
    if problem := _end_of_archive_problem(unit, comptype, end):
      reason, detail = problem
      yield Rejection(source=provenance, tile_id="", reason=reason,
                      detail=f"{detail} (after member {last})")

  def _member(self, source: str, member_name: str, data: bytes) -> SourceItem:
    stem = pathlib.PurePosixPath(member_name).name.split(".")[0]
    if not member_name.endswith(".h5"):
      return Rejection(source, "", "unexpected_member", f"{member_name} is not an .h5 member")
    try:
      h5 = h5py.File(io.BytesIO(data), "r")
    except OSError as e:
      return Rejection(source, "", "corrupt_h5", f"{member_name}: {e}")
    try:
      with h5:
        return _sample_from_h5(h5, source, stem)
    except Exception as e:  # pylint: disable=broad-except  # damaged or mis-shaped content
      return Rejection(source, "", "corrupt_h5", f"{member_name}: {type(e).__name__}: {e}")


_OPENERS = {"tar": open, "gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}


def _end_of_archive_problem(path: str, comptype: str, end: int) -> tuple[str, str] | None:
  """Why the tar stream stopped at byte `end` (of its uncompressed stream), or None when it
  stopped at the end-of-archive marker: at least two zero blocks and nothing but zeros after.

  tarfile ends its member loop without an error at a zero block, at a damaged header and at
  a clean cut between members; only the bytes from there on tell them apart. A damaged
  header or a second archive appended to the first would otherwise lose every later member
  silently.
  """
  zeros, nonzero_at = 0, None
  with _OPENERS[comptype](path, "rb") as f:
    f.seek(end)
    while chunk := f.read(1 << 20):
      if any(chunk):
        nonzero_at = end + zeros + next(i for i, b in enumerate(chunk) if b)
        break
      zeros += len(chunk)
  if nonzero_at is not None:
    return ("corrupt_tar", f"unreadable data at byte {nonzero_at} of the tar stream, after the "
            "last member it could read (a damaged header, or a second archive appended to "
            "the first); the rest of the shard is unread")
  if zeros < 2 * _TAR_BLOCK:
    return "truncated_tar", "shard has no end-of-archive blocks (cut at a member boundary)"
  return None


def _text(v: Any) -> str:
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, np.ndarray) and v.shape == ():
    return _text(v.item())
  return str(v)


def _read_metadata(h5: h5py.File) -> dict | None:
  if "metadata" in h5:
    raw = h5["metadata"][()]
  elif "metadata" in h5.attrs:
    raw = h5.attrs["metadata"]
  else:
    return None
  try:
    meta = json.loads(_text(raw))
  except (ValueError, UnicodeDecodeError):
    return None
  return meta if isinstance(meta, dict) else None


def _read_captions(h5: h5py.File) -> list[str]:
  for key in ("caption", "captions"):
    if key in h5:
      v = h5[key][()]
      items = v.ravel().tolist() if isinstance(v, np.ndarray) else [v]
      return [_text(x) for x in items]
  return []


def _sample_from_h5(h5: h5py.File, source: str, stem: str) -> SourceItem:
  meta = _read_metadata(h5)
  if meta is None:
    return Rejection(source, stem, "bad_metadata", "metadata missing or not a JSON object")
  tile_id = meta.get("tile_id")
  if tile_id is not None and not isinstance(tile_id, str):  # a number is no id: "7" != "07"
    return Rejection(source, stem, "bad_metadata",
                     f"metadata tile_id must be a str, got {type(tile_id).__name__} {tile_id!r}")
  tile_id = (tile_id or "").strip()
  if not tile_id:
    tile_id = stem
    meta["tile_id_from"] = "member_name"  # recorded: the id did not come from the metadata
  meta["tile_id"] = tile_id
  if mod.SENTINEL2.release_key not in h5:
    return Rejection(source, tile_id, "missing_sentinel2", "member has no sentinel2 dataset")

  arrays: dict[str, np.ndarray] = {}
  band_names: dict[str, tuple[str, ...]] = {}
  for m in mod.PIXEL_MODALITIES.values():
    if m.release_key in h5:
      arrays[m.release_key] = np.asarray(h5[m.release_key][()])
  s2 = arrays[mod.SENTINEL2.release_key]
  subset = tuple(b for b in mod.SENTINEL2.bands if b not in mod.NAIP_SUBSET_MISSING_S2_BANDS)
  if s2.ndim == 3 and s2.shape[0] == len(subset):
    band_names[mod.SENTINEL2.release_key] = subset  # the NAIP subset's 9-band Sentinel-2
  if mod.NAIP_RELEASE_KEY in h5:
    shape = tuple(h5[mod.NAIP_RELEASE_KEY].shape)
    if shape != mod.NAIP_SHAPE:
      return Rejection(source, tile_id, "wrong_shape", f"naip must be {mod.NAIP_SHAPE}, got {shape}")
    meta["naip_present"] = True
  return RawSample(tile_id=tile_id, source=source, arrays=arrays, metadata=meta,
                   captions=_read_captions(h5), band_names=band_names)
