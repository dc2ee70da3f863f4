"""The build's caption stage: the pluggable step between validation and splitting.

A `CaptionStage` gets a validated example (a dict matching `geomeld_jax.records`) and
returns it, possibly with new ``captions`` and a ``caption_provenance`` JSON, or a
`Rejection` (e.g. a caption that failed verification). The build picks one with
``--captioner=<name>``; the captioning package registers its stages with
`register_caption_stage`. Stages are constructed once per Beam worker (in ``DoFn.setup``),
so a stage may hold a model or a client; it must be deterministic for a given example so
that rebuilds are byte-identical.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

from data_prep.sources.base import Rejection

Example = dict[str, Any]


class CaptionStage(abc.ABC):
  """Turns a validated example into a captioned example, or rejects it."""

  name: str = ""

  @abc.abstractmethod
  def process(self, example: Example) -> Example | Rejection:
    """Returns the example (same dict or a new one) or a Rejection naming why."""


class PassthroughCaptionStage(CaptionStage):
  """Keeps the captions that came with the source; provenance stays '' (= from the source)."""

  name = "passthrough"

  def process(self, example: Example) -> Example:
    return example


_REGISTRY: dict[str, Callable[[], CaptionStage]] = {
    PassthroughCaptionStage.name: PassthroughCaptionStage,
}


def register_caption_stage(name: str, factory: Callable[[], CaptionStage]) -> None:
  """Makes `factory` selectable as ``--captioner=name``."""
  if not name or any(c.isspace() for c in name):
    raise ValueError(f"caption stage name must be a non-empty word, got {name!r}")
  _REGISTRY[name] = factory


def available_caption_stages() -> list[str]:
  _import_plugins()
  return sorted(_REGISTRY)


def make_caption_stage(name: str) -> CaptionStage:
  """The stage registered as `name`; a clear error listing the known names otherwise."""
  _import_plugins()
  try:
    factory = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown captioner {name!r}; known: {sorted(_REGISTRY)}") from None
  return factory()


def _import_plugins() -> None:
  """Lets `data_prep.captioning` register its stages when that package provides them."""
  try:
    import data_prep.captioning  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ModuleNotFoundError as e:
    if e.name != "data_prep.captioning":  # a broken plugin must fail loudly
      raise
