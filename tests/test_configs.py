"""configs/pretrain.py: every field overridable from the command line, clear errors, lr rule."""

import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import pretrain
from tests.conftest import REPO_ROOT

CONFIG_FILE = str(REPO_ROOT / "configs" / "pretrain.py")


def _parse(arg: str, *overrides: str):
  """The config exactly as `main --config=configs/pretrain.py:<arg> <overrides>` builds it."""
  argv = ["main", f"--config={CONFIG_FILE}:{arg}", *overrides]
  flag_values = flags.FlagValues()
  # Override flags are registered from argv when the flag is defined (as main's are from sys.argv).
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def _leaves(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


@pytest.mark.parametrize("arg", ["smoke", "atto,mp_mae", "tiny,full", "base,s2_mae"])
def test_every_field_can_be_overridden_with_its_own_value(arg):
  config = pretrain.get_config(arg)
  overrides = []
  for key, value in _leaves(config):
    # None has no type to parse an override into: absl refuses it ("not supported").
    assert value is not None, f"{key} is None in {arg}: it could not be overridden"
    text = repr(value) if isinstance(value, (tuple, list)) else str(value)
    overrides.append(f"--config.{key}={text}")
  parsed = _parse(arg, *overrides)
  assert dict(_leaves(parsed)) == dict(_leaves(config))


def test_lr_follows_the_global_batch_unless_set():
  base = _parse("atto")
  assert base.optim.lr == pytest.approx(base.optim.base_lr * base.input.global_batch_size / 256)
  small = _parse("atto", "--config.input.global_batch_size=256")
  assert small.optim.lr == pytest.approx(1.5e-4)
  assert _parse("atto", "--config.optim.base_lr=3e-4",
                "--config.input.global_batch_size=512").optim.lr == pytest.approx(6e-4)
  assert _parse("atto", "--config.optim.lr=0.01",
                "--config.input.global_batch_size=512").optim.lr == pytest.approx(0.01)
  assert _parse("smoke").optim.lr == pytest.approx(2.5e-4)


def test_mu_dtype_override():
  assert _parse("atto", "--config.optim.mu_dtype=bfloat16").optim.mu_dtype == "bfloat16"


@pytest.mark.parametrize("args, message", [
    (["--config.no_such_key=1"], "no_such_key"),
    (["--config.total_steps=many"], "total_steps"),
])
def test_config_override_errors_name_the_key(tmp_path, args, message):
  cmd = [sys.executable, "-m", "geomeld_jax.main", "--config=configs/pretrain.py:smoke",
         f"--workdir={tmp_path}", *args]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr


def test_unknown_variant_lists_the_choices():
  with pytest.raises(ValueError, match="objective: s2_mae"):
    pretrain.get_config("smoke,bogus")
