"""GEO-Bench v1.0 tasks read with h5py + json, mapped by band NAME onto the model's 12 S2 bands.

Format (../shared/reference/geobench.md §1): a task folder holds one ``<sample>.hdf5`` per
sample (root datasets = bands, 2-D, named ``band_info.name`` plus ``_YYYY-MM-DD`` for dated
tasks; segmentation masks in the dataset ``label``), partition files
``<name>_partition.json`` ({"train", "valid", "test"} lists of sample names),
``band_stats.json`` (per band name: mean, std, ...), ``task_specs.pkl`` and, for
m-bigearthnet, ``label_stats.json`` (sample -> 43 ints). Every HDF5 has a root attribute
``pickle``: the ``repr`` of ``pickle.dumps(attr_dict)``; single-label classes (m-so2sat,
m-eurosat) exist only there.

Why pickle appears here at all: those labels are stored nowhere else. This module is the one
place in the project that touches pickle, in two small, documented pieces:

* ``decode_pickle_attr`` reads the attribute with ``ast.literal_eval`` (never ``eval``) and a
  ``pickle.Unpickler`` whose ``find_class`` admits numpy's array/scalar rebuilders, ``dtype``,
  ``ndarray`` and ``datetime`` only; geobench/ccb/rasterio/affine classes become inert
  placeholders; anything else raises ``GeoBenchFormatError`` naming the file and the class.
* ``_GeobenchPickler`` WRITES the attribute (for the BigEarthNet converter and the test
  fixtures) in exactly geobench 1.0's byte layout, without geobench installed.

Model input: a GEO-Bench sample becomes a (H, W, 12) float32 array in
``modalities.SENTINEL2.bands`` order, z-scored with ``band_stats.json`` (zero-std guard),
and a per-band ``valid`` vector. Bands the task lacks are zero and invalid (the model's input
is ``where(valid, x, 0)``), unless the task follows MMEarth's duplicate rule (m-so2sat fills
B1 from B2 and B9 from B8A, geobench.md §3).
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import io
import json
import pathlib
import pickle
import re
import sys
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from geomeld_jax import modalities as mod

S2_BANDS = mod.SENTINEL2.bands
PARTITIONS = ("default", "0.01x_train", "0.02x_train", "0.05x_train", "0.10x_train",
              "0.20x_train", "0.50x_train", "1.00x_train")
SPLITS = ("train", "valid", "test")
STAT_KEYS = ("max", "mean", "median", "min", "percentile_0_1", "percentile_1", "percentile_5",
             "percentile_95", "percentile_99", "percentile_99_9", "std")
_DATE_SUFFIX = re.compile(r"^(?P<name>.+)_(?P<date>\d{4}-\d{2}-\d{2})$")


class GeoBenchFormatError(ValueError):
  """A GEO-Bench file or folder does not match the v1.0 format; the message names the file."""


# ----------------------------------------------------------------------------------------
# Band names (geobench.dataset.sentinel2_13_bands and the other v1.0 names).
# ----------------------------------------------------------------------------------------

# name -> (alt_names, original resolution, wavelength): geobench's `sentinel2_13_bands`.
SENTINEL2_13 = {
    "01 - Coastal aerosol": (("1", "01"), 60, 0.443),
    "02 - Blue": (("2", "02", "blue"), 10, 0.49),
    "03 - Green": (("3", "03", "green"), 10, 0.56),
    "04 - Red": (("4", "04", "red"), 10, 0.665),
    "05 - Vegetation Red Edge": (("5", "05"), 20, 0.705),
    "06 - Vegetation Red Edge": (("6", "06"), 20, 0.74),
    "07 - Vegetation Red Edge": (("7", "07"), 20, 0.783),
    "08 - NIR": (("8", "08", "NIR"), 10, 0.842),
    "08A - Vegetation Red Edge": (("8A", "08A"), 20, 0.865),
    "09 - Water vapour": (("9", "09"), 60, 0.945),
    "10 - SWIR - Cirrus": (("10",), 60, 1.375),
    "11 - SWIR": (("11",), 20, 1.61),
    "12 - SWIR": (("12",), 20, 2.19),
}
SENTINEL1_8 = ("01 - VH.Real", "02 - VH.Imaginary", "03 - VV.Real", "04 - VV.Imaginary",
               "05 - VH.LEE Filtered", "06 - VV.LEE Filtered", "07 - VH.LEE Filtered.Real",
               "08 - VV.LEE Filtered.Imaginary")
CLOUD_PROBABILITY = "Cloud Probability"
LABEL_DATASET = "label"
# RGB(+NIR) names of the aerial tasks (pv4ger, chesapeake, nz-cattle), mapped to S2 bands.
_RGB_ALIASES = {"Red": "B4", "Green": "B3", "Blue": "B2", "NearInfrared": "B8"}
# Names that exist in v1.0 files but carry nothing the S2 encoder takes.
IGNORED_BANDS = frozenset(SENTINEL1_8) | {CLOUD_PROBABILITY, LABEL_DATASET, "10 - SWIR - Cirrus"}


def s2_band_of(name: str) -> str | None:
  """GEO-Bench band name (no date suffix) -> registry S2 band ('B8A'), None if not an input.

  Raises:
    KeyError: the name is neither a Sentinel-2 band nor a known non-input band.
  """
  if name in IGNORED_BANDS:
    return None
  if name in SENTINEL2_13:
    code = name.split(" - ")[0]  # '08A' -> 'B8A', '01' -> 'B1'
    return "B" + code.lstrip("0")
  if name in _RGB_ALIASES:
    return _RGB_ALIASES[name]
  raise KeyError(name)


def split_date_suffix(key: str) -> tuple[str, str]:
  """'02 - Blue_2019-11-05' -> ('02 - Blue', '2019-11-05'); undated keys -> (key, '')."""
  m = _DATE_SUFFIX.match(key)
  return (m["name"], m["date"]) if m else (key, "")


# ----------------------------------------------------------------------------------------
# Per-task facts (geobench.md §1.5); the reader itself maps whatever names a file holds.
# ----------------------------------------------------------------------------------------

_S2_12 = tuple(n for n in SENTINEL2_13 if n != "10 - SWIR - Cirrus")
_S2_SO2SAT = tuple(list(SENTINEL2_13)[1:9] + list(SENTINEL2_13)[-2:])


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What a GEO-Bench v1.0 task is: its folder, label kind, classes and band names."""

  name: str
  benchmark: str  # the parent folder: classification_v1.0 | segmentation_v1.0
  kind: str  # 'multilabel' | 'multiclass' | 'segmentation'
  num_classes: int
  patch_size: int
  band_names: tuple[str, ...]  # HDF5 names in write order (no date suffix), label excluded
  dated: bool = False
  # MMEarth protocol: bands a task lacks are filled from a neighbour (target <- source).
  duplicate_missing: tuple[tuple[str, str], ...] = ()
  # MMEarth divides the so2sat band_stats by 1e4 (geobench.md §3: possibly wrong; an option).
  stats_divisor: float = 1.0
  # Band names that are known to be wrong in the data: written name -> band it really holds.
  band_name_fixes: tuple[tuple[str, str], ...] = ()

  @property
  def is_segmentation(self) -> bool:
    return self.kind == "segmentation"


