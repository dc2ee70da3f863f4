"""Shared, session-scoped evaluation fixtures: a tiny atto encoder and GEO-Bench folders."""

import pathlib

import pytest
from flax import nnx

from geomeld_jax.models import convnextv2


@pytest.fixture(scope="session")
def tiny_encoder():
  """Atto with the 'patch' stem at stride 8 (32-px inputs -> 4x4 grid)."""
  return convnextv2.ConvNeXtV2("atto", 12, stem="patch", patch_size=8, rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def ben_geobench(shared_data, tmp_path_factory) -> pathlib.Path:
  """The real BigEarthNet patches converted into a GEO-Bench root (36 samples)."""
  from geomeld_jax.evaluation import bigearthnet_to_geobench

  root = tmp_path_factory.mktemp("geobench_ben")
  bigearthnet_to_geobench.convert(shared_data / "bigearthnet", root)
  return root
