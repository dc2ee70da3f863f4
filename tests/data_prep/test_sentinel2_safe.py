"""Sentinel-2 SAFE products (JPEG2000 bands, product metadata, offsets) and JPEG2000 bands in
the generic raster reader. The products are written here with rasterio's JP2OpenJPEG driver
(lossless), in ESA's layout and naming."""

import math

import numpy as np
import pytest
import tifffile

from data_prep import validate
from data_prep.sources import raster, sentinel2_safe
from data_prep.sources.base import RawSample, Rejection
from data_prep.sources.registry import make_source
from geomeld_jax import modalities as mod

rasterio = pytest.importorskip("rasterio")  # the [raster] extra; the [test] extra installs it
from rasterio.transform import from_origin  # pylint: disable=g-import-not-at-top,wrong-import-position

# rasterio's own from_origin uses Affine's deprecated `*`.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
T = mod.TILE_SIZE
ULX, ULY, EPSG = 399960.0, 5100000.0, 32633  # the corner of MGRS tile 33TWM's grid, UTM 33N
DATATAKE = "20230601T100031"
RES = {"B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20, "B8": 10,
       "B8A": 20, "B9": 60, "B10": 60, "B11": 20, "B12": 20}
SIDE = 2 * T  # a 2 x 2 tile granule


def _jp2(path, data, res, ulx=ULX, uly=ULY, epsg=EPSG):
  path.parent.mkdir(parents=True, exist_ok=True)
  with rasterio.open(path, "w", driver="JP2OpenJPEG", width=data.shape[1], height=data.shape[0],
                     count=1, dtype=data.dtype, crs=f"EPSG:{epsg}" if epsg else None,
                     transform=from_origin(ulx, uly, res, res) if epsg else None,
                     QUALITY=100, REVERSIBLE="YES") as f:
    f.write(data, 1)


def _mtd(level: str, baseline: str, offset: int | None, quantification: int = 10000) -> str:
  ns = f"https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-{level[1:]}.xsd"
  if level == "L1C":
    quant = f'<QUANTIFICATION_VALUE unit="none">{quantification}</QUANTIFICATION_VALUE>'
    offsets = "".join(f'<RADIO_ADD_OFFSET band_id="{i}">{offset}</RADIO_ADD_OFFSET>'
                      for i in range(13))
    offsets = f"<Radiometric_Offset_List>{offsets}</Radiometric_Offset_List>"
  else:
    quant = ("<QUANTIFICATION_VALUES_LIST><BOA_QUANTIFICATION_VALUE unit=\"none\">"
             f"{quantification}</BOA_QUANTIFICATION_VALUE><AOT_QUANTIFICATION_VALUE unit=\"none\">"
             "1000.0</AOT_QUANTIFICATION_VALUE></QUANTIFICATION_VALUES_LIST>")
    offsets = "".join(f'<BOA_ADD_OFFSET band_id="{i}">{offset}</BOA_ADD_OFFSET>' for i in range(13))
    offsets = f"<BOA_ADD_OFFSET_VALUES_LIST>{offsets}</BOA_ADD_OFFSET_VALUES_LIST>"
  if offset is None:  # products before baseline 04.00 have no offset list
    offsets = ""
  return (f'<?xml version="1.0" encoding="UTF-8"?><n1:Level-{level[1:]}_User_Product xmlns:n1="{ns}">'
          f"<n1:General_Info><Product_Info><PRODUCT_START_TIME>2023-06-01T10:00:31.024Z"
          f"</PRODUCT_START_TIME><PRODUCT_TYPE>S2MSI{level[1:]}</PRODUCT_TYPE><PROCESSING_BASELINE>"
          f"{baseline}</PROCESSING_BASELINE></Product_Info><Product_Image_Characteristics>{quant}"
          f"{offsets}</Product_Image_Characteristics></n1:General_Info></n1:Level-{level[1:]}_User_Product>")