TASKS: Mapping[str, TaskInfo] = {t.name: t for t in (
    TaskInfo("m-bigearthnet", "classification_v1.0", "multilabel", 43, 120, _S2_12),
    TaskInfo("m-so2sat", "classification_v1.0", "multiclass", 17, 32, SENTINEL1_8 + _S2_SO2SAT,
             duplicate_missing=(("B1", "B2"), ("B9", "B8A")), stats_divisor=1e4),
    TaskInfo("m-eurosat", "classification_v1.0", "multiclass", 10, 64, tuple(SENTINEL2_13),
             # geo-bench issue #28: the last five names are shifted in the data.
             band_name_fixes=(("08A - Vegetation Red Edge", "B9"), ("09 - Water vapour", None),
                              ("10 - SWIR - Cirrus", "B11"), ("11 - SWIR", "B12"),
                              ("12 - SWIR", "B8A"))),
    TaskInfo("m-pv4ger", "classification_v1.0", "multiclass", 2, 320, ("Red", "Green", "Blue")),
    TaskInfo("m-cashew-plant", "segmentation_v1.0", "segmentation", 7, 256,
             _S2_12 + (CLOUD_PROBABILITY,), dated=True),
    TaskInfo("m-SA-crop-type", "segmentation_v1.0", "segmentation", 10, 256,
             _S2_12 + (CLOUD_PROBABILITY,)),
    TaskInfo("m-pv4ger-seg", "segmentation_v1.0", "segmentation", 2, 320, ("Red", "Green", "Blue")),
    TaskInfo("m-chesapeake", "segmentation_v1.0", "segmentation", 7, 256,
             ("Blue", "Green", "NearInfrared", "Red")),
    TaskInfo("m-nz-cattle", "segmentation_v1.0", "segmentation", 2, 500, ("Red", "Green", "Blue")),
)}


