"""Synthetic GeoMeld release shards whose modalities agree physically.

`write_release_shards` writes `.tar` shards of one `.h5` member per sample in exactly the
release layout that `data_prep.sources.geomeld.GeoMeldReleaseSource` reads, so the whole
build can run (and be tested) without the real release. Every sample is generated from one
coherent scene model, so pretext targets are learnable from Sentinel-2:

* A fractal DEM (spectral synthesis, power ~ 1/f^3) with a relief drawn per terrain type;
  slope is computed from it (`raster.slope_degrees`, 10 m spacing); ``terrain_class`` is
  derived from the realised relief (p95 - p5): flat < 10 m, plain < 50 m, hilly < 300 m,
  else mountainous.
* Land cover (WorldCover codes): water fills the DEM lows (a lake surface, flattened),
  herbaceous wetland rims the water, snow caps ground above 3000 m, and the remaining land
  is the argmax of smooth random fields for tree / shrub / grass / crop / built / bare, with
  tile-specific class weights and a slope bias (trees on steep ground, crops and built-up on
  flat ground).
* Dynamic World is derived from WorldCover with `WORLDCOVER_TO_DYNAMIC_WORLD`; about 3 % of
  the pixels (smooth blobs) disagree, as two real products do.
* Sentinel-2 DN: per-class mean reflectance per band (`S2_CLASS_MEANS`: water dark in NIR and
  SWIR, vegetation with a red edge and a NIR plateau, built-up bright and flat) times smooth
  texture, a per-tile brightness and a little pixel noise, softened at class boundaries.
* Sentinel-1 dB: per-class VV (water low, forest and built-up high), VH a few dB lower, with
  speckle; HH/HV are NaN in most tiles (as in the real data); 15 % of tiles lack the
  descending orbit (NaN).
* Canopy height: trees 5-35 m (smooth), shrubs 0.5-2 m, 0 elsewhere; std grows with height.
* Metadata: tiles in clusters of 4x4 adjacent 1280 m tiles around land anchors (so spatial
  blocks have neighbours), dates 2017-2022, ``water_analysis`` equal to the map's water
  share, occasional ``osm_tags``, ``"synthetic": true``. One template caption per sample
  describes its true land cover (the caption does not say it is synthetic).

Everything is a pure function of (seed, sample index): shards are byte-identical for a
seed. `write_bad_shards` writes a deliberately broken shard set for dead-letter tests.

CLI: ``python -m data_prep.synthetic --output_dir=DIR --num_samples=N [--seed --samples_per_shard
--naip_fraction]`` (console script ``geomeld-synth``).
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import tarfile
from typing import Any

import h5py
import numpy as np
from scipy import ndimage

from data_prep.sources import raster
from geomeld_jax import modalities as mod

T = mod.TILE_SIZE

# WorldCover code -> Dynamic World label (1 water, 2 trees, 3 grass, 4 flooded vegetation,
# 5 crops, 6 shrub and scrub, 7 built, 8 bare, 9 snow and ice).
WORLDCOVER_TO_DYNAMIC_WORLD = {10: 2, 20: 6, 30: 3, 40: 5, 50: 7, 60: 8, 70: 9, 80: 1, 90: 4,
                               95: 2, 100: 3}

# Mean DN per WorldCover class, registry band order B1 B2 B3 B4 B5 B6 B7 B8 B8A B9 B11 B12.
S2_CLASS_MEANS = {
    10: (300, 250, 450, 250, 700, 2200, 2800, 3000, 3100, 900, 1500, 700),  # tree cover
    20: (400, 450, 650, 700, 1100, 1900, 2200, 2400, 2500, 800, 2300, 1500),  # shrubland
    30: (350, 400, 700, 600, 1100, 2400, 2900, 3100, 3200, 900, 2200, 1200),  # grassland
    40: (380, 450, 800, 700, 1200, 2600, 3100, 3400, 3500, 950, 2300, 1300),  # cropland
    50: (1100, 1200, 1300, 1400, 1500, 1600, 1700, 1800, 1850, 600, 2200, 2000),  # built-up
    60: (900, 1100, 1500, 1900, 2200, 2400, 2500, 2600, 2700, 800, 3300, 2700),  # bare
    70: (7000, 7500, 7400, 7300, 7200, 7000, 6900, 6800, 6700, 2000, 600, 500),  # snow
    80: (400, 500, 450, 300, 250, 200, 180, 150, 130, 60, 80, 50),  # water
    90: (350, 400, 600, 500, 800, 1500, 1800, 1900, 2000, 700, 1200, 600),  # wetland
}
# (VV dB, VH - VV dB) per WorldCover class.
S1_CLASS_DB = {10: (-7.5, -5.5), 20: (-10.0, -6.5), 30: (-12.0, -7.0), 40: (-11.0, -6.5),
               50: (-4.0, -7.0), 60: (-15.0, -8.5), 70: (-14.0, -7.0), 80: (-22.0, -6.0),
               90: (-13.0, -6.0)}
_LAND_CLASSES = (10, 20, 30, 40, 50, 60)
_CLASS_WORDS = dict(zip(mod.ESA_WORLDCOVER.class_codes,
                        (n.replace("_", " ") for n in mod.ESA_WORLDCOVER.class_names)))
_OSM_TAGS = {10: {"landuse": "forest"}, 20: {"natural": "scrub"}, 30: {"landuse": "meadow"},
             40: {"landuse": "farmland"}, 50: {"landuse": "residential"}, 60: {"natural": "bare_rock"},
             70: {"natural": "glacier"}, 80: {"natural": "water"}, 90: {"natural": "wetland"}}
# Anchors on land in different biomes; clusters of tiles sit around them.
LAND_ANCHORS = ((48.10, 11.50), (39.50, -105.20), (-3.50, -62.00), (61.00, 25.00),
                (31.00, -100.00), (-31.00, 147.00), (13.50, 2.10), (44.00, 125.00),
                (-19.00, 47.50), (56.00, -120.00), (46.50, 8.00), (22.50, 79.00))
_TERRAIN_RELIEF = {"flat": (2.0, 6.0), "plain": (15.0, 40.0), "hilly": (80.0, 250.0),
                   "mountainous": (500.0, 1800.0)}
CLUSTER_SIDE = 4  # tiles per cluster row/column
_DLAT = (T * mod.GSD_M) / 111320.0  # degrees of latitude per tile
_START = datetime.date(2017, 1, 1).toordinal()
_END = datetime.date(2022, 12, 31).toordinal()


def _smooth(rng: np.random.Generator, count: int, sigma: float) -> np.ndarray:
  """`count` smooth unit-variance periodic random fields (count, T, T) via a Gaussian filter
  in the Fourier domain (one batched FFT: much faster than spatial filtering)."""
  f = np.fft.fftfreq(T)
  k2 = f[:, None] ** 2 + f[None, : T // 2 + 1] ** 2
  kernel = np.exp(-2.0 * (math.pi * sigma) ** 2 * k2)
  noise = rng.standard_normal((count, T, T), dtype=np.float32)
  x = np.fft.irfft2(np.fft.rfft2(noise) * kernel.astype(np.float32), s=(T, T)).astype(np.float64)
  x -= x.mean(axis=(1, 2), keepdims=True)
  return x / (x.std(axis=(1, 2), keepdims=True) + 1e-12)


def _fractal(rng: np.random.Generator, beta: float = 3.0) -> np.ndarray:
  """A fractal surface in [0, 1] with power spectrum ~ 1/f^beta."""
  f = np.fft.fftfreq(T)
  k = np.sqrt(f[:, None] ** 2 + f[None, : T // 2 + 1] ** 2)
  k[0, 0] = 1.0
  amp = k ** (-beta / 2.0)
  amp[0, 0] = 0.0
  z = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((T, T))) * amp, s=(T, T))
  return (z - z.min()) / (z.max() - z.min())


def _terrain_from_relief(dem: np.ndarray) -> str:
  relief = float(np.percentile(dem, 95) - np.percentile(dem, 5))
  if relief < 10:
    return "flat"
  if relief < 50:
    return "plain"
  return "hilly" if relief < 300 else "mountainous"


def generate_sample(seed: int, index: int, naip: bool = False) -> dict[str, Any]:
  """One synthetic sample: {'tile_id', 'datasets' (release key -> array), 'metadata',
  'caption'}. A pure function of (seed, index, naip)."""
  rng = np.random.default_rng([seed, index])
  # --- relief ---------------------------------------------------------------------------
  terrain_kind = str(rng.choice(list(_TERRAIN_RELIEF), p=[0.2, 0.3, 0.3, 0.2]))
  relief = rng.uniform(*_TERRAIN_RELIEF[terrain_kind])
  base = {"flat": (0, 300), "plain": (0, 500), "hilly": (100, 1200), "mountainous": (600, 2600)}
  dem = rng.uniform(*base[terrain_kind]) + relief * _fractal(rng)
  # --- land cover -----------------------------------------------------------------------
  water_q = 0.0 if rng.random() < 0.5 else rng.uniform(0.02, 0.3)
  wc = np.zeros((T, T), np.uint8)
  water = np.zeros((T, T), bool)
  if water_q > 0:
    level = np.quantile(dem, water_q)
    water = dem <= level
    dem = np.where(water, level, dem)  # a lake surface is flat
  slope = raster.slope_degrees(dem)
  fields = _smooth(rng, len(_LAND_CLASSES) + 3, sigma=rng.uniform(5.0, 12.0))
  weights = np.log(rng.dirichlet(np.full(len(_LAND_CLASSES), 0.7)) + 1e-3)
  slope_bias = np.array([0.04, 0.02, 0.0, -0.06, -0.06, 0.02])[:, None, None] * slope
  score = fields[: len(_LAND_CLASSES)] + weights[:, None, None] + slope_bias
  wc[:] = np.asarray(_LAND_CLASSES, np.uint8)[np.argmax(score, axis=0)]
  if water.any() and rng.random() < 0.6:
    rim = (~water) & (dem <= np.quantile(dem, min(water_q + 0.04, 1.0)))
    wc[rim] = 90
  wc[dem > 3000.0] = 70
  wc[water] = 80
  # --- Dynamic World: mapped, with ~3 % disagreement in smooth blobs --------------------
  lut = np.zeros(256, np.uint8)
  for code, label in WORLDCOVER_TO_DYNAMIC_WORLD.items():
    lut[code] = label
  dw = lut[wc]
  blobs = fields[-1] > np.quantile(fields[-1], 0.97)
  dw = np.where(blobs, rng.integers(1, 10), dw).astype(np.uint8)
  # --- Sentinel-2 -----------------------------------------------------------------------
  means = np.zeros((256, 12), np.float64)
  for code, m in S2_CLASS_MEANS.items():
    means[code] = m
  s2 = means.astype(np.float32).T[:, wc]  # (12, T, T)
  s2 = 0.75 * s2 + 0.25 * ndimage.uniform_filter(s2, size=(1, 3, 3), mode="nearest")  # mixed pixels
  texture = 1.0 + 0.08 * fields[-2].astype(np.float32)
  noise = 1.0 + 0.02 * rng.standard_normal((12, T, T), dtype=np.float32)
  s2 *= texture * noise * np.float32(rng.uniform(0.9, 1.1))
  s2 = np.clip(np.round(s2), 1, 20000).astype(np.float32)
  # --- Sentinel-1 -----------------------------------------------------------------------
  vv_mean = np.zeros(256)
  vh_off = np.zeros(256)
  for code, (vv, off) in S1_CLASS_DB.items():
    vv_mean[code], vh_off[code] = vv, off
  vv = vv_mean[wc] + 0.8 * fields[-3]
  vh = vv + vh_off[wc]
  s1 = np.full((8, T, T), np.nan, np.float32)
  speckle = 1.5 * rng.standard_normal((8, T, T), dtype=np.float32)
  s1[0], s1[1] = vv + speckle[0], vh + speckle[1]
  has_desc = rng.random() >= 0.15
  if has_desc:
    s1[4], s1[5] = vv - 0.5 + speckle[4], vh - 0.5 + speckle[5]
  if rng.random() < 0.1:  # dual-pol HH/HV exists for a few tiles only
    s1[2], s1[3] = vv + 1.0 + speckle[2], vh + 0.5 + speckle[3]
    if has_desc:
      s1[6], s1[7] = vv + 0.5 + speckle[6], vh + speckle[7]
  # --- canopy height --------------------------------------------------------------------
  tree_h = np.clip(20.0 + 7.0 * _smooth(rng, 1, 4.0)[0], 5.0, 35.0)
  height = np.where(wc == 10, tree_h, np.where(wc == 20, rng.uniform(0.5, 2.0), 0.0))
  canopy = np.stack([height, np.where(height > 0, 1.0 + 0.15 * height, 0.5)]).astype(np.float32)
  aster = np.stack([dem, slope]).astype(np.float32)
  # --- metadata -------------------------------------------------------------------------
  lat, lon = _tile_location(seed, index)
  water_pct = round(100.0 * float(water.mean()), 2)
  terrain = _terrain_from_relief(dem)
  tile_id = f"synth-{seed}-{index:06d}"
  date = datetime.date.fromordinal(int(rng.integers(_START, _END + 1))).isoformat()
  codes, counts = np.unique(wc, return_counts=True)
  order = np.argsort(-counts, kind="stable")
  shares = [(int(codes[i]), float(counts[i]) / wc.size) for i in order]
  metadata: dict[str, Any] = {
      "tile_id": tile_id, "lat": lat, "long": lon, "acquisition_date": date,
      "terrain_class": terrain, "file_type_naip": bool(naip),
      "osm_tags": dict(_OSM_TAGS[shares[0][0]]) if rng.random() < 0.3 else {},
      "water_analysis": {"detected": bool(water.any()), "percentage": water_pct},
      "synthetic": True, "synthetic_seed": seed,
      "landcover_fractions": {_CLASS_WORDS[c]: round(p, 4) for c, p in shares},
  }
  datasets: dict[str, np.ndarray] = {
      "sentinel2": s2, "sentinel1": s1, "aster": aster, "canopy_height": canopy,
      "esa_worldcover": wc[None], "dynamic_world": dw[None],
  }
  if naip:
    keep = [i for i, b in enumerate(mod.SENTINEL2.bands) if b not in mod.NAIP_SUBSET_MISSING_S2_BANDS]
    rgb = s2[[mod.SENTINEL2.band_index(b) for b in ("B4", "B3", "B2")]]
    datasets["naip"] = np.clip(rgb / 10.0, 0, 255).astype(np.uint16).repeat(10, 1).repeat(10, 2)
    datasets["sentinel2"] = s2[keep]
  return {"tile_id": tile_id, "datasets": datasets, "metadata": metadata,
          "caption": _caption(shares, terrain, water_pct)}


def _tile_location(seed: int, index: int) -> tuple[float, float]:
  """Tiles come in clusters of CLUSTER_SIDE^2 adjacent tiles around a jittered land anchor."""
  per_cluster = CLUSTER_SIDE * CLUSTER_SIDE
  cluster, slot = divmod(index, per_cluster)
  crng = np.random.default_rng([seed, 1_000_003, cluster])
  lat0, lon0 = LAND_ANCHORS[cluster % len(LAND_ANCHORS)]
  lat0 += crng.uniform(-0.3, 0.3)
  lon0 += crng.uniform(-0.3, 0.3)
  row, col = divmod(slot, CLUSTER_SIDE)
  lat = lat0 - row * _DLAT
  lon = lon0 + col * _DLAT / math.cos(math.radians(lat0))
  return round(lat, 6), round(lon, 6)


def _caption(shares: list[tuple[int, float]], terrain: str, water_pct: float) -> str:
  main = shares[0]
  text = f"A {terrain} landscape mostly covered by {_CLASS_WORDS[main[0]]} ({main[1]:.0%})"
  rest = [s for s in shares[1:] if s[1] >= 0.05][:2]
  if rest:
    text += ", with " + " and ".join(f"{_CLASS_WORDS[c]} ({p:.0%})" for c, p in rest)
  text += "."
  if water_pct > 0 and main[0] != 80:
    text += f" Water covers about {water_pct:.0f}% of the area."
  return text


def sample_h5_bytes(datasets: dict[str, np.ndarray], metadata: Any,
                    caption: str | None = None) -> bytes:
  """One release `.h5` member as bytes (metadata: a dict, or a raw string for bad cases)."""
  buf = io.BytesIO()
  with h5py.File(buf, "w") as f:
    for key in sorted(datasets):
      f.create_dataset(key, data=datasets[key])
    meta = metadata if isinstance(metadata, str) else json.dumps(metadata, sort_keys=True)
    f.create_dataset("metadata", data=meta)
    if caption:
      f.create_dataset("caption", data=caption)
  return buf.getvalue()


def _write_tar(fileobj, members) -> None:
  """A deterministic tar (fixed mtime, owner and mode) of (name, bytes) members."""
  with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size, info.mtime, info.mode = len(data), 0, 0o644
      info.uid = info.gid = 0
      info.uname = info.gname = ""
      tar.addfile(info, io.BytesIO(data))


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
  buf = io.BytesIO()
  _write_tar(buf, members)
  return buf.getvalue()


def _write_atomic(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _write_shard(path: str, seed: int, indices: list[int], naip: bool) -> str:
  """Streams one shard to disk (members are generated one at a time: low memory)."""
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    _write_tar(f, (_member(generate_sample(seed, i, naip=naip)) for i in indices))
  os.replace(tmp, path)
  return path


def _member(sample: dict[str, Any]) -> tuple[str, bytes]:
  return (f"{sample['tile_id']}.h5",
          sample_h5_bytes(sample["datasets"], sample["metadata"], sample["caption"]))


def write_release_shards(output_dir: str, num_samples: int, samples_per_shard: int = 64,
                         seed: int = 0, naip_fraction: float = 0.0) -> list[str]:
  """Writes release-format shards; returns their paths (sorted).

  Regular samples go to ``synthetic-NNNNN.tar``; NAIP-subset samples (9-band Sentinel-2 plus
  ``naip``; a `naip_fraction` share, drawn per sample) to ``synthetic-NNNNN_n.tar``.
  """
  if num_samples < 1 or samples_per_shard < 1:
    raise ValueError(f"num_samples and samples_per_shard must be >= 1, got {num_samples}, "
                     f"{samples_per_shard}")
  if not 0.0 <= naip_fraction <= 1.0:
    raise ValueError(f"naip_fraction must be in [0, 1], got {naip_fraction}")
  os.makedirs(output_dir, exist_ok=True)
  is_naip = np.random.default_rng([seed, 7]).random(num_samples) < naip_fraction
  jobs = []
  for suffix, flag in (("", False), ("_n", True)):
    indices = [i for i in range(num_samples) if bool(is_naip[i]) == flag]
    for k in range(0, len(indices), samples_per_shard):
      path = os.path.join(output_dir, f"synthetic-{k // samples_per_shard:05d}{suffix}.tar")
      jobs.append((path, seed, indices[k:k + samples_per_shard], flag))
  return sorted(_write_shard(*job) for job in jobs)


# Records a build of `write_bad_shards` output must produce (the good members; of the
# duplicated tile id only one survives).
BAD_SHARDS_GOOD_RECORDS = 5


def write_bad_shards(output_dir: str) -> dict[str, int]:
  """Writes a shard set with one member per bad case plus good members, for dead-letter tests.

  ``bad-00000.tar``: 3 good members, a corrupt .h5, a wrong-shape Sentinel-2, a float class
  map with fractional codes, an all-NaN Sentinel-2, lat 95, unparsable metadata JSON, a
  member without sentinel2, and a second member reusing the first good member's tile id.
  ``bad-00001.tar``: 2 good members, then a third cut in the middle (truncated shard).

  Returns the expected dead-letter count per rejection reason ('duplicate_tile_id' is found
  by the pipeline, the others by the source or the validator). `BAD_SHARDS_GOOD_RECORDS`
  records survive.
  """
  os.makedirs(output_dir, exist_ok=True)
  seed = 424242
  good = [generate_sample(seed, i) for i in range(6)]

  def variant(i: int, name: str, **changes) -> tuple[str, bytes]:
    s = generate_sample(seed, 100 + i)
    datasets, meta = dict(s["datasets"]), dict(s["metadata"])
    meta["tile_id"] = f"bad-{name}"
    for key, value in changes.items():
      if key == "metadata":
        meta.update(value)
      elif value is None:
        datasets.pop(key)
      else:
        datasets[key] = value
    return f"bad-{name}.h5", sample_h5_bytes(datasets, meta, s["caption"])

  wrong_dtype = good[0]["datasets"]["esa_worldcover"].astype(np.float32) + 0.5
  dup = good[0]
  members = [
      _member(good[0]), _member(good[1]),
      ("bad-corrupt.h5", b"this is not an HDF5 file\n" * 40),
      variant(1, "wrong-shape", sentinel2=np.ones((12, 64, 64), np.float32) * 1000),
      variant(2, "wrong-dtype", esa_worldcover=wrong_dtype),
      variant(3, "all-nan-s2", sentinel2=np.full((12, T, T), np.nan, np.float32)),
      variant(4, "lat-95", metadata={"lat": 95.0}),
      ("bad-metadata.h5", sample_h5_bytes(good[2]["datasets"], '{"tile_id": "bad-meta", "lat": ')),
      variant(5, "no-s2", sentinel2=None),
      (f"dup-{dup['tile_id']}.h5", sample_h5_bytes(dup["datasets"], dup["metadata"], dup["caption"])),
      _member(good[2]),
  ]
  _write_atomic(os.path.join(output_dir, "bad-00000.tar"), _tar_bytes(members))

  tail = _tar_bytes([_member(good[3]), _member(good[4]), _member(good[5])])
  with tarfile.open(fileobj=io.BytesIO(tail)) as tar:
    last = tar.getmembers()[-1]
  _write_atomic(os.path.join(output_dir, "bad-00001.tar"),
                tail[: last.offset_data + last.size // 2])
  return {"truncated_tar": 1, "corrupt_h5": 1, "wrong_shape": 1, "wrong_dtype": 1,
          "sentinel2_all_nodata": 1, "lat_out_of_range": 1, "bad_metadata": 1,
          "missing_sentinel2": 1, "duplicate_tile_id": 1}


def run() -> None:
  """Console entry point (`geomeld-synth`)."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  # Defined here, not at import, so importing this module never clashes with other flags.
  flags.DEFINE_string("output_dir", None, "folder for the synthetic release shards", required=True)
  flags.DEFINE_integer("num_samples", 256, "number of samples")
  flags.DEFINE_integer("seed", 0, "random seed (shards are byte-identical for a seed)")
  flags.DEFINE_integer("samples_per_shard", 64, "samples per .tar shard")
  flags.DEFINE_float("naip_fraction", 0.0, "share of samples in the NAIP subset (*_n.tar)")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    paths = write_release_shards(f.output_dir, f.num_samples, f.samples_per_shard, f.seed,
                                 f.naip_fraction)
    print(f"wrote {f.num_samples} samples in {len(paths)} shards to {f.output_dir}")

  app.run(main)


if __name__ == "__main__":
  run()
