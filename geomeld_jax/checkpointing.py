"""A thin Orbax CheckpointManager wrapper: the train state plus (optionally) the Grain iterator.

Layout under a workdir:
  <workdir>/config.json            the run's config (`save_config`), checked on resume
  <workdir>/dataset.json           the dataset's fingerprint (`check_same_dataset`), ditto
  <workdir>/checkpoints/<step>/    one Orbax step: item 'state' (+ item 'data_iter')

Atomicity comes from Orbax: a step is written into `<step>.orbax-checkpoint-tmp*` and renamed
(local disk) or marked with a commit file (GCS) only once every item is complete, and
`latest_step()` ignores unfinished ones. A process killed mid-save therefore leaves nothing
that `restore_latest` would pick up (tests/test_checkpointing.py kills one with SIGKILL).

Preemption: on a multi-host job `jax.distributed` turns the preemption notice (SIGTERM on a
Cloud TPU VM) into a step every host agrees on, and Orbax's policy saves there. A
single-process run (one GPU host, a CPU) has no such service, so a Checkpointer made with
`catch_sigterm=True` (the train loop's) catches SIGTERM itself: the next step is saved and
the loop stops. A second SIGTERM kills as usual; `close()` restores the previous handler.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

PyTree = Any
# A grain.DatasetIterator (or DataLoaderIterator). grain is imported only when an iterator is
# checkpointed, so the wrapper also works where grain is not installed (the GPU benchmark image).
DataIterator = Any

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILENAME = "config.json"
STATE_ITEM = "state"
DATA_ITER_ITEM = "data_iter"


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
  return epath.Path(workdir) / CHECKPOINT_SUBDIR


# Orbax splits the write of a replicated array over its replicas with a slicing program
# compiled per shape. For the ~800 small replicated leaves of a train state that made the
# first save block for 25 s (smoke state) to 69 s (800 leaves) on 8 CPU devices, against about
# 1 s when arrays under 1 MiB per slice are written by one replica. Large tensors are sharded
# over fsdp anyway (sharding.py); large replicated ones still write in parallel.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def use_replica_parallel_for_large_arrays_only() -> None:
  """Registers orbax's jax.Array handler with REPLICA_PARALLEL_MIN_SLICE_BYTES (process-wide)."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES), override=True)


class Checkpointer:
  """Saves every `save_interval_steps` steps and on preemption; keeps the last `max_to_keep`.

  Call `maybe_save(step, state, data_iter)` every step (it decides), `restore_latest` once at
  start-up, and `wait_until_finished()` (or `close()`) before the process exits so the last
  async save is committed.
  """

  def __init__(self, workdir: str | epath.PathLike, *, save_interval_steps: int, max_to_keep: int,
               async_save: bool = True, catch_sigterm: bool = False):
    if save_interval_steps <= 0:
      raise ValueError(f"save_interval_steps must be positive, got {save_interval_steps}")
    if max_to_keep <= 0:
      raise ValueError(f"max_to_keep must be positive, got {max_to_keep}")
    self.directory = checkpoint_dir(workdir)
    use_replica_parallel_for_large_arrays_only()
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=checkpoint_managers.AnySavePolicy([
            checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=checkpoint_managers.LatestN(max_to_keep),
        enable_async_checkpointing=async_save,
        # Leftovers of a save killed half-way are deleted on start-up instead of piling up.
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, item_names=(STATE_ITEM, DATA_ITER_ITEM),
                                          options=options)
    self._terminated = False
    self._previous_sigterm_handler = None
    if catch_sigterm and jax.process_count() == 1:
      if threading.current_thread() is not threading.main_thread():
        raise ValueError("catch_sigterm needs the main thread (Python delivers signals there)")
      previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      # None: a handler set outside Python; the default action is the closest we can restore.
      self._previous_sigterm_handler = signal.SIG_DFL if previous is None else previous

  def _on_sigterm(self, signum, frame) -> None:
    del frame
    if self._terminated:  # asked twice: stop waiting for the step, die as without us
      signal.signal(signum, self._previous_sigterm_handler)
      signal.raise_signal(signum)
      return
    self._terminated = True
    logging.warning("SIGTERM: the next step is checkpointed, then the run stops")

  def should_save(self, step: int) -> bool:
    """Whether `maybe_save(step, ...)` would write (interval reached or preemption signalled)."""
    return self._terminated or self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True once every host has seen the preemption notice (or this process a SIGTERM): save
    now, then exit."""
    return self._terminated or self._manager.reached_preemption(step)

  def maybe_save(self, step: int, state: PyTree, data_iter: DataIterator | None = None, *,
                 force: bool = False) -> bool:
    """Starts an (async) save when the policy says so or `force`; returns whether it did.

    `data_iter` must be the iterator *after* the batch of `step` was drawn, so that a restore
    continues with the next unseen batch.
    """
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if data_iter is not None:
      import grain  # pylint: disable=g-import-not-at-top
      items[DATA_ITER_ITEM] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self._manager.save(step, args=ocp.args.Composite(**items),
                               force=force or self._terminated)
    if saved:
      logging.info("checkpoint save of step %d started in %s", step, self.directory)
    return saved

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self._manager.all_steps()

  def restore_latest(self, abstract_state: PyTree,
                     data_iter: DataIterator | None = None) -> tuple[PyTree, int] | None:
    """Restores the newest complete checkpoint into `abstract_state`'s shardings, or None.

    Args:
      abstract_state: the state's structure as `jax.ShapeDtypeStruct`s that carry the target
        `sharding` (see sharding.with_shardings); arrays load straight into that layout.
      data_iter: restored in place (its position is set) when given.

    Returns:
      (state, step), or None when the directory holds no complete checkpoint.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    unsharded = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
                 if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None]
    if unsharded:
      raise ValueError(f"abstract_state leaves need a target sharding, these have none: {unsharded[:5]}")
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      if not (self.directory / str(step) / DATA_ITER_ITEM).exists():
        raise ValueError(f"checkpoint step {step} in {self.directory} holds no data iterator state, "
                         "so the input position cannot be restored; resume without an iterator "
                         "or from a run that saved one")
      import grain  # pylint: disable=g-import-not-at-top
      items[DATA_ITER_ITEM] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored checkpoint step %d from %s", step, self.directory)
    return restored[STATE_ITEM], step

  def wait_until_finished(self) -> None:
    """Blocks until the last async save is committed (call before exiting)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save, then gives SIGTERM back to whoever handled it before."""
    self._manager.close()
    if self._previous_sigterm_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
      self._previous_sigterm_handler = None