def task_info(name: str) -> TaskInfo:
  try:
    return TASKS[name]
  except KeyError:
    raise KeyError(f"unknown GEO-Bench task {name!r}; known: {sorted(TASKS)}") from None


# ----------------------------------------------------------------------------------------
# The `pickle` attribute: restricted reading.
# ----------------------------------------------------------------------------------------

# Packages whose classes appear in real attr dicts; their objects become inert placeholders.
_PLACEHOLDER_ROOTS = frozenset({"geobench", "ccb", "rasterio", "affine"})
_NUMPY_REBUILDERS = frozenset({"_reconstruct", "scalar"})


class Placeholder:
  """Stands in for a geobench/rasterio/affine object: keeps constructor args and state only.

  ``args`` are the NEWOBJ arguments (Affine's six numbers), ``state`` the BUILD state (a
  BandInfo's attribute dict, a CRS's WKT string). Nothing is executed.
  """

  module = ""
  qualname = ""

  def __new__(cls, *args):
    self = object.__new__(cls)
    self.args = args
    self.state = None
    return self

  def __setstate__(self, state):
    self.state = state

  def attr(self, name: str, default=None):
    return self.state.get(name, default) if isinstance(self.state, dict) else default

  def __repr__(self):
    return f"<{self.module}.{self.qualname} placeholder args={self.args} state={self.state!r}>"


_placeholder_classes: dict[tuple[str, str], type] = {}


def _placeholder_class(module: str, name: str) -> type:
  key = (module, name)
  if key not in _placeholder_classes:
    _placeholder_classes[key] = type(name, (Placeholder,), {"module": module, "qualname": name})
  return _placeholder_classes[key]


class _RestrictedUnpickler(pickle.Unpickler):
  """Admits numpy array/scalar rebuilders, dtype, ndarray and datetime; stubs geobench & co."""

  def __init__(self, data: bytes, source: str):
    super().__init__(io.BytesIO(data))
    self._source = source

  def find_class(self, module: str, name: str):
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in _NUMPY_REBUILDERS:
      from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
      return getattr(multiarray, name)
    if module == "numpy" and name in ("ndarray", "dtype"):
      return getattr(np, name)
    if module == "datetime" and name in ("date", "datetime"):
      return getattr(datetime, name)
    if module.split(".")[0] in _PLACEHOLDER_ROOTS:
      return _placeholder_class(module, name)
    raise GeoBenchFormatError(
        f"{self._source}: the pickle attribute references {module}.{name}, which is outside "
        "the allow-list (numpy array/scalar rebuilders, datetime, geobench/rasterio/affine "
        "placeholders); refusing to unpickle it")


def decode_pickle_attr(text: str | bytes, source: str) -> dict[str, Any]:
  """The root ``pickle`` attribute of a GEO-Bench HDF5 -> its attr dict, read safely.

  ``text`` is ``repr(pickle_bytes)``: parsed with ``ast.literal_eval`` (a literal only, never
  code), then unpickled with the allow-list above. ``source`` names the file in errors.
  """
  if isinstance(text, bytes):
    text = text.decode("utf-8")
  try:
    raw = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise GeoBenchFormatError(f"{source}: the pickle attribute is not a bytes literal ({e})") from None
  if not isinstance(raw, bytes):
    raise GeoBenchFormatError(f"{source}: the pickle attribute holds a {type(raw).__name__}, "
                              "not bytes")
  try:
    attrs = _RestrictedUnpickler(raw, source).load()
  except GeoBenchFormatError:
    raise
  except Exception as e:  # a truncated or corrupt stream: say which file
    raise GeoBenchFormatError(f"{source}: cannot unpickle the pickle attribute: {e!r}") from None
  if not isinstance(attrs, dict):
    raise GeoBenchFormatError(f"{source}: the pickle attribute holds a {type(attrs).__name__}, "
                              "not the attr dict")
  return attrs


# ----------------------------------------------------------------------------------------
# The `pickle` attribute: writing in geobench 1.0's exact byte layout (converter, fixtures).
# ----------------------------------------------------------------------------------------


_gb_classes: dict[tuple[str, str], type] = {}


