"""Sentinel-2 SAFE products (L1C and L2A, as ESA distributes them) -> 128x128 GeoMeld tiles.

  --source=s2safe:/data/S2B_MSIL2A_20230601T100031_N0509_R122_T33TWM_20230601T130000.SAFE
  --source=s2safe:'/data/safe/*.SAFE'      (or a folder holding .SAFE products)

Layout read (one unit per granule; products since late 2016 hold one):

  <product>.SAFE/MTD_MSIL1C.xml | MTD_MSIL2A.xml       baseline, offsets, quantification
  <product>.SAFE/GRANULE/<granule>/IMG_DATA/T33TWM_20230601T100031_B02.jp2            (L1C)
  <product>.SAFE/GRANULE/<granule>/IMG_DATA/R10m/T33TWM_20230601T100031_B02_10m.jp2   (L2A)

Bands: each band at its finest native resolution (L2A also ships 10 m bands resampled to 20
and 60 m: those copies are skipped), B10 ignored, then the generic raster path: nearest
neighbour onto the 10 m grid, cut into tiles, each tile located from the granule's UTM
georeference (`raster.tiles_from_scene`). TCI, AOT and WVP layers are not read. An L2A
product's scene classification (SCL, 20 m) gives each tile ``s2_cloud_fraction`` (classes 8-10:
cloud medium/high probability, thin cirrus) and ``s2_cloud_shadow_fraction`` (class 3), over
its pixels with a class, for filtering downstream; nothing is dropped for clouds here.

Radiometry. GeoMeld stores Sentinel-2 as DN = reflectance x 1e4, the convention of the
"harmonized" collections the release was drawn from. From processing baseline 04.00 (Jan
2022) ESA adds an offset: reflectance = (DN + ADD_OFFSET) / QUANTIFICATION_VALUE, with
RADIO_ADD_OFFSET (L1C) or BOA_ADD_OFFSET (L2A) = -1000 per band in the product metadata.
This source applies the product's own offsets, so products of every baseline land on one
scale. DN 0 stays no data; a dark pixel whose reflectance is <= 0 after the offset becomes
DN 1 (the smallest valid value, as the harmonized collections clamp such pixels), counted per
tile in ``metadata['s2_dark_pixels_clamped']``.
A quantification value other than 10000 is refused rather than silently rescaled.
"""

from __future__ import annotations

import pathlib
import re
import xml.etree.ElementTree as ET
from typing import Any, Iterator

import numpy as np

from data_prep.sources import raster
from data_prep.sources.base import RawSample, SourceItem
from data_prep.sources.geomeld import fingerprint_file
from geomeld_jax import modalities as mod

# ESA's band_id attribute in the product metadata -> band name.
ESA_BAND_IDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
QUANTIFICATION = 10000.0  # DN = reflectance x 1e4 (modalities.SENTINEL2)
_PRODUCT_RE = re.compile(
    r"(?P<mission>S2[ABCD])_MSI(?P<level>L1C|L2A)_(?P<datatake>\d{8}T\d{6})_N(?P<baseline>\d{4})"
    r"_R(?P<orbit>\d{3})_(?P<tile>T\d{2}[A-Z]{3})_\d{8}T\d{6}")
_RESOLUTION_RE = re.compile(r"_(\d{2})m$")


def parse_product_name(name: str) -> dict[str, str]:
  """Fields of a SAFE product name (compact naming convention, 2016 onwards)."""
  m = _PRODUCT_RE.match(name)
  if not m:
    raise ValueError(f"{name!r} is not a Sentinel-2 SAFE product name "
                     "(S2x_MSIL1C|L2A_<datatake>_N<baseline>_R<orbit>_T<tile>_<time>.SAFE)")
  return m.groupdict()


def _local(tag: str) -> str:
  return tag.rsplit("}", 1)[-1]  # the product schemas differ in namespace, not in tag names


