"""Test setup shared by every test: 8 forced CPU devices, absl flags, the real-data folder."""

import os
import pathlib
import tempfile

# Must run before jax initialises its backends: sharding tests use a 2x4 CPU mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain workers read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()

# Train-loop tests rebuild the same step several times (resume, NaN stop): a persistent
# compilation cache turns every rebuild after the first into a cache hit.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="geomeld_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real remote-sensing samples beside the checkout; skips (with the reason) without them."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the checkout in CI)")
  return SHARED_DATA


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory, worker_id) -> pathlib.Path:
  """The embedded demo dataset (synthetic shards through the full Beam build), built once per
  test run: pytest-xdist workers share it; the first builds it under a lock, the others find
  it complete (`build_demo` reuses a complete build)."""
  import filelock  # pylint: disable=g-import-not-at-top

  from data_prep import demo  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    root = root.parent  # the run's base temp folder, above each worker's own
  out = root / "demo"
  with filelock.FileLock(str(root / "demo.lock")):
    demo.build_demo(str(out), num_samples=512)
  return out


# `--dist loadfile` hands out whole files in collection order. Collected alphabetically, the
# train-loop files came last, and one worker ran them alone for minutes while the other idled:
# longest first lets both workers finish together. test_bench (no demo dataset) goes second so
# the other worker is busy while the first builds the shared demo dataset.
LONGEST_FILES_FIRST = ("tests/test_train.py", "tests/test_bench.py", "tests/test_train_step.py",
                       "tests/models/test_geomeld.py", "tests/evaluation/test_finetune.py",
                       "tests/test_aot.py", "tests/models/test_convnextv2.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    path = item.nodeid.split("::", 1)[0]
    return LONGEST_FILES_FIRST.index(path) if path in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

  items.sort(key=rank)  # stable: the order inside a file and among the rest is kept
