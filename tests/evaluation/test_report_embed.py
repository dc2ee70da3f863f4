"""Visual report PNGs (from synthetic predictions and tensorboardX events) and tile embedding."""

import numpy as np
import pytest

from geomeld_jax import modalities as mod
from geomeld_jax.evaluation import embed
from geomeld_jax.evaluation import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
  data = path.read_bytes()
  return data[:8] == PNG_MAGIC and len(data) > 1000


def test_training_curves_from_tensorboardx_events(tmp_path):
  import tensorboardX

  writer = tensorboardX.SummaryWriter(logdir=str(tmp_path / "tensorboard"))
  for step in range(1, 6):
    writer.add_scalar("loss", 10.0 / step, global_step=step)
    writer.add_scalar("eval/loss", 5.0 - step, global_step=step)
  writer.close()
  scalars = report.read_scalars(tmp_path / "tensorboard")
  assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5]
  assert scalars["loss"][1][1] == pytest.approx(5.0)
  assert scalars["eval/loss"][-1][1] == pytest.approx(0.0)
  assert _is_png(report.plot_curves(scalars, tmp_path / "curves.png"))


def test_reconstruction_jepa_and_retrieval_pngs(tmp_path):
  rng = np.random.default_rng(0)
  b, p, g = 2, 8, 4
  h = p * g
  batch, preds = {}, {}
  for m in mod.PIXEL_MODALITIES.values():
    if m.is_classes:
      batch[m.name] = rng.integers(-1, m.num_classes, (b, h, h)).astype(np.int32)
      preds[m.name] = rng.normal(size=(b, g, g, p * p * m.num_classes)).astype(np.float32)
    else:
      batch[m.name] = rng.normal(size=(b, h, h, m.num_bands)).astype(np.float32)
      batch[f"{m.name}_valid"] = np.ones((b, h, h, m.num_bands), bool)
      preds[m.name] = rng.normal(size=(b, g, g, p * p * m.num_bands)).astype(np.float32)
  mask = rng.random((b, g, g)) < 0.6
  paths = report.plot_reconstructions(batch, preds, mask, p, tmp_path, num_tiles=2)
  assert {x.name for x in paths} == {f"reconstruction_{n}.png" for n in mod.PIXEL_MODALITIES}
  assert all(_is_png(x) for x in paths)
  tm = np.zeros((b, g, g), bool)
  tm[:, 1:3, 1:3] = True
  assert _is_png(report.plot_jepa_similarity(rng.normal(size=(b, g, g, 16)),
                                             rng.normal(size=(b, g, g, 16)), tm,
                                             tmp_path / "jepa.png", 2))
  ex = [{"query": "a river crossing farmland", "true_image": 0, "top": [0, 1],
         "scores": [0.9, 0.5], "captions": ["river and fields", "a town"],
         "x": batch["sentinel2"][:2], "valid": batch["sentinel2_valid"][:2]}]
  assert _is_png(report.plot_retrieval(ex, tmp_path / "retrieval.png"))


def test_embed_geotiff_tiles_to_npy_and_parquet(tmp_path, tiny_encoder):
  import json

  import pyarrow.parquet as pq
  import tifffile

  tiles = tmp_path / "tiles"
  tiles.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    tifffile.imwrite(tiles / f"tile{i}_2021060{i + 1}.tif",
                     rng.integers(1, 5000, (32, 32, 12)).astype(np.uint16))
  stats = {m.name: {"bands": list(m.bands), "mean": [0.0] * m.num_bands,
                    "std": [1.0] * m.num_bands}
           for m in mod.PIXEL_MODALITIES.values()}
  stats["sentinel2"] = {"bands": list(mod.SENTINEL2.bands), "mean": [1000.0] * 12,
                        "std": [500.0] * 12}
  (tmp_path / "statistics.json").write_text(json.dumps(stats))
  emb, meta = embed.embed(tiny_encoder, embed.read_tiles(tiles, tmp_path / "statistics.json"),
                          batch_size=2)
  assert emb.shape == (3, tiny_encoder.dims[-1]) and np.all(np.isfinite(emb))
  npy, parquet = embed.write_outputs(tmp_path / "out" / "emb", emb, meta)
  np.testing.assert_array_equal(np.load(npy, allow_pickle=False), emb)
  table = pq.read_table(parquet).to_pydict()
  assert table["tile_id"] == ["tile0_20210601", "tile1_20210602", "tile2_20210603"]
  assert table["index"] == [0, 1, 2]
  assert table["date"] == ["2021-06-01", "2021-06-02", "2021-06-03"]
  assert all(np.isnan(table["lat"]))  # no geokeys in these tiles
  # Same result one tile at a time (the padding of the last batch is dropped).
  single, _ = embed.embed(tiny_encoder, embed.read_tiles(tiles, tmp_path / "statistics.json"),
                          batch_size=1)
  np.testing.assert_allclose(single, emb, rtol=1e-4, atol=1e-5)
  # Two processes' shares (--num_shards=2): tiles 0, 2 and tile 1, back in order by `index`.
  parts = []
  for k in range(2):
    part, part_meta = embed.embed(
        tiny_encoder, embed.read_tiles(tiles, tmp_path / "statistics.json", shard=(k, 2)),
        batch_size=2)
    npy, parquet = embed.write_outputs(tmp_path / "out" / "emb", part, part_meta, shard=(k, 2))
    assert npy.name == f"emb-0000{k}-of-00002.npy"
    parts.append((pq.read_table(parquet).to_pydict()["index"], np.load(npy)))
  assert [index for index, _ in parts] == [[0, 2], [1]]
  merged = np.zeros_like(emb)
  for index, part in parts:
    merged[index] = part
  np.testing.assert_allclose(merged, emb, rtol=1e-4, atol=1e-5)
  dotted = embed.write_outputs(tmp_path / "out" / "geomeld_1.0.0_test", emb, meta, shard=(1, 2))
  assert [p.name for p in dotted] == ["geomeld_1.0.0_test-00001-of-00002.npy",
                                      "geomeld_1.0.0_test-00001-of-00002.parquet"]
  with pytest.raises(ValueError, match="shard index"):
    next(embed.read_tiles(tiles, tmp_path / "statistics.json", shard=(2, 2)))


def test_geotiff_tile_centre_uses_the_projected_crs(tmp_path):
  """A UTM file also names its WGS84 datum (GeographicTypeGeoKey=4326): metres stay metres."""
  import tifffile

  from data_prep.sources import raster

  geokeys = (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 2048, 0, 1, 4326, 3072, 0, 1, 32633)
  path = tmp_path / "utm_20210601.tif"
  tifffile.imwrite(path, np.zeros((32, 32, 12), np.uint16), extratags=[
      (33550, "d", 3, (10.0, 10.0, 0.0), False),
      (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 5000000.0, 0.0), False),
      (34735, "H", len(geokeys), geokeys, False)])
  with tifffile.TiffFile(path) as tif:
    lat, lon, date = embed._tile_meta(path, tif, 32, 32)  # pylint: disable=protected-access
  expected = raster.utm_to_latlon(500000.0 + 160.0, 5000000.0 - 160.0, 33)
  np.testing.assert_allclose((lat, lon), expected, atol=1e-9)
  assert 45.0 < lat < 45.2 and 15.0 < lon < 15.01 and date == "2021-06-01"