def _product(root, level="L1C", baseline="05.09", offset=-1000, seed=0, quantification=10000):
  """A SAFE product of one granule; returns (product dir, DN per band at its native grid)."""
  name = (f"S2A_MSI{level}_{DATATAKE}_N{baseline.replace('.', '')}_R122_T33TWM_"
          "20230601T120000.SAFE")
  product = root / name
  granule = product / "GRANULE" / f"{level}_T33TWM_A041000_{DATATAKE}" / "IMG_DATA"
  (product).mkdir(parents=True)
  (product / f"MTD_MSI{level}.xml").write_text(_mtd(level, baseline, offset, quantification))
  rng = np.random.default_rng(seed)
  dn = {}
  for band, res in RES.items():
    side = math.ceil(SIDE * 10 / res)
    dn[band] = rng.integers(1001, 6000, (side, side)).astype(np.uint16)
    stem = f"T33TWM_{DATATAKE}_{'B8A' if band == 'B8A' else f'B{int(band[1:]):02d}'}"
    if level == "L1C":
      _jp2(granule / f"{stem}.jp2", dn[band], res)
    else:
      _jp2(granule / f"R{res}m" / f"{stem}_{res}m.jp2", dn[band], res)
  if level == "L2A":  # ESA's resampled copies of 10 m bands and non-band layers: never read
    _jp2(granule / "R20m" / f"T33TWM_{DATATAKE}_B02_20m.jp2",
         np.full((SIDE // 2, SIDE // 2), 7, np.uint16), 20)
    scl = np.full((SIDE // 2, SIDE // 2), 4, np.uint8)  # vegetation
    half = T // 2  # a tile's side on the 20 m grid
    scl[:half // 2, half:] = 9  # tile r0 c1: its top half cloud (high probability)
    scl[half // 2:half // 2 + 8, half:] = 3  # and 8 of its 64 rows cloud shadow
    scl[half:, :half] = 0  # tile r1 c0: no classification
    _jp2(granule / "R20m" / f"T33TWM_{DATATAKE}_SCL_20m.jp2", scl, 20)
    _jp2(granule / "R10m" / f"T33TWM_{DATATAKE}_TCI_10m.jp2", np.zeros((SIDE, SIDE), np.uint8), 10)
  return product, dn


def _tiles(source):
  items = [i for u in source.units() for i in source.read(u)]
  return items, {i.tile_id: i for i in items if isinstance(i, RawSample)}


def _upsampled(dn, band):
  k = RES[band] // 10
  return dn[band].repeat(k, 0).repeat(k, 1)[:SIDE, :SIDE]


@pytest.fixture(scope="module")
def l1c(tmp_path_factory):
  product, dn = _product(tmp_path_factory.mktemp("safe"), "L1C")
  b02 = dn["B2"]
  b02[0, 0], b02[0, 1], b02[0, 2] = 0, 900, 1500  # no data; reflectance < 0; DN 500 after offset
  _jp2(next(product.rglob("*_B02.jp2")), b02, 10)
  return product, dn


def test_l1c_product_tiles_offsets_and_location(l1c):
  product, dn = l1c
  source = make_source(f"s2safe:{product}")
  assert source.input_bytes(source.units()[0]) == SIDE * SIDE * mod.SENTINEL2.num_bands * 2
  items, tiles = _tiles(source)
  prefix = f"s2l1c_T33TWM_{DATATAKE}"
  assert sorted(tiles) == [f"{prefix}_r00{r}_c00{c}" for r in (0, 1) for c in (0, 1)]
  assert len(items) == 4  # nothing rejected: 256 px is two whole tiles
  t = tiles[f"{prefix}_r001_c000"]
  s2 = t.arrays["sentinel2"]
  for band in mod.SENTINEL2.bands:  # B10 is not read; every band is DN - 1000, nearest 10 m
    want = _upsampled(dn, band)[T:, :T].astype(np.float32) - 1000
    np.testing.assert_array_equal(s2[mod.SENTINEL2.band_index(band)], want, err_msg=band)
  assert t.metadata["s2_dark_pixels_clamped"] == 0 and "s2_cloud_fraction" not in t.metadata
  assert t.metadata["s2_product"] == "L1C" and t.metadata["acquisition_date"] == "2023-06-01"
  assert t.metadata["s2_processing_baseline"] == "05.09" and t.metadata["crs"] == "EPSG:32633"
  lat, lon = raster.utm_to_latlon(ULX + 10 * T / 2, ULY - 10 * 1.5 * T, 33)
  assert math.isclose(t.metadata["lat"], lat, abs_tol=1e-6)
  assert math.isclose(t.metadata["long"], lon, abs_tol=1e-6)
  # DN 0 stays no data, a dark pixel becomes DN 1 (counted), DN 1500 is stored as 500.
  corner = tiles[f"{prefix}_r000_c000"]
  assert corner.metadata["s2_dark_pixels_clamped"] == 1
  example, _ = validate.to_example(corner)
  stored = example["sentinel2"][..., mod.SENTINEL2.band_index("B2")]
  assert stored[0, 0] == mod.SENTINEL2.nodata_stored and stored[0, 1] == 1 and stored[0, 2] == 500


def test_l2a_product_reads_each_band_at_its_finest_resolution(tmp_path):
  product, dn = _product(tmp_path, "L2A", seed=1)
  _, tiles = _tiles(sentinel2_safe.Sentinel2SafeSource(str(tmp_path)))  # a folder of products
  t = tiles[f"s2l2a_T33TWM_{DATATAKE}_r000_c001"]
  s2 = t.arrays["sentinel2"]
  for band in ("B2", "B5", "B1", "B12"):  # B2 from R10m, not the constant R20m copy
    want = _upsampled(dn, band)[:T, T:].astype(np.float32) - 1000
    np.testing.assert_array_equal(s2[mod.SENTINEL2.band_index(band)], want, err_msg=band)
  assert t.metadata["s2_product"] == "L2A" and t.metadata["s2_safe_product"] == product.name
  # Cloud shares from the scene classification, per tile.
  assert t.metadata["s2_cloud_fraction"] == 0.5 and t.metadata["s2_cloud_shadow_fraction"] == 0.125
  clear = tiles[f"s2l2a_T33TWM_{DATATAKE}_r000_c000"].metadata
  assert clear["s2_cloud_fraction"] == 0.0 and clear["s2_cloud_shadow_fraction"] == 0.0
  assert tiles[f"s2l2a_T33TWM_{DATATAKE}_r001_c000"].metadata["s2_cloud_fraction"] is None


def test_product_before_baseline_04_keeps_its_dn(tmp_path):
  _, dn = _product(tmp_path, "L1C", baseline="02.07", offset=None, seed=2)
  _, tiles = _tiles(make_source(f"s2safe:{tmp_path}/*.SAFE"))  # a glob
  t = tiles[f"s2l1c_T33TWM_{DATATAKE}_r000_c000"]
  np.testing.assert_array_equal(t.arrays["sentinel2"][mod.SENTINEL2.band_index("B4")],
                                dn["B4"][:T, :T].astype(np.float32))
  assert set(t.metadata["s2_add_offsets_applied"].values()) == {0.0}


def test_bad_products_are_clear_errors(tmp_path):
  product, _ = _product(tmp_path / "q", "L1C", quantification=1000)
  source = sentinel2_safe.Sentinel2SafeSource(str(product))
  with pytest.raises(ValueError, match="quantification value 1000"):
    list(source.read(source.units()[0]))
  (product / "MTD_MSIL1C.xml").unlink()
  with pytest.raises(FileNotFoundError, match="MTD_MSIL1C.xml is missing"):
    list(source.read(source.units()[0]))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no SAFE product"):
    sentinel2_safe.Sentinel2SafeSource(str(tmp_path / "empty")).units()
  with pytest.raises(ValueError, match="not a Sentinel-2 SAFE product name"):
    sentinel2_safe.parse_product_name("LC08_L1TP_015033_20200101.SAFE")


def test_raster_folder_reads_real_pixels_from_jpeg2000(shared_data, tmp_path):
  """The Virginia subset's `.jp2` files are TIFFs; written here as real JPEG2000 (lossless),
  the generic reader decodes the same pixels and georeference through rasterio."""
  virginia = shared_data / "sentinel2_l1c_scene_subset_virginia"
  scene = tmp_path / "scene"
  for band, side, res, ulx in (("B02", 2 * T, 10, 435730.0), ("B05", T, 20, 435720.0)):
    data = tifffile.imread(virginia / f"s2_{band}.jp2")[:side, :side]
    _jp2(scene / f"s2_{band}.jp2", data, res, ulx=ulx, uly=4179460.0, epsg=32618)
  with open(scene / "s2_B02.jp2", "rb") as f:
    assert f.read(12) == b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # a JPEG2000 signature box
  source = raster.RasterStackSource(str(scene))
  items = [i for u in source.units() for i in source.read(u)]
  tiles = {i.tile_id: i for i in items if isinstance(i, RawSample)}
  assert len(tiles) == 4 and not [i for i in items if isinstance(i, Rejection)]
  b02 = tifffile.imread(virginia / "s2_B02.jp2")
  got = tiles["scene_r001_c001"].arrays["sentinel2"]
  np.testing.assert_array_equal(got[0], b02[T:2 * T, T:2 * T].astype(np.float32))
  assert tiles["scene_r001_c001"].metadata["crs"] == "EPSG:32618"
  assert abs(tiles["scene_r000_c000"].metadata["lat"] - 37.75) < 0.1  # the subset's NW corner