# ---------------------------------------------------------------------------------------------
# The saved config and the resume compatibility check
# ---------------------------------------------------------------------------------------------


def _config_dict(config_json: str | Mapping[str, Any]) -> dict[str, Any]:
  if hasattr(config_json, "to_json"):  # an ml_collections ConfigDict
    config_json = config_json.to_json()
  if isinstance(config_json, str):
    parsed = json.loads(config_json)
  else:
    parsed = json.loads(json.dumps(config_json))  # normalises tuples to lists like a reload would
  if not isinstance(parsed, dict):
    raise ValueError(f"config JSON must be an object, got {type(parsed).__name__}")
  return parsed


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def save_config(workdir: str | epath.PathLike, config_json: str | Mapping[str, Any]) -> epath.Path:
  """Writes the run's config as `<workdir>/config.json` (host 0 only; atomic rename)."""
  path = epath.Path(workdir) / CONFIG_FILENAME
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (CONFIG_FILENAME + ".tmp")
    tmp.write_text(json.dumps(_config_dict(config_json), indent=2, sort_keys=True))
    tmp.replace(path)  # atomic, and overwrites the config of an earlier (resumed) start
  return path


SHARED_WORKDIR_TOKEN = ".hosts_share_this_workdir"


def check_workdir_is_shared(workdir: str | epath.PathLike) -> None:
  """Refuses to start a multi-host run whose hosts do not see one and the same workdir.

  Every host writes its part of each checkpoint into the workdir, so a path on each host's
  own disk gives checkpoints that no host can restore whole. Host 0 writes a fresh token; every
  host must read it back. Collective: call it on every host.

  Raises:
    ValueError: on every host, naming the hosts that cannot see host 0's token.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  token = epath.Path(workdir) / SHARED_WORKDIR_TOKEN
  nonce = int(multihost_utils.broadcast_one_to_all(
      np.int32(np.random.default_rng().integers(1, 2**31 - 1))))
  if jax.process_index() == 0:
    token.write_text(str(nonce))
  multihost_utils.sync_global_devices("geomeld: workdir token written")
  sees_it = token.exists() and token.read_text().strip() == str(nonce)
  seen = np.asarray(multihost_utils.process_allgather(np.int32(sees_it)))
  blind = [i for i, ok in enumerate(seen.reshape(-1)) if not ok]
  if blind:
    raise ValueError(
        f"hosts {blind} do not see the workdir {workdir} that host 0 writes to: each host would "
        "keep only its own part of every checkpoint. Use a gs:// workdir or a mount all hosts "
        "share.")


def _has_checkpoint(workdir: str | epath.PathLike) -> bool:
  directory = checkpoint_dir(workdir)
  return directory.exists() and any(entry.name.isdigit() for entry in directory.iterdir())


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], old_label: str, new_label: str,
                 matters=lambda key: True, old_defaults: Mapping[str, Any] | None = None
                 ) -> list[str]:
  """'key: <old_label> X, <new_label> Y' for each differing (flattened) key that matters.

  `old_defaults` (flattened keys) stands in for keys absent from `old`.
  """
  old, new = _flatten(old), _flatten(new)
  old_defaults = old_defaults or {}
  missing = object()
  shown = lambda v: "<absent>" if v is missing else repr(v)  # noqa: E731
  diffs = []
  for key in sorted(k for k in set(old) | set(new) if matters(k)):
    before, after = old.get(key, old_defaults.get(key, missing)), new.get(key, missing)
    if before != after:
      diffs.append(f"{key}: {old_label} {shown(before)}, {new_label} {shown(after)}")
  return diffs


DATASET_FILENAME = "dataset.json"


def check_same_dataset(workdir: str | epath.PathLike, fingerprint: Mapping[str, Any]) -> None:
  """Refuses to resume on another dataset, then records `fingerprint` (host 0).

  The saved iterator position is an index into the dataset's shuffled records: on another
  build it would silently continue from somewhere else. Moving the dataset is fine (the
  fingerprint is content, see `input_pipeline.fingerprint`).

  Raises:
    ValueError: naming each differing field, when the workdir holds checkpoints of a run
      whose dataset had another fingerprint, or checkpoints without a recorded fingerprint
      (written before it was recorded, when the saved data position counted batches).
  """
  path = epath.Path(workdir) / DATASET_FILENAME
  if _has_checkpoint(workdir):
    if not path.exists():
      raise ValueError(f"{workdir} holds checkpoints but no {DATASET_FILENAME}: they predate the "
                       "dataset fingerprint and the record-level data position; use a fresh "
                       "workdir")
    diffs = _differences(json.loads(path.read_text()), json.loads(json.dumps(fingerprint)),
                         "checkpoint's dataset has", "this one has")
    if diffs:
      raise ValueError(f"the checkpoint in {workdir} was trained on another dataset, so its saved "
                       "data position does not apply; use a fresh workdir. Differences:\n  "
                       + "\n  ".join(diffs))
  if jax.process_index() == 0:
    tmp = path.parent / (DATASET_FILENAME + ".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    tmp.replace(path)


def check_compatible(workdir: str | epath.PathLike, config_json: str | Mapping[str, Any],
                     keys_that_matter: Sequence[str], keys_exempt: Sequence[str] = (),
                     defaults_for_absent: Mapping[str, Any] | None = None) -> None:
  """Refuses to resume from a workdir whose checkpoint came from an incompatible config.

  Args:
    workdir: the run directory.
    config_json: the new run's config.
    keys_that_matter: dotted keys; a key covers everything under it ('model' covers
      'model.width'). Only these are compared; schedule lengths etc. may change on resume.
    keys_exempt: dotted keys never compared, even under a key that matters (settings that
      change how a result is computed, not the result).
    defaults_for_absent: dotted key -> the value a saved config that lacks the key is taken to
      hold. A config written before a field existed ran with the field's default, provided new
      fields default to the old behaviour (the rule for GeoMeldFMConfig).

  Raises:
    ValueError: naming each differing key with its saved and new value, or when the workdir
      holds checkpoints but no saved config to compare against.
  """
  if not _has_checkpoint(workdir):
    return
  path = epath.Path(workdir) / CONFIG_FILENAME
  if not path.exists():
    raise ValueError(f"{workdir} holds checkpoints but no {CONFIG_FILENAME}, so their config cannot be "
                     "checked; use a fresh workdir")
  def under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in prefixes)

  def matters(key: str) -> bool:
    return under(key, keys_that_matter) and not under(key, keys_exempt)

  diffs = _differences(_config_dict(path.read_text()), _config_dict(config_json),
                       "checkpoint has", "config has", matters,
                       _flatten(_config_dict(defaults_for_absent or {})))
  if diffs:
    raise ValueError(f"the checkpoint in {workdir} was written by an incompatible config; differing keys:\n  "
                     + "\n  ".join(diffs))
