"""`--source` spec strings -> Source objects.

A spec is ``<scheme>:<location>``:

=============== ==================================================================
``geomeld:``    GeoMeld release shards: a .tar file, a folder of .tar files or a glob
``synthetic:``  release-format shards written by data_prep.synthetic (same reader)
``mmearth:``    one MMEarth .h5 file (side files beside it)
``raster:``     band folders (one tile or scene each; a folder of such folders or a glob)
``s2safe:``     Sentinel-2 L1C/L2A SAFE products (a .SAFE folder, a folder of them or a glob)
``virginia:``   the Sentinel-2 L1C Virginia scene subset folder
``eolearn:``    the eo-learn Slovenia TestEOPatch folder
``bigearthnet:`` a BigEarthNet v1 folder (GeoTIFF examples and/or ConfigILM .npz mock)
=============== ==================================================================
"""

from __future__ import annotations

from typing import Callable

from data_prep.sources import geomeld, mmearth, raster, sentinel2_safe
from data_prep.sources.base import Source

_FACTORIES: dict[str, Callable[[str], Source]] = {
    "geomeld": lambda loc: geomeld.GeoMeldReleaseSource(loc),
    "synthetic": lambda loc: geomeld.GeoMeldReleaseSource(loc, scheme="synthetic"),
    "mmearth": lambda loc: mmearth.MMEarthSource(loc),
    "raster": lambda loc: raster.RasterStackSource(loc),
    "s2safe": lambda loc: sentinel2_safe.Sentinel2SafeSource(loc),
    "virginia": raster.virginia_source,
    "eolearn": lambda loc: raster.EOLearnSource(loc),
    "bigearthnet": lambda loc: raster.BigEarthNetSource(loc),
}

KNOWN_SCHEMES = tuple(sorted(_FACTORIES))


def make_source(spec: str) -> Source:
  """'<scheme>:<location>' -> a Source. Raises ValueError naming the known schemes."""
  scheme, sep, location = spec.partition(":")
  if not sep or scheme not in _FACTORIES:
    raise ValueError(f"unknown source spec {spec!r}: expected '<scheme>:<path>' with scheme one "
                     f"of {', '.join(KNOWN_SCHEMES)}")
  if not location:
    raise ValueError(f"source spec {spec!r} has no path after '{scheme}:'")
  return _FACTORIES[scheme](location)