def _gb_class(module: str, name: str, base: type = object) -> type:
  """A cached stand-in class pickled as ``module.name`` (one object per name: the pickler
  memoises globals by identity)."""
  key = (module, name)
  if key not in _gb_classes:
    _gb_classes[key] = type(name, (base,), {"_gb_spec": (module, name), "__qualname__": name})
  return _gb_classes[key]


def gb_object(module: str, name: str, state: Mapping[str, Any]) -> Any:
  """A geobench object (BandInfo, label type, TaskSpecifications) for writing.

  Pickles like the real one: NEWOBJ of ``module.name`` with ``()`` then BUILD with its
  ``__dict__`` (keys in the real constructor's order).
  """
  obj = _gb_class(module, name)()
  obj.__dict__.update(state)
  return obj


class _CRS:
  """rasterio.crs.CRS stand-in: pickled as NEWOBJ ``()`` + BUILD with its WKT string."""

  _gb_spec = ("rasterio.crs", "CRS")

  def __init__(self, wkt: str):
    self.wkt = wkt

  def __getstate__(self):
    return self.wkt


class Affine(tuple):
  """affine 2.x ``Affine`` stand-in: a 9-tuple of floats pickled with its first six numbers."""

  __slots__ = ()
  _gb_spec = ("affine", "Affine")

  def __new__(cls, a, b, c, d, e, f):
    return tuple.__new__(cls, [float(v) for v in (a, b, c, d, e, f, 0.0, 0.0, 1.0)])

  def __getnewargs__(self):
    return tuple(self[:6])


