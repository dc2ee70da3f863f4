r"""Embeds a dataset split or a folder of GeoTIFF tiles with an exported encoder.

  python -m geomeld_jax.evaluation.embed --export_dir=runs/x/export/300 \
      --data_dir=/data/geomeld --split=test --output=/tmp/emb/test
  python -m geomeld_jax.evaluation.embed --export_dir=runs/x/export/300 \
      --tiles_dir=/data/tiles --statistics=/data/geomeld/geomeld/1.0.0/statistics.json \
      --output=/tmp/emb/tiles

writes ``<output>.npy`` (float32 (N, D): mean-pooled encoder features, or the joint ITC
embedding with ``--joint``) and ``<output>.parquet`` (row i = tile i: index, tile_id, lat,
lon, date). Batches are sharded over this process's devices along the mesh's data axis, as
in training (the last batch is padded and the padding dropped).

Several hosts (or machines): run the same command on each with ``--num_shards=N
--shard_index=k``. Process k reads and embeds only items k, k + N, ... and writes
``<output>-0000k-of-0000N.npy/.parquet``; the ``index`` column is the item's position in the
whole split (or sorted tile folder), so the parts concatenate back in order. The processes
share nothing: no collective, no jax.distributed.

GeoTIFF tiles: 12 bands in ``modalities.SENTINEL2.bands`` order, DN (reflectance x 1e4),
(H, W, 12) or (12, H, W); DN 0 is no data. lat/lon come from the GeoTIFF tags when the
tile is in EPSG:4326 (else NaN), the date from a ``YYYYMMDD`` or ``YYYY-MM-DD`` in the
file name (else '').
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from geomeld_jax import modalities as mod
from geomeld_jax import records
from geomeld_jax import sharding
from geomeld_jax.evaluation import probe

_DATE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")


def _tile_meta(path: pathlib.Path, tif, height: int, width: int) -> tuple[float, float, str]:
  """(lat, lon) of the tile's centre (NaN without a georeference in WGS84 UTM or EPSG:4326) and
  the date in its file name ('' without one)."""
  from data_prep.sources import raster  # pylint: disable=g-import-not-at-top

  lat = lon = float("nan")
  georef = raster.georef_of(tif)
  if georef is not None:
    centre = raster.epsg_to_latlon(georef.epsg, georef.ulx + georef.res_x * width / 2,
                                   georef.uly - georef.res_y * height / 2)
    if centre is not None:
      lat, lon = centre
  m = _DATE.search(path.stem)
  date = f"{m[1]}-{m[2]}-{m[3]}" if m else ""
  return lat, lon, date


class Item(NamedTuple):
  """One tile to embed: normalised input, its validity, and what the index file records."""

  x: np.ndarray
  valid: np.ndarray
  tile_id: str
  lat: float
  lon: float
  date: str
  index: int  # position in the whole split or sorted folder, before sharding


def read_tiles(tiles_dir: str | pathlib.Path, statistics: str | pathlib.Path,
               shard: tuple[int, int] = (0, 1)) -> Iterator[Item]:
  """An Item per GeoTIFF in a folder (sorted); of shard (k, n), only files k, k + n, ..."""
  import tifffile  # pylint: disable=g-import-not-at-top

  normalizer = records.Normalizer.from_file(statistics)
  paths = sorted(p for p in pathlib.Path(tiles_dir).iterdir()
                 if p.suffix.lower() in (".tif", ".tiff"))
  if not paths:
    raise FileNotFoundError(f"no .tif/.tiff files in {tiles_dir}")
  c = mod.SENTINEL2.num_bands
  index, count = _check_shard(shard)
  for i in range(index, len(paths), count):
    p = paths[i]
    with tifffile.TiffFile(p) as tif:
      a = tif.asarray()
      if a.ndim == 3 and a.shape[0] == c and a.shape[-1] != c:
        a = np.moveaxis(a, 0, -1)
      if a.ndim != 3 or a.shape[-1] != c:
        raise ValueError(f"{p}: expected a {c}-band tile (H, W, {c}) or ({c}, H, W), got {a.shape}")
      lat, lon, date = _tile_meta(p, tif, a.shape[0], a.shape[1])
    stored, _ = mod.to_storage(mod.SENTINEL2, a.astype(np.float64))
    x, v = normalizer.normalize(mod.INPUT_MODALITY, stored)
    yield Item(x, v, p.stem, lat, lon, date, i)


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f"shard index must be in [0, {count}), got {index}")
  return index, count


def read_split(data_dir: str, split: str, crop_size: int | None,
               shard: tuple[int, int] = (0, 1)) -> Iterator[Item]:
  """An Item per record of a built dataset's split; of shard (k, n), records k, k + n, ..."""
  from geomeld_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from geomeld_jax.evaluation import retrieval  # pylint: disable=g-import-not-at-top

  files = input_pipeline.locate_dataset(data_dir)
  normalizer = records.Normalizer.from_file(files.statistics)
  source = retrieval.split_source(files, split)
  index, count = _check_shard(shard)
  for i in range(index, len(source), count):
    rec = source[i]
    x, v = normalizer.normalize(mod.INPUT_MODALITY, np.asarray(rec[mod.INPUT_MODALITY]))
    if crop_size:
      x, v = retrieval._center_crop(x, crop_size), retrieval._center_crop(v, crop_size)  # pylint: disable=protected-access
    yield Item(x, v, records._text(rec["tile_id"]), float(rec["lat"]), float(rec["lon"]),  # pylint: disable=protected-access
               records._text(rec["date"]), i)  # pylint: disable=protected-access


