r"""Entry point: `python -m geomeld_jax.main --config=configs/pretrain.py:smoke --workdir=DIR`.

Overrides: `--config.total_steps=1000 --config.input.data_dir=/data/geomeld ...`; an unknown
key or a value of the wrong type is rejected by name (the config is locked).
Multi-host: launch/tpu.sh sets GEOMELD_DISTRIBUTED=1 so that jax.distributed joins the hosts.
"""

import logging as py_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from geomeld_jax import sharding
from geomeld_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (with :arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, export.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(py_logging.Filter):
  """Orbax and Beam log every save/bundle at INFO; keep the console to our progress lines."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "apache_beam"))
    return record.levelno >= py_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sharding.maybe_initialize_distributed()  # before anything touches a JAX backend
  config = _CONFIG.value
  # The guard itself is entered around each step in train.py; this sets threefry.
  sharding.set_global_flags("allow")
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
