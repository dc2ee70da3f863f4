"""Test setup shared by every test: 8 forced CPU devices, absl flags, the real-data folder."""

import os
import pathlib

# Must run before jax initialises its backends: sharding tests use a 2x4 CPU mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain workers read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real remote-sensing samples beside the checkout; skips (with the reason) without them."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the checkout in CI)")
  return SHARED_DATA