class _GeobenchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Protocol-4 pure-Python pickler emitting geobench/affine/rasterio/numpy-1 globals by name.

  The pure-Python pickler memoises exactly like the C one, so the output is byte-identical
  to geobench 1.0's ``pickle.dumps(attr_dict)`` (1649 B for m-so2sat, 2447 B for an
  m-bigearthnet sample in UTM zone 31N; geobench.md §2.4).
  """

  def __init__(self, file):
    super().__init__(file, protocol=4)

  def save_global(self, obj, name=None):
    spec = getattr(obj, "_gb_spec", None) if isinstance(obj, type) else None
    if spec is None and callable(obj) and getattr(obj, "__name__", "") in _NUMPY_REBUILDERS and (
        getattr(obj, "__module__", "") or "").startswith("numpy"):
      spec = ("numpy.core.multiarray", obj.__name__)  # as the numpy-1 writers named them
    if spec is None:
      return super().save_global(obj, name)
    self.save(sys.intern(spec[0]))
    self.save(sys.intern(spec[1]))
    self.write(pickle.STACK_GLOBAL)
    self.memoize(obj)


def encode_pickle_attr(attr_dict: Mapping[str, Any]) -> str:
  """The ``pickle`` attribute text for an attr dict (``str`` of the protocol-4 bytes)."""
  buf = io.BytesIO()
  _GeobenchPickler(buf).dump(dict(attr_dict))
  return str(buf.getvalue())


def pickle_bytes(attr_dict: Mapping[str, Any]) -> bytes:
  buf = io.BytesIO()
  _GeobenchPickler(buf).dump(dict(attr_dict))
  return buf.getvalue()


def utm_wkt(zone: int, north: bool = True) -> str:
  """GDAL's WKT1 of WGS 84 / UTM (what rasterio's CRS pickles), without rasterio."""
  epsg = (32600 if north else 32700) + zone
  return (
      f'PROJCS["WGS 84 / UTM zone {zone}{"N" if north else "S"}",GEOGCS["WGS 84",DATUM["WGS_1984",'
      'SPHEROID["WGS 84",6378137,298.257223563,AUTHORITY["EPSG","7030"]],AUTHORITY["EPSG","6326"]],'
      'PRIMEM["Greenwich",0,AUTHORITY["EPSG","8901"]],UNIT["degree",0.0174532925199433,'
      'AUTHORITY["EPSG","9122"]],AUTHORITY["EPSG","4326"]],PROJECTION["Transverse_Mercator"],'
      f'PARAMETER["latitude_of_origin",0],PARAMETER["central_meridian",{6 * zone - 183}],'
      'PARAMETER["scale_factor",0.9996],PARAMETER["false_easting",500000],'
      f'PARAMETER["false_northing",{0 if north else 10000000}],UNIT["metre",1,'
      'AUTHORITY["EPSG","9001"]],AXIS["Easting",EAST],AXIS["Northing",NORTH],'
      f'AUTHORITY["EPSG","{epsg}"]]')


def crs_object(wkt: str) -> _CRS:
  return _CRS(wkt)


def sentinel2_info(name: str) -> Any:
  alt, res, wl = SENTINEL2_13[name]
  return gb_object("geobench.dataset", "Sentinel2",
                  {"name": name, "alt_names": alt, "spatial_resolution": res, "wavelength": wl})


def sentinel1_info(name: str) -> Any:
  # v1.0 so2sat files carry the pre-2023 infos: no resolution (geobench.md §2.4).
  return gb_object("geobench.dataset", "Sentinel1",
                  {"name": name, "alt_names": (), "spatial_resolution": None, "wavelength": None})


def cloud_probability_info(alt_names: tuple[str, ...], spatial_resolution) -> Any:
  return gb_object("geobench.dataset", "CloudProbability",
                  {"name": CLOUD_PROBABILITY, "alt_names": alt_names,
                   "spatial_resolution": spatial_resolution})


def segmentation_classes_info(spatial_resolution, n_classes: int) -> Any:
  return gb_object("geobench.dataset", "SegmentationClasses",
                  {"name": LABEL_DATASET, "alt_names": (), "spatial_resolution": spatial_resolution,
                   "n_classes": n_classes, "_class_names": None})


def band_attrs(band_info: Any, *, spatial_resolution, date: datetime.date | None = None,
               transform: Affine | None = None, crs: Any | None = None) -> dict[str, Any]:
  """One band's entry of the attr dict, keys in geobench's order."""
  return dict(date=date, date_id=date, spatial_resolution=spatial_resolution,
              band_info=band_info, meta_info=None, transform=transform, crs=crs)


def write_sample(path: pathlib.Path, bands: Sequence[tuple[str, np.ndarray, dict[str, Any]]], *,
                 label: Any = None, label_band: tuple[np.ndarray, dict[str, Any]] | None = None
                 ) -> pathlib.Path:
  """Writes one sample HDF5 exactly as geobench's ``write_sample_hdf5``.

  Args:
    path: the ``<sample_name>.hdf5`` to write.
    bands: (dataset name incl. any date suffix, 2-D array, band_attrs(...)) in write order.
    label: classification label (int or int64 array) stored in the pickle attribute.
    label_band: segmentation (mask, band_attrs(...)) stored as the dataset ``label``.
  """
  attr_dict: dict[str, Any] = {}
  if label is not None:
    attr_dict["label"] = label
  entries = list(bands) + ([(LABEL_DATASET,) + tuple(label_band)] if label_band is not None else [])
  order = []
  with h5py.File(path, "w") as f:
    for name, data, attrs in entries:
      f.create_dataset(name=name, data=data)
      # geobench's descriptor IS band_info.name (same object) when undated: keep the identity
      # so the pickle memoises it exactly as the real files do.
      info_name = getattr(attrs["band_info"], "name", None)
      key = info_name if info_name == name else name
      order.append(key)
      attr_dict[key] = attrs
    attr_dict["bands_order"] = order
    f.attrs["pickle"] = encode_pickle_attr(attr_dict)
  return path


def task_specs_object(info: TaskInfo, bands_info: Sequence[Any], class_names=None,
                      spatial_resolution=10) -> Any:
  """geobench.task.TaskSpecifications of a task (what ``task_specs.pkl`` holds)."""
  if info.kind == "multilabel":
    label_type = gb_object("geobench.label", "MultiLabelClassification",
                          {"n_classes": info.num_classes, "class_name": class_names})
  elif info.kind == "multiclass":
    label_type = gb_object("geobench.label", "Classification",
                          {"n_classes": info.num_classes, "_class_names": class_names})
  else:
    label_type = segmentation_classes_info(spatial_resolution, info.num_classes)
  return gb_object("geobench.task", "TaskSpecifications", {
      "dataset_name": info.name, "benchmark_name": info.benchmark,
      "patch_size": (info.patch_size, info.patch_size), "n_time_steps": 1,
      "bands_info": list(bands_info), "label_type": label_type,
      "spatial_resolution": spatial_resolution})


def write_task_files(task_dir: pathlib.Path, info: TaskInfo, splits: Mapping[str, Sequence[str]],
                     band_stats: Mapping[str, Mapping[str, float]], task_specs: Any, *,
                     seed: int = 0) -> None:
  """Partitions (all 8), band_stats.json and task_specs.pkl of a task folder."""
  rng = np.random.default_rng(seed)
  train = list(splits["train"])
  for part in PARTITIONS:
    if part == "default":
      names = train
    else:
      frac = float(part.split("x")[0])
      k = max(1, int(len(train) * frac))
      names = [train[i] for i in rng.permutation(len(train))[:k]]
    body = {"train": names, "valid": list(splits["valid"]), "test": list(splits["test"])}
    (task_dir / f"{part}_partition.json").write_text(json.dumps(body, indent=2))
  (task_dir / "band_stats.json").write_text(json.dumps(band_stats, indent=4, sort_keys=True))
  (task_dir / "task_specs.pkl").write_bytes(pickle_bytes_object(task_specs))


def pickle_bytes_object(obj: Any) -> bytes:
  buf = io.BytesIO()
  _GeobenchPickler(buf).dump(obj)
  return buf.getvalue()


def stats_of(values: np.ndarray) -> dict[str, float]:
  """The 11 band_stats.json statistics of a sample of values."""
  v = np.asarray(values, np.float64).ravel()
  q = np.percentile(v, [0.1, 1, 5, 95, 99, 99.9])
  return {"max": float(v.max()), "mean": float(v.mean()), "median": float(np.median(v)),
          "min": float(v.min()), "percentile_0_1": float(q[0]), "percentile_1": float(q[1]),
          "percentile_5": float(q[2]), "percentile_95": float(q[3]), "percentile_99": float(q[4]),
          "percentile_99_9": float(q[5]), "std": float(v.std())}


# ----------------------------------------------------------------------------------------
# Reading a task.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
  """One sample as stored: band arrays by name (date suffix stripped), label, date."""

  name: str
  bands: dict[str, np.ndarray]
  label: Any  # int, int64 (C,) multi-hot, or int (H, W) mask
  date: str
  bands_order: list[str]


@dataclasses.dataclass
class Split:
  """A model-ready split: x (N, H, W, 12) float32 (0 at invalid bands), y, band_valid (12,)."""

  x: np.ndarray
  y: np.ndarray
  band_valid: np.ndarray
  names: list[str]


def find_task_dir(root: str | pathlib.Path, task: str) -> pathlib.Path:
  """The folder of `task` under a GEO-Bench root (or `root` itself when it is that folder)."""
  root = pathlib.Path(root)
  info = task_info(task)
  for cand in (root / info.benchmark / task, root / task, root):
    if cand.name == task and cand.is_dir():
      return cand
  raise GeoBenchFormatError(
      f"GEO-Bench task folder {root / info.benchmark / task} does not exist (looked for "
      f"{info.benchmark}/{task} and {task} under {root})")


class GeoBenchTask:
  """A GEO-Bench v1.0 task folder, read with h5py + json (+ the restricted unpickler).

  Args:
    root: the GEO-Bench root (holding ``classification_v1.0/`` ...) or the task folder.
    task: the task name (``m-bigearthnet`` ...).
    partition: one of PARTITIONS.
    fill_missing: 'task' (the task's MMEarth rule: so2sat duplicates), 'mask' (missing bands
      zero + invalid) or 'duplicate'.
    stats_divisor: divides band_stats mean/std (None: the task's MMEarth default, 1e4 for
      m-so2sat, else 1).
  """

  def __init__(self, root: str | pathlib.Path, task: str, *, partition: str = "default",
               fill_missing: str = "task", stats_divisor: float | None = None):
    self.info = task_info(task)
    self.dir = find_task_dir(root, task)
    if partition not in PARTITIONS:
      raise ValueError(f"unknown partition {partition!r}; known: {PARTITIONS}")
    if fill_missing not in ("task", "mask", "duplicate"):
      raise ValueError(f"fill_missing must be 'task', 'mask' or 'duplicate', got {fill_missing!r}")
    self.partition = partition
    part_path = self.dir / f"{partition}_partition.json"
    stats_path = self.dir / "band_stats.json"
    for p in (part_path, stats_path):
      if not p.is_file():
        raise GeoBenchFormatError(f"{p} is missing: {self.dir} is not a complete GEO-Bench "
                                  f"v1.0 task folder")
    self._partition = json.loads(part_path.read_text())
    for s in SPLITS:
      if s not in self._partition:
        raise GeoBenchFormatError(f"{part_path} has no {s!r} list (keys: {sorted(self._partition)})")
    self.band_stats = json.loads(stats_path.read_text())
    self._label_stats = None
    if self.info.kind == "multilabel":
      ls = self.dir / "label_stats.json"
      self._label_stats = json.loads(ls.read_text()) if ls.is_file() else None
    use_dup = (fill_missing == "duplicate" or
               (fill_missing == "task" and bool(self.info.duplicate_missing)))
    self.duplicates = dict(self.info.duplicate_missing or (("B1", "B2"), ("B9", "B8A"))) if use_dup else {}
    self.stats_divisor = self.info.stats_divisor if stats_divisor is None else float(stats_divisor)
    self._scale_checked = False
    self._fixes = dict(self.info.band_name_fixes)
    self._layout = None  # (source name per S2 band or None), resolved on the first sample

  # -- files ------------------------------------------------------------------------------

  def split_names(self, split: str) -> list[str]:
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; splits: {SPLITS}")
    return list(self._partition[split])

  def sample_path(self, name: str) -> pathlib.Path:
    p = self.dir / f"{name}.hdf5"
    if not p.is_file():
      raise GeoBenchFormatError(f"{p} is missing (listed in {self.dir / (self.partition + '_partition.json')})")
    return p

  def read_sample(self, name: str) -> Sample:
    path = self.sample_path(name)
    with h5py.File(path, "r") as f:
      if "pickle" not in f.attrs:
        raise GeoBenchFormatError(f"{path} has no root 'pickle' attribute")
      bands, date = {}, ""
      mask = None
      for key in f.keys():
        base, d = split_date_suffix(key)
        if base == LABEL_DATASET:
          mask = np.asarray(f[key])
          continue
        bands[base] = np.asarray(f[key])
        date = date or d
      need_pickle = self.info.kind == "multiclass" or (
          self.info.kind == "multilabel" and self._label_stats is None)
      attrs = decode_pickle_attr(f.attrs["pickle"], str(path)) if need_pickle else None
      order = list(attrs["bands_order"]) if attrs else list(f.keys())
    if self.info.is_segmentation:
      if mask is None:
        raise GeoBenchFormatError(f"{path} has no 'label' dataset (segmentation mask)")
      label = mask.astype(np.int32)
    elif self.info.kind == "multilabel" and self._label_stats is not None:
      if name not in self._label_stats:
        raise GeoBenchFormatError(f"{self.dir / 'label_stats.json'} has no entry for {name}")
      label = np.asarray(self._label_stats[name], np.int32)
    else:
      if "label" not in attrs:
        raise GeoBenchFormatError(f"{path}: the pickle attribute has no 'label'")
      label = attrs["label"]
      label = np.asarray(label, np.int32) if self.info.kind == "multilabel" else int(label)
    return Sample(name, bands, label, date, order)

  # -- band mapping and normalisation ------------------------------------------------------

  def _resolve_layout(self, sample: Sample) -> list[str | None]:
    """For each registry S2 band, the GEO-Bench band name that feeds it (None = missing)."""
    by_s2: dict[str, str] = {}
    for name in sample.bands:
      if name in self._fixes:
        target = self._fixes[name]
      else:
        try:
          target = s2_band_of(name)
        except KeyError:
          raise GeoBenchFormatError(
              f"{self.sample_path(sample.name)}: unknown band name {name!r}; known names are "
              f"the Sentinel-2 names {list(SENTINEL2_13)}, RGB {list(_RGB_ALIASES)} and "
              f"ignored {sorted(IGNORED_BANDS)}") from None
      if target is not None:
        by_s2[target] = name
    for dst, src in self.duplicates.items():
      if dst not in by_s2 and src in by_s2:
        by_s2[dst] = by_s2[src]
    if not by_s2:
      raise GeoBenchFormatError(f"{self.sample_path(sample.name)} holds no Sentinel-2 band")
    return [by_s2.get(b) for b in S2_BANDS]

  def _stats(self, name: str) -> tuple[float, float]:
    if name not in self.band_stats:
      raise GeoBenchFormatError(f"{self.dir / 'band_stats.json'} has no entry for band {name!r}")
    st = self.band_stats[name]
    mean, std = float(st["mean"]), float(st["std"])
    mean, std = mean / self.stats_divisor, std / self.stats_divisor
    if not np.isfinite(std) or std <= 0:  # zero-std guard (SA-crop Cloud Probability, constant bands)
      std = 1.0
    return (mean if np.isfinite(mean) else 0.0), std

  @property
  def layout(self) -> list[str | None]:
    if self._layout is None:
      first = (self.split_names("train") or self.split_names("test"))[0]
      self._layout = self._resolve_layout(self.read_sample(first))
    return self._layout

  def band_valid(self) -> np.ndarray:
    return np.array([src is not None for src in self.layout], bool)

  def to_model_input(self, sample: Sample, drop_bands: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 12) float32 normalised, 0 at invalid bands; valid (12,) bool."""
    for b in drop_bands:
      mod.SENTINEL2.band_index(b)  # KeyError naming an unknown band
    layout = self.layout
    present = [n for n in layout if n is not None]
    h, w = sample.bands[present[0]].shape[:2]
    x = np.zeros((h, w, len(S2_BANDS)), np.float32)
    valid = np.zeros(len(S2_BANDS), bool)
    # A dropped band's source file is dropped wherever it feeds: So2Sat fills B1 with a copy of
    # the blue band, so dropping B2 must empty B1 too, or the "without B2" row still sees blue.
    # Dropping the copy (B1) leaves the real band (B2) in place.
    def is_copy(b):
      dup_of = self.duplicates.get(b)
      return dup_of is not None and layout[S2_BANDS.index(b)] == layout[S2_BANDS.index(dup_of)]

    dropped_sources = {layout[S2_BANDS.index(b)] for b in drop_bands if not is_copy(b)} - {None}
    for i, src in enumerate(layout):
      if src is None or S2_BANDS[i] in drop_bands or src in dropped_sources:
        continue
      if src not in sample.bands:
        raise GeoBenchFormatError(f"{self.sample_path(sample.name)} lacks band {src!r} that "
                                  "the task's first sample has")
      mean, std = self._stats(src)
      band = sample.bands[src].astype(np.float32)
      x[..., i] = np.where(np.isfinite(band), (band - mean) / std, 0.0)
      valid[i] = True
    return x, valid

  # -- splits ------------------------------------------------------------------------------

  def iter_batches(self, split: str, batch_size: int, *, max_samples: int | None = None,
                   drop_bands: Sequence[str] = ()) -> Iterator[Split]:
    self.check_stats_scale()
    names = self.split_names(split)[:max_samples]
    for start in range(0, len(names), batch_size):
      chunk = names[start:start + batch_size]
      xs, ys, valid = [], [], None
      for n in chunk:
        s = self.read_sample(n)
        x, valid = self.to_model_input(s, drop_bands)
        xs.append(x)
        ys.append(s.label)
      yield Split(np.stack(xs), np.asarray(np.stack(ys) if self.info.kind != "multiclass"
                                           else ys, np.int32), valid, chunk)

  def stats_scale_ratio(self, num_samples: int = 8) -> float:
    """Median over Sentinel-2 bands of (data mean / band_stats mean after the divisor) on a few
    train samples: ~1 when band_stats and the data share units (geobench.md §3 asks for this
    check because m-so2sat's band_stats may already be in reflectance units)."""
    ratios = []
    names = self.split_names("train")[:num_samples]
    for src in sorted({n for n in self.layout if n is not None}):
      stats_mean = self._stats(src)[0]
      data_mean = float(np.mean([np.nanmean(self.read_sample(n).bands[src]) for n in names]))
      if abs(stats_mean) > 0 and np.isfinite(data_mean):
        ratios.append(data_mean / stats_mean)
    return float(np.median(ratios)) if ratios else 1.0

  def check_stats_scale(self) -> None:
    """Raises when band_stats and the data differ by more than an order of magnitude.

    Inputs off by 1e4 (a wrong m-so2sat divisor) carry no signal, and every score computed on
    them would be noise; so this runs before any split is read, in every mode.
    """
    if self._scale_checked:
      return
    ratio = self.stats_scale_ratio()
    if not 0.1 <= ratio <= 10.0:  # an order of magnitude: the check is for a 1e4 slip
      raise GeoBenchFormatError(
          f"{self.info.name}: the data's Sentinel-2 means are {ratio:.3g} x band_stats' (divided "
          f"by {self.stats_divisor:g}), so the inputs would not be z-scored. If band_stats is in "
          "the data's units, pass a divisor of 1 (config.so2sat_stats_divisor=1 for m-so2sat); "
          "MMEarth's protocol divides by 1e4.")
    self._scale_checked = True

  def load_split(self, split: str, *, max_samples: int | None = None,
                 drop_bands: Sequence[str] = ()) -> Split:
    parts = list(self.iter_batches(split, 256, max_samples=max_samples, drop_bands=drop_bands))
    if not parts:
      raise GeoBenchFormatError(f"{self.dir}: split {split!r} of partition {self.partition!r} is empty")
    return Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                 parts[0].band_valid, [n for p in parts for n in p.names])