def read_product_metadata(path: pathlib.Path) -> dict[str, Any]:
  """MTD_MSIL1C.xml / MTD_MSIL2A.xml -> start time, baseline, per-band add offsets and the
  quantification value (reflectance bands)."""
  offsets: dict[str, float] = {}
  out: dict[str, Any] = {"offsets": offsets}
  for el in ET.parse(path).getroot().iter():
    tag, text = _local(el.tag), (el.text or "").strip()
    if tag in ("RADIO_ADD_OFFSET", "BOA_ADD_OFFSET"):
      offsets[ESA_BAND_IDS[int(el.get("band_id"))]] = float(text)
    elif tag in ("QUANTIFICATION_VALUE", "BOA_QUANTIFICATION_VALUE"):
      out["quantification"] = float(text)
    elif tag in ("PRODUCT_START_TIME", "PROCESSING_BASELINE", "PRODUCT_TYPE", "SPACECRAFT_NAME"):
      out[tag.lower()] = text
  if "quantification" not in out:
    raise ValueError(f"{path}: no QUANTIFICATION_VALUE / BOA_QUANTIFICATION_VALUE")
  return out


def granule_band_files(img_data: pathlib.Path) -> list[tuple[pathlib.Path, str, str]]:
  """(path, 'sentinel2', band) per GeoMeld band of a granule's IMG_DATA (and its R10m/R20m/
  R60m folders in L2A), each band at its finest resolution."""
  best: dict[str, tuple[int, pathlib.Path]] = {}
  for p in sorted(img_data.rglob("*.jp2")):
    m = _RESOLUTION_RE.search(p.stem)  # L2A: "_B02_10m"; L1C names carry none
    named = raster.band_from_name(p.stem[:m.start()] if m else p.stem)
    if named is None or named[0] != "sentinel2":
      continue  # TCI, SCL, AOT, WVP, B10 (cirrus), ...
    band, res = named[1], int(m.group(1)) if m else 0
    if band not in best or res < best[band][0]:
      best[band] = (res, p)
  return [(p, "sentinel2", band) for band, (_, p) in
          sorted(best.items(), key=lambda kv: mod.SENTINEL2.band_index(kv[0]))]


SCL_CLOUD = (8, 9, 10)  # cloud medium probability, cloud high probability, thin cirrus
SCL_SHADOW = (3,)


def scene_classification_file(img_data: pathlib.Path) -> pathlib.Path | None:
  """The L2A granule's SCL layer (20 m), or None (L1C)."""
  return next(iter(sorted(img_data.rglob("*_SCL_20m.jp2"))), None)


def cloud_fractions(scl: np.ndarray, georef: raster.GeoRef, bounds: list[float]
                    ) -> dict[str, float | None]:
  """Cloud and cloud-shadow shares of the SCL pixels inside a tile's map bounds."""
  c0 = max(0, int(np.floor((bounds[0] - georef.ulx) / georef.res_x)))
  c1 = int(np.ceil((bounds[2] - georef.ulx) / georef.res_x))
  r0 = max(0, int(np.floor((georef.uly - bounds[1]) / georef.res_y)))
  r1 = int(np.ceil((georef.uly - bounds[3]) / georef.res_y))
  window = scl[r0:r1, c0:c1]
  classified = int(np.count_nonzero(window))  # class 0: no data
  if not classified:
    return {"s2_cloud_fraction": None, "s2_cloud_shadow_fraction": None}
  share = lambda classes: round(float(np.isin(window, classes).sum()) / classified, 4)  # noqa: E731
  return {"s2_cloud_fraction": share(SCL_CLOUD), "s2_cloud_shadow_fraction": share(SCL_SHADOW)}


def apply_offsets(sample: RawSample, offsets: dict[str, float]) -> None:
  """DN + ADD_OFFSET on one tile's Sentinel-2 (C, H, W) float array, in place: DN 0 is NaN
  (no data) already and stays so; a pixel at or below 0 after the offset becomes 1 and is
  counted (10 m pixels x bands) in ``metadata['s2_dark_pixels_clamped']``."""
  names = sample.band_names.get("sentinel2", mod.SENTINEL2.bands)
  shift = np.array([offsets.get(b, 0.0) for b in names], np.float32)[:, None, None]
  shifted = sample.arrays["sentinel2"] + shift
  dark = shifted < 1.0  # NaN compares False
  sample.arrays["sentinel2"] = np.where(dark, np.float32(1.0), shifted)
  sample.metadata["s2_dark_pixels_clamped"] = int(np.count_nonzero(dark))


