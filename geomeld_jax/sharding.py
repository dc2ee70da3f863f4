"""Device mesh, the sharding rules, batch placement and process-level JAX setup.

Every sharding decision of the project lives here (big_vision's `sharding.py` idea):
- parameters: replicated when small, FSDP-sharded over the 'fsdp' axis when large
  (`param_sharding`);
- the whole train state {params, opt_state, ema_params, step}: optimizer moments and
  EMA parameters take the sharding of the parameter they mirror (`state_sharding`);
- batches: split over ('data', 'fsdp') on their leading dimension (`batch_sharding`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# The mesh axes every geomeld mesh has: the batch is split over both, parameters over 'fsdp'.
DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Set by launch/tpu.sh on every worker: only then does the process join a multi-host job.
DISTRIBUTED_ENV_VAR = "GEOMELD_DISTRIBUTED"

_TRANSFER_GUARD_LEVELS = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")

PyTree = Any


# ---------------------------------------------------------------------------------------------
# Process-level setup
# ---------------------------------------------------------------------------------------------


def maybe_initialize_distributed() -> bool:
  """Joins the multi-host JAX job when the launcher asked for it; returns whether it did.

  `jax.distributed.initialize()` fails on a plain single-host machine, so it is only called
  when `GEOMELD_DISTRIBUTED=1` (set by launch/tpu.sh), the big_vision `BV_JAX_INIT` pattern.
  Must run before anything touches a JAX backend.
  """
  flag = os.environ.get(DISTRIBUTED_ENV_VAR, "").strip()
  if flag not in ("", "0", "1"):
    raise ValueError(f"{DISTRIBUTED_ENV_VAR} must be '1', '0' or unset, got {flag!r}")
  if flag == "1":
    jax.distributed.initialize()
  logging.info(
      "JAX process %d of %d (distributed=%s): %d local / %d global devices, kinds %s",
      jax.process_index(), jax.process_count(), flag == "1", jax.local_device_count(),
      jax.device_count(), sorted({d.device_kind for d in jax.devices()}))
  return flag == "1"


def set_global_flags(transfer_guard: str) -> None:
  """Sets the process-wide JAX flags every training run uses.

  Args:
    transfer_guard: 'disallow' in training, so that an implicit host<->device copy (a
      silent slowdown) fails loudly; explicit `jax.device_put`/`jax.device_get` still work.
  """
  if transfer_guard not in _TRANSFER_GUARD_LEVELS:
    raise ValueError(f"transfer_guard must be one of {_TRANSFER_GUARD_LEVELS}, got {transfer_guard!r}")
  # Partitionable threefry lets each device draw its own slice of a sharded random array
  # without gathering the key stream: no cross-device traffic for RNG.
  jax.config.update("jax_threefry_partitionable", True)
  jax.config.update("jax_transfer_guard", transfer_guard)


# ---------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------


def make_mesh(mesh_spec: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh from `[(axis_name, size), ...]`; one size may be -1 (all remaining devices).

  The spec must name at least 'data' and 'fsdp'. Axes are Auto (GSPMD/Shardy propagation):
  jax 0.10's `jax.make_mesh` defaults to Explicit axes, which would change the semantics of
  every jitted function that does not annotate its shardings.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = [str(name) for name, _ in mesh_spec]
  sizes = [int(size) for _, size in mesh_spec]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axis names must be unique, got {names}")
  missing = [axis for axis in BATCH_AXES if axis not in names]
  if missing:
    raise ValueError(f"mesh spec {list(mesh_spec)} lacks the required axes {missing}")
  if any(size == 0 or size < -1 for size in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(names, sizes))}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(names, sizes))}")
  known = int(np.prod([size for size in sizes if size != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not split into mesh {dict(zip(names, sizes))}: "
                       f"{len(devices)} is not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  elif known != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {known} devices, there are {len(devices)}")
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------
# Parameter / train-state sharding
# ---------------------------------------------------------------------------------------------


def _leaf_shape_and_nbytes(leaf: Any) -> tuple[tuple[int, ...], int] | None:
  """Shape and byte size of an array-like leaf (concrete or ShapeDtypeStruct); None otherwise."""
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    return None
  shape = tuple(int(d) for d in leaf.shape)
  return shape, int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def fsdp_spec(shape: Sequence[int], nbytes: int, fsdp_size: int, *, min_size_to_shard_mb: float) -> P:
  """big_vision's FSDP rule for one tensor.

  Tensors of at most `min_size_to_shard_mb` MiB stay replicated (sharding them costs more
  collective latency than the memory it saves); larger ones are split over 'fsdp' on their
  largest dimension divisible by the fsdp axis size (ties go to the later dimension, which for
  kernels is the output-channel one). A large tensor with no divisible dimension stays replicated.
  """
  if fsdp_size == 1 or not shape or nbytes <= min_size_to_shard_mb * 2**20:
    return P()
  # Stable sort on -size keeps the original order among equals; reversing first makes the
  # later dimension win ties.
  order = sorted(reversed(range(len(shape))), key=lambda i: -shape[i])
  for dim in order:
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP_AXIS
      return P(*spec)
  logging.warning("tensor of shape %s (%.1f MiB) has no dimension divisible by fsdp=%d: replicated",
                  tuple(shape), nbytes / 2**20, fsdp_size)
  return P()


def param_sharding(params: PyTree, mesh: Mesh, *, min_size_to_shard_mb: float = 4.0) -> PyTree:
  """NamedSharding for every leaf of a parameter pytree (abstract or concrete), by `fsdp_spec`."""
  fsdp_size = mesh.shape[FSDP_AXIS]

  def leaf_sharding(leaf: Any) -> NamedSharding:
    info = _leaf_shape_and_nbytes(leaf)
    if info is None:
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(*info, fsdp_size, min_size_to_shard_mb=min_size_to_shard_mb))

  return jax.tree.map(leaf_sharding, params)


def _path_key(path: Sequence[Any]) -> tuple[str, ...]:
  return tuple(str(entry) for entry in path)


def state_sharding(state: PyTree, mesh: Mesh, *, params_key: str = "params",
                   min_size_to_shard_mb: float = 4.0) -> PyTree:
  """NamedSharding for a whole train state, e.g. {params, opt_state, ema_params, step}.

  `state[params_key]` gets `param_sharding`. Every other leaf whose key path ends with the key
  path of a parameter and has that parameter's shape (Adam moments inside the optax state, the
  EMA copy) takes that parameter's sharding, so the optimizer state is sharded exactly like the
  parameters (ZeRO-3-like) even when a moment is stored in a smaller dtype. Remaining leaves
  (step counters, scalars) follow the same size rule, which replicates them.
  """
  if not isinstance(state, Mapping) or params_key not in state:
    raise ValueError(f"state must be a mapping with a {params_key!r} entry, got "
                     f"{type(state).__name__} with keys {list(state) if isinstance(state, Mapping) else None}")
  param_shardings = param_sharding(state[params_key], mesh, min_size_to_shard_mb=min_size_to_shard_mb)
  by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
  params_with_path = jax.tree_util.tree_flatten_with_path(state[params_key])[0]
  shardings_flat = jax.tree.leaves(param_shardings)
  for (path, leaf), sharding in zip(params_with_path, shardings_flat, strict=True):
    info = _leaf_shape_and_nbytes(leaf)
    if info is not None:
      by_path[_path_key(path)] = (info[0], sharding)
  fsdp_size = mesh.shape[FSDP_AXIS]

  def leaf_sharding(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
    info = _leaf_shape_and_nbytes(leaf)
    if info is None:
      return replicated(mesh)
    key = _path_key(path)
    for start in range(len(key)):
      match = by_path.get(key[start:])
      if match is not None and match[0] == info[0]:
        return match[1]
    return NamedSharding(mesh, fsdp_spec(*info, fsdp_size, min_size_to_shard_mb=min_size_to_shard_mb))

  rest = {key: value for key, value in state.items() if key != params_key}
  rest_shardings = jax.tree_util.tree_map_with_path(leaf_sharding, rest)
  out = {key: (param_shardings if key == params_key else rest_shardings[key]) for key in state}
  return type(state)(out) if not isinstance(state, dict) else out


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs carrying `shardings`: the restore / `jit(out_shardings=)` target."""
  return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      abstract, shardings)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) dimension split over every data-parallel axis: ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def per_process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """The batch each host loads; raises naming the numbers when the split is not exact."""
  shards = num_batch_shards(mesh)
  processes = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % shards:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                     f"{shards} batch shards (mesh data={mesh.shape[DATA_AXIS]} x fsdp={mesh.shape[FSDP_AXIS]})")
  if global_batch_size % processes:
    raise ValueError(f"global batch size {global_batch_size} must be divisible by the {processes} processes")
  return global_batch_size // processes


def put_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's slice of the batch into global arrays sharded by `batch_sharding`."""
  sharding = batch_sharding(mesh)
  shards = num_batch_shards(mesh)
  out = {}
  for name, value in local_batch.items():
    value = np.asarray(value)
    global_rows = value.shape[0] * jax.process_count() if value.ndim else 0
    if value.ndim == 0 or global_rows % shards:
      raise ValueError(f"batch entry {name!r} of local shape {value.shape}: the global batch "
                       f"({global_rows} rows over {jax.process_count()} processes) must split "
                       f"evenly into {shards} batch shards")
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out
