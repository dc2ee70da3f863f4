r"""Converts the real BigEarthNet v1 patches in ../shared/data/bigearthnet into GEO-Bench layout.

  python -m geomeld_jax.evaluation.bigearthnet_to_geobench \
      --src=/work/shared/data/bigearthnet --out=/tmp/geobench_ben

writes ``<out>/classification_v1.0/m-bigearthnet/`` exactly as GEO-Bench v1.0 lays out
m-bigearthnet (geobench.md §1.2-1.5, §4): one ``id_NNNN.hdf5`` per patch with the 12 S2
bands (B10 absent) named as geobench's ``sentinel2_13_bands``, each 120x120 float32 DN
(20/60 m bands resampled bilinearly to 120x120 as geobench's converter does, rounded to
integers first: it read them as int32), the root ``pickle`` attribute (label int64 (43,)
multi-hot, Sentinel2 band infos, Affine + CRS where the patch has coordinates), the eight
partition files, ``band_stats.json`` (train split), ``label_stats.json`` and
``task_specs.pkl``. ``<out>/m-bigearthnet_source_names.json`` (outside the task folder)
maps sample names back to BigEarthNet patch names.

Sources: ``v1_configilm_mock/patches/*.npz`` (30 patches; ConfigILM's train/val/test csv
give the split) and ``v1_examples_tif/BigEarthNet-S2-Example/*`` (6 patches, GeoTIFF, added
to train; their JSON gives UTM coordinates and the projection).
"""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Any

import numpy as np
from absl import app
from absl import flags

from geomeld_jax.evaluation import geobench as gb

# torchgeo BigEarthNet.class_sets[43] (CORINE level-3 order), what GEO-Bench's converter used.
CLASSES_43 = (
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports",
    "Mineral extraction sites", "Dump sites", "Construction sites", "Green urban areas",
    "Sport and leisure facilities", "Non-irrigated arable land", "Permanently irrigated land",
    "Rice fields", "Vineyards", "Fruit trees and berry plantations", "Olive groves", "Pastures",
    "Annual crops associated with permanent crops", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland", "Moors and heathland", "Sclerophyllous vegetation",
    "Transitional woodland/shrub", "Beaches, dunes, sands", "Bare rock",
    "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes",
    "Salines", "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons",
    "Estuaries", "Sea and ocean",
)
# BigEarthNet file band code -> GEO-Bench band name, in GEO-Bench write order.
BAND_CODES = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
GB_NAMES = gb.TASKS["m-bigearthnet"].band_names
PATCH = 120
TASK = "m-bigearthnet"


def resize_bilinear(band: np.ndarray, size: int = PATCH) -> np.ndarray:
  """Pixel-centre-aligned bilinear resampling (GDAL's for upsampling), edges clamped."""
  band = np.asarray(band, np.float64)
  h, w = band.shape
  if (h, w) == (size, size):
    return band

  def coords(n_in):
    c = (np.arange(size) + 0.5) * (n_in / size) - 0.5
    c = np.clip(c, 0, n_in - 1)
    lo = np.floor(c).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, c - lo

  y0, y1, fy = coords(h)
  x0, x1, fx = coords(w)
  top = band[y0][:, x0] * (1 - fx) + band[y0][:, x1] * fx
  bottom = band[y1][:, x0] * (1 - fx) + band[y1][:, x1] * fx
  return top * (1 - fy[:, None]) + bottom * fy[:, None]


def multi_hot(labels: list[str], source: str) -> np.ndarray:
  out = np.zeros(len(CLASSES_43), np.int64)
  for name in labels:
    if name not in CLASSES_43:
      raise ValueError(f"{source}: label {name!r} is not one of the 43 BigEarthNet classes")
    out[CLASSES_43.index(name)] = 1
  return out


def _read_mock(src: pathlib.Path) -> list[dict[str, Any]]:
  mock = src / "v1_configilm_mock"
  labels_path = mock / "labels.json"
  if not labels_path.is_file():
    raise FileNotFoundError(f"{labels_path} is missing (expected the ConfigILM BigEarthNet mock)")
  labels = json.loads(labels_path.read_text())
  out = []
  for split, csv_name in (("train", "train.csv"), ("valid", "val.csv"), ("test", "test.csv")):
    with open(mock / csv_name) as f:
      names = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
    for name in names:
      path = mock / "patches" / f"{name}.npz"
      if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (listed in {mock / csv_name})")
      with np.load(path, allow_pickle=False) as z:
        bands = {code: z[f"S2_{code}"] for code in BAND_CODES}
      out.append({"patch": name, "split": split, "bands": bands,
                  "label": multi_hot(labels[name]["labels_43"], str(labels_path)),
                  "transform": None, "crs": None})
  return out