class Sentinel2SafeSource:
  """SAFE products (a product folder, a folder of products or a glob); one unit per granule.

  Args:
    pattern: where the ``*.SAFE`` folders are.
    pad: emit the partial edge tiles padded with no data (a 10,980 px granule leaves a 100 px
      strip) instead of one ``partial_edge_tile`` rejection per strip.
  """

  name = "s2safe"

  def __init__(self, pattern: str, pad: bool = False):
    self.pattern = pattern
    self.pad = pad

  def units(self) -> list[str]:
    root = pathlib.Path(self.pattern)
    if root.is_dir() and root.suffix.upper() == ".SAFE":
      products = [root]
    elif root.is_dir():
      products = sorted(p for p in root.iterdir() if p.is_dir() and p.suffix.upper() == ".SAFE")
    else:
      products = [pathlib.Path(d) for d in raster.expand_dirs(self.pattern)]
    units = [str(g / "IMG_DATA") for p in products for g in sorted((p / "GRANULE").glob("*"))
             if (g / "IMG_DATA").is_dir()]
    if not units:
      raise FileNotFoundError(f"no SAFE product with GRANULE/*/IMG_DATA matches {self.pattern!r}")
    return units

  def fingerprint(self, unit: str) -> str:
    files = granule_band_files(pathlib.Path(unit))
    return "|".join(f"{p.name}={fingerprint_file(str(p))}" for p, _, _ in files)

  def input_bytes(self, unit: str) -> int:
    return raster.decoded_bytes(granule_band_files(pathlib.Path(unit)))

  def read(self, unit: str) -> Iterator[SourceItem]:
    img_data = pathlib.Path(unit)
    product = img_data.parent.parent.parent
    fields = parse_product_name(product.name)
    mtd = product / f"MTD_MSI{fields['level']}.xml"
    if not mtd.is_file():
      raise FileNotFoundError(f"{mtd} is missing: without it the radiometric offset of this "
                              "product is unknown")
    info = read_product_metadata(mtd)
    if info["quantification"] != QUANTIFICATION:
      raise ValueError(f"{mtd}: quantification value {info['quantification']:g}, expected "
                       f"{QUANTIFICATION:g} (GeoMeld stores reflectance x 1e4)")
    files = granule_band_files(img_data)
    if not files:
      raise FileNotFoundError(f"{img_data}: no band files (*_B02.jp2, R10m/*_B02_10m.jp2, ...)")
    bands = []
    for path, key, band in files:
      data, georef, _ = raster.read_with_rasterio(str(path))  # ESA's JP2s declare no no-data
      bands.append(raster.Band(key, band, data, georef, nodata=0))
    tile = re.search(r"_(T\d{2}[A-Z]{3})_", img_data.parent.name)
    mgrs = tile.group(1) if tile else fields["tile"]
    offsets = {b: info["offsets"].get(b, 0.0) for _, _, b in files}
    meta: dict[str, Any] = {
        "dataset": "Sentinel-2 SAFE", "s2_product": fields["level"],
        "s2_safe_product": product.name, "s2_mgrs_tile": mgrs,
        "s2_processing_baseline": info.get("processing_baseline", fields["baseline"]),
        "s2_add_offsets_applied": offsets,
        "acquisition_date": info.get("product_start_time", "")[:10] or (
            f"{fields['datatake'][:4]}-{fields['datatake'][4:6]}-{fields['datatake'][6:8]}"),
    }
    prefix = f"s2{fields['level'].lower()}_{mgrs}_{fields['datatake']}"  # s2l1c_T33TWM_2023...
    scl_path = scene_classification_file(img_data)
    scl = raster.read_with_rasterio(str(scl_path)) if scl_path else None
    for item in raster.tiles_from_scene(raster.Scene(bands), meta, prefix, f"s2safe:{unit}",
                                        self.pad):
      if isinstance(item, RawSample):
        apply_offsets(item, offsets)
        if scl is not None:
          item.metadata.update(cloud_fractions(scl[0], scl[1], item.metadata["map_bounds"]))
      yield item
