"""Training metrics: a console progress line and TensorBoard events on host 0, and run_info.json."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import pathlib
import platform
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

TENSORBOARD_SUBDIR = "tensorboard"
RUN_INFO_FILENAME = "run_info.json"
# Set by the launchers: the code shipped to TPU workers is a `git archive`, without .git.
GIT_SHA_ENV_VAR = "GEOMELD_GIT_SHA"


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _format_value(value: float) -> str:
  return f"{value:.4g}" if math.isfinite(value) and value != 0 else str(value)


class MetricWriter:
  """Writes scalars to TensorBoard and logs a progress line; a no-op off host 0.

  Throughput and ETA come from the wall time between consecutive `write_scalars` calls, so
  call it at the log interval after fetching the metrics (`jax.device_get`), which also makes
  the timing include the device work of those steps.
  """

  def __init__(self, workdir: str | os.PathLike, total_steps: int, is_host0: bool, *,
               global_batch_size: int | None = None, console_filter: str = "",
               clock: Callable[[], float] = time.monotonic):
    if total_steps <= 0:
      raise ValueError(f"total_steps must be positive, got {total_steps}")
    self.total_steps = total_steps
    self.is_host0 = is_host0
    self.global_batch_size = global_batch_size
    self._clock = clock
    # Every scalar goes to TensorBoard; the console line shows those matching this regex.
    self._console = re.compile(console_filter) if console_filter else None
    self._last: tuple[int, float] | None = None
    self._writer = None
    if is_host0:
      # Imported lazily: only host 0 writes events.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      logdir = str(epath.Path(workdir) / TENSORBOARD_SUBDIR)
      self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
    """Logs `scalars` (numbers or 0-d arrays) at `step`; returns them as floats plus throughput."""
    if not self.is_host0:
      return {}
    values = {}
    for name, value in scalars.items():
      array = np.asarray(value)
      if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
      values[name] = float(array.reshape(()))
    now = self._clock()
    eta = None
    if self._last is not None and step > self._last[0] and now > self._last[1]:
      steps_per_sec = (step - self._last[0]) / (now - self._last[1])
      values["steps_per_sec"] = steps_per_sec
      if self.global_batch_size:
        values["samples_per_sec"] = steps_per_sec * self.global_batch_size
      eta = max(self.total_steps - step, 0) / steps_per_sec
    self._last = (step, now)

    for name, value in values.items():
      self._writer.add_scalar(name, value, global_step=step)
    parts = [f"step {step}/{self.total_steps}"]
    parts += [f"{name} {_format_value(value)}" for name, value in values.items()
              if name not in ("steps_per_sec", "samples_per_sec")
              and (self._console is None or self._console.search(name))]
    if "samples_per_sec" in values:
      parts.append(f"{values['samples_per_sec']:.1f} samples/s")
    elif "steps_per_sec" in values:
      parts.append(f"{values['steps_per_sec']:.2f} steps/s")
    if eta is not None:
      parts.append(f"ETA {_format_duration(eta)}")
    logging.info(" | ".join(parts))
    return values

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def git_sha(repo_dir: str | os.PathLike | None = None) -> str | None:
  """HEAD's SHA (suffixed '-dirty' with uncommitted changes), else the launcher's env var."""
  repo_dir = pathlib.Path(repo_dir) if repo_dir else pathlib.Path(__file__).resolve().parents[1]
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                         check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                           capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    return sha + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return os.environ.get(GIT_SHA_ENV_VAR) or None


def run_info(config_json: str | Mapping[str, Any]) -> dict[str, Any]:
  """What produced this run: config, code revision, library versions and the devices."""
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if hasattr(config_json, "to_json"):  # an ml_collections ConfigDict
    config_json = config_json.to_json()
  config = json.loads(config_json) if isinstance(config_json, str) else json.loads(json.dumps(config_json))
  return dict(
      config=config,
      git_sha=git_sha(),
      versions=dict(python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
                    optax=optax.__version__, orbax_checkpoint=ocp.__version__, numpy=np.__version__),
      device_kinds=sorted({d.device_kind for d in jax.devices()}),
      platform=jax.devices()[0].platform,
      device_count=jax.device_count(),
      process_count=jax.process_count(),
      start_time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  )


def write_run_info(workdir: str | os.PathLike, config_json: str | Mapping[str, Any]) -> epath.Path:
  """Writes `<workdir>/run_info.json` from host 0; returns its path."""
  path = epath.Path(workdir) / RUN_INFO_FILENAME
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run_info(config_json), indent=2, sort_keys=True))
  return path