def embed(model, items: Iterable[Item], *, batch_size: int, joint: bool = False, mesh=None
          ) -> tuple[np.ndarray, dict[str, list]]:
  """Embeds items in batches sharded over the mesh (default: this process's devices)."""
  mesh = mesh or sharding.make_mesh((("data", -1), ("fsdp", 1)), devices=jax.local_devices())
  shards = sharding.num_batch_shards(mesh)
  if batch_size % shards:
    batch_size += shards - batch_size % shards  # the batch axis must split over the devices
  encoder = model.encoder if joint else model
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, x, valid):
    m = nnx.merge(graphdef, state)
    enc = m.encoder if joint else m
    feats, _ = enc(jnp.where(valid, x, 0.0), deterministic=True)
    pooled = jnp.mean(feats.astype(jnp.float32), axis=(1, 2))
    return m.embed_image(pooled) if joint else pooled

  meta: dict[str, list] = {"index": [], "tile_id": [], "lat": [], "lon": [], "date": []}
  out, xs, vs = [], [], []

  def flush():
    n = len(xs)
    x = probe.fit_to_stride(np.stack(xs), encoder.stride)
    v = probe.fit_to_stride(np.stack(vs), encoder.stride)
    pad = batch_size - n
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      v = np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
    batch = sharding.put_batch({"x": x, "v": v}, mesh)
    out.append(np.asarray(jax.device_get(fn(state, batch["x"], batch["v"])))[:n])
    xs.clear()
    vs.clear()

  for item in items:
    xs.append(item.x)
    vs.append(item.valid)
    for k in meta:
      meta[k].append(getattr(item, k))
    if len(xs) == batch_size:
      flush()
  if xs:
    flush()
  if not out:
    raise ValueError("nothing to embed")
  return np.concatenate(out), meta


def write_outputs(output: str | pathlib.Path, emb: np.ndarray, meta: dict[str, list],
                  shard: tuple[int, int] = (0, 1)) -> tuple[pathlib.Path, pathlib.Path]:
  """`<output>.npy` and `.parquet`; of shard (k, n) with n > 1, `<output>-0000k-of-0000n.*`."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  output = pathlib.Path(output)
  name = output.name.removesuffix(".npy").removesuffix(".parquet")
  if shard[1] > 1:
    name = f"{name}-{shard[0]:05d}-of-{shard[1]:05d}"
  output.parent.mkdir(parents=True, exist_ok=True)
  # Appended, not `with_suffix`: that would cut 'geomeld_1.0.0_test' to 'geomeld_1.0'.
  npy, parquet = output.parent / f"{name}.npy", output.parent / f"{name}.parquet"
  np.save(npy, emb.astype(np.float32), allow_pickle=False)
  table = pa.table({"row": np.arange(len(emb), dtype=np.int64),
                    "index": np.asarray(meta["index"], np.int64), "tile_id": meta["tile_id"],
                    "lat": np.asarray(meta["lat"], np.float64),
                    "lon": np.asarray(meta["lon"], np.float64), "date": meta["date"]})
  pq.write_table(table, parquet)
  return npy, parquet


def _define_flags() -> None:
  """Defines the CLI flags; only when run as a program (these modules share a process in
  tests, and absl allows each flag name once)."""
  global _EXPORT, _DATA, _SPLIT, _TILES, _STATS, _CROP, _BATCH, _JOINT, _OUTPUT, _SHARD, _SHARDS
  _EXPORT = flags.DEFINE_string("export_dir", None, "GeoMeld-FM export directory.")
  _DATA = flags.DEFINE_string("data_dir", None, "Built dataset (with --split).")
  _SPLIT = flags.DEFINE_string("split", "test", "Dataset split.")
  _TILES = flags.DEFINE_string("tiles_dir", None, "Folder of 12-band Sentinel-2 GeoTIFF tiles.")
  _STATS = flags.DEFINE_string("statistics", None, "statistics.json for GeoTIFF normalisation.")
  _CROP = flags.DEFINE_integer("crop_size", None, "Centre crop of dataset tiles (default: none).")
  _BATCH = flags.DEFINE_integer("batch_size", 64, "Global batch size.")
  _JOINT = flags.DEFINE_bool("joint", False, "Joint image-text embedding (needs an ITC export).")
  _OUTPUT = flags.DEFINE_string("output", None, "Output path prefix (.npy and .parquet).")
  _SHARDS = flags.DEFINE_integer("num_shards", 1, "Processes sharing the job (one per host).")
  _SHARD = flags.DEFINE_integer("shard_index", 0, "This process's share: items k, k + n, ...")


def main(argv):
  del argv
  from geomeld_jax import export  # pylint: disable=g-import-not-at-top

  model = export.load_itc_model(_EXPORT.value)[0] if _JOINT.value else export.load_encoder(
      _EXPORT.value)[0]
  if bool(_DATA.value) == bool(_TILES.value):
    raise app.UsageError("give exactly one of --data_dir (with --split) or --tiles_dir")
  shard = (_SHARD.value, _SHARDS.value)
  if _TILES.value:
    if not _STATS.value:
      raise app.UsageError("--tiles_dir needs --statistics (a build's statistics.json)")
    items = read_tiles(_TILES.value, _STATS.value, shard)
  else:
    items = read_split(_DATA.value, _SPLIT.value, _CROP.value, shard)
  emb, meta = embed(model, items, batch_size=_BATCH.value, joint=_JOINT.value)
  npy, parquet = write_outputs(_OUTPUT.value, emb, meta, shard)
  print(json.dumps({"embeddings": str(npy), "index": str(parquet), "shape": list(emb.shape)}))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["export_dir", "output"])
  app.run(main)