def _read_tifs(src: pathlib.Path) -> list[dict[str, Any]]:
  import tifffile  # pylint: disable=g-import-not-at-top

  root = src / "v1_examples_tif" / "BigEarthNet-S2-Example"
  out = []
  for d in sorted(p for p in root.glob("*") if p.is_dir()):
    meta_path = d / f"{d.name}_labels_metadata.json"
    if not meta_path.is_file():
      raise FileNotFoundError(f"{meta_path} is missing")
    meta = json.loads(meta_path.read_text())
    bands = {}
    for code in BAND_CODES:
      tif = d / f"{d.name}_{code}.tif"
      if not tif.is_file():
        raise FileNotFoundError(f"{tif} is missing")
      bands[code] = tifffile.imread(tif)
    c = meta["coordinates"]
    # geobench's converter took the transform of the last band it opened (B12, 20 m).
    out.append({"patch": d.name, "split": "train", "bands": bands,
                "label": multi_hot(meta["labels"], str(meta_path)),
                "transform": gb.Affine(20, 0, c["ulx"], 0, -20, c["uly"]),
                "crs": gb.crs_object(meta["projection"])})
  return out


def convert(src: str | pathlib.Path, out: str | pathlib.Path, *, include_tifs: bool = True,
            seed: int = 0) -> pathlib.Path:
  """Writes the GEO-Bench m-bigearthnet folder; returns its path."""
  src, out = pathlib.Path(src), pathlib.Path(out)
  patches = _read_mock(src) + (_read_tifs(src) if include_tifs else [])
  task_dir = out / "classification_v1.0" / TASK
  task_dir.mkdir(parents=True, exist_ok=True)
  infos = [gb.sentinel2_info(n) for n in GB_NAMES]
  splits: dict[str, list[str]] = {s: [] for s in gb.SPLITS}
  label_stats, source_names = {}, {}
  pixels: dict[str, list[np.ndarray]] = {n: [] for n in GB_NAMES}
  rng = np.random.default_rng(seed)
  for i, p in enumerate(patches):
    name = f"id_{i:04d}"
    arrays = [np.rint(resize_bilinear(p["bands"][code])).astype(np.float32) for code in BAND_CODES]
    bands = [(info.name, a, gb.band_attrs(info, spatial_resolution=10, transform=p["transform"],
                                          crs=p["crs"]))
             for info, a in zip(infos, arrays)]
    gb.write_sample(task_dir / f"{name}.hdf5", bands, label=p["label"])
    splits[p["split"]].append(name)
    label_stats[name] = [int(v) for v in p["label"]]
    source_names[name] = p["patch"]
    if p["split"] == "train":  # band_stats: <= 1000 random pixels per band and sample
      idx = rng.choice(PATCH * PATCH, size=min(1000, PATCH * PATCH), replace=False)
      for n, a in zip(GB_NAMES, arrays):
        pixels[n].append(a.ravel()[idx])
  band_stats = {n: gb.stats_of(np.concatenate(v)) for n, v in pixels.items()}
  band_stats["label"] = gb.stats_of(np.array([label_stats[n] for n in splits["train"]]))
  specs = gb.task_specs_object(gb.TASKS[TASK], infos, class_names=list(CLASSES_43))
  gb.write_task_files(task_dir, gb.TASKS[TASK], splits, band_stats, specs, seed=seed)
  (task_dir / "label_stats.json").write_text(json.dumps(label_stats, indent=2))
  (out / f"{TASK}_source_names.json").write_text(json.dumps(source_names, indent=2))
  return task_dir


def _define_flags() -> None:
  """Defines the CLI flags; only when run as a program (these modules share a process in
  tests, and absl allows each flag name once)."""
  global _SRC, _OUT
  _SRC = flags.DEFINE_string("src", "../shared/data/bigearthnet", "The shared BigEarthNet folder.")
  _OUT = flags.DEFINE_string("out", None, "GEO-Bench root to write into.")


def main(argv):
  del argv
  task_dir = convert(_SRC.value, _OUT.value)
  counts = {s: len(json.loads((task_dir / "default_partition.json").read_text())[s])
            for s in gb.SPLITS}
  print(f"wrote {task_dir}: {counts}")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["out"])
  app.run(main)
