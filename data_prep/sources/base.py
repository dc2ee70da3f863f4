"""What every source yields: raw samples in release layout, or rejections.

A source turns its inputs into `RawSample`s (arrays still as the source stored them, in
physical units, channels-first like the GeoMeld release) and reports every input it could
not turn into a sample as a `Rejection`; `data_prep.validate` then checks a RawSample
against the modality registry and encodes it as a record. Nothing is dropped silently:
whatever a source reads becomes exactly one RawSample or one Rejection.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Protocol, Union

import numpy as np


@dataclasses.dataclass
class RawSample:
  """One tile as a source read it.

  Attributes:
    tile_id: unique id of the tile across the whole build.
    source: provenance, e.g. ``geomeld:/data/shard-0001.tar:tile_42.h5``.
    arrays: release key -> array (C, H, W) in physical units (float32) or class codes
      (uint8). A modality the tile lacks is simply absent. ``band_names`` may name the
      channels of an array whose bands differ from the registry's full list (e.g. the NAIP
      subset's 9-band Sentinel-2); otherwise the registry order is assumed.
    metadata: parsed release metadata (tile_id, lat, long, acquisition_date, terrain_class,
      file_type_naip, osm_tags, water_analysis, ...), plus anything the source adds.
    captions: zero or more captions that came with the source.
  """

  tile_id: str
  source: str
  arrays: dict[str, np.ndarray]
  metadata: dict[str, Any]
  captions: list[str] = dataclasses.field(default_factory=list)
  band_names: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Rejection:
  """A dead letter: an input that did not become a record, and why."""

  source: str
  tile_id: str  # '' when the input was unreadable before an id was known
  reason: str  # a short machine-readable reason, e.g. 'corrupt_h5', 'lat_out_of_range'
  detail: str = ""

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


SourceItem = Union[RawSample, Rejection]


class Source(Protocol):
  """A source is split into units (files, shards, scene windows) that workers read alone."""

  name: str

  def units(self) -> list[str]:
    """The independent units of work, in a deterministic order. Raises on a missing path or
    an empty glob, before any work starts."""

  def read(self, unit: str) -> Iterator[SourceItem]:
    """Every sample of one unit, or a Rejection for what could not be read."""

  def fingerprint(self, unit: str) -> str:
    """A cheap content fingerprint of a unit (size + mtime + name hash) for the manifest."""

  def input_bytes(self, unit: str) -> int:
    """About the bytes the unit's records take, cheaply (file sizes or headers, no pixels
    read): the build sizes its shards by it (`pipeline.auto_num_shards`)."""
