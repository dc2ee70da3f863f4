r"""Ahead-of-time compile of the real train step for a TPU slice, on any machine.

maxtext's `train_compile.py` idea: libtpu carries the TPU compiler, and
`jax.experimental.topologies` describes a slice that is not there, so a laptop or CI can
compile the exact step a pod would run and learn, before asking for the pod, whether it
compiles under the sharding rules, whether it fits in HBM and how many FLOPs it does:

  pip install -c constraints.txt -e '.[tpu]'     # libtpu, matched to jax
  python -m geomeld_jax.aot --config=configs/pretrain.py:base,full --topology=v5e:4x4 \
      --config.mesh="(('data',-1),('fsdp',4))" --config.input.global_batch_size=1024

Prints one JSON line: per-chip memory (the sharded train state, arguments, temporaries, the
total against the chip's HBM and whether it fits) and FLOPs per step (XLA's count of the
compiled step). Exits 1 when the step does not fit, so a launch script can gate on it.
Timing needs the chips: the TPU cost model's `optimal_seconds` is not reported because it
comes out negative for this step (libtpu 0.0.42), i.e. it is not a usable estimate.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from geomeld_jax import records
from geomeld_jax import sharding
from geomeld_jax import train_step as ts

# HBM per chip (bytes), keyed by `device_kind`. Public TPU system specs.
HBM_BYTES = {"TPU v4": 32 * 2**30, "TPU v5 lite": 16 * 2**30, "TPU v5": 95 * 2**30,
             "TPU v6 lite": 32 * 2**30}


def topology_devices(topology: str) -> list[Any]:
  """The devices of a TPU slice described by name ('v5e:2x2', 'v4:2x2x2', 'v6e:4x4', ...)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(
        "AOT compilation for TPU needs libtpu (the TPU compiler), matched to jax: "
        "pip install -c constraints.txt -e '.[tpu]'")
  # libtpu asks a TPU VM's metadata server for these; off a TPU VM placeholders will do
  # (the topology below, not these, decides what is compiled for).
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Compiling touches no chip, so a second compiling process (another test worker, a TPU VM
  # whose chips are training) must not be locked out by libtpu's one-process lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # libtpu's message alone does not say what a valid name looks like
    raise ValueError(f"unknown TPU topology {topology!r} (expected e.g. 'v5e:2x2', "
                     f"'v4:2x2x1', 'v5p:2x2x1', 'v6e:4x4'): {e}") from e


def compile_train_step(config, devices) -> dict[str, Any]:
  """Compiles `config`'s train step for `devices`; returns the memory/cost report."""
  sharding.set_global_flags("allow")
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.per_process_batch_size(config.input.global_batch_size, mesh)  # split check
  setup = ts.setup(config, mesh, records.Normalizer(ts.synthetic_statistics()))
  compiled = setup.train_step.lower(setup.abstract_state,
                                    ts.abstract_batch(config, mesh)).compile()

  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  def nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize

  leaves = jax.tree.leaves(setup.abstract_state)
  state_bytes = sum(nbytes(x.shape, x.dtype) for x in leaves)
  state_bytes_per_chip = sum(nbytes(x.sharding.shard_shape(x.shape), x.dtype) for x in leaves)
  # Donated state aliases its outputs, so live bytes = arguments + temporaries + the
  # outputs that do not reuse an argument's buffer.
  total = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
           - mem.alias_size_in_bytes)
  kind = devices[0].device_kind
  hbm = HBM_BYTES.get(kind)
  return {
      "device_kind": kind, "num_chips": len(devices),
      "num_hosts": len({d.process_index for d in devices}),
      "mesh": {name: int(size) for name, size in mesh.shape.items()},
      "config": config.arg, "global_batch_size": int(config.input.global_batch_size),
      "crop_size": int(config.input.crop_size),
      "state_bytes": state_bytes, "state_bytes_per_chip": state_bytes_per_chip,
      "argument_bytes_per_chip": mem.argument_size_in_bytes,
      "temp_bytes_per_chip": mem.temp_size_in_bytes,
      "total_bytes_per_chip": total,
      "hbm_bytes_per_chip": hbm,
      "fits": None if hbm is None else total <= hbm,
      "flops_per_step": float(cost.get("flops", 0.0)) * len(devices),
  }


def run(config, topology: str) -> int:
  """Compiles, prints the JSON report; returns the exit status (1: does not fit in HBM)."""
  report = compile_train_step(config, topology_devices(topology))
  report["topology"] = topology
  print(json.dumps(report), flush=True)
  if report["fits"] is False:
    print(f"does not fit: {report['total_bytes_per_chip'] / 2**30:.2f} GiB per chip > "
          f"{report['hbm_bytes_per_chip'] / 2**30:.0f} GiB HBM", file=sys.stderr)
    return 1
  return 0


def main(argv):
  del argv
  sys.exit(run(flags.FLAGS.config, flags.FLAGS.topology))


if __name__ == "__main__":
  # Only the TPU compiler runs; no TPU runtime is started (the machine may have a TPU in use).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # Defined here, not at import, so tests and other tools can import this module.
  config_flags.DEFINE_config_file("config", None, "Training config, as for main.py.")
  flags.DEFINE_string("topology", "v5e:2x2", "TPU slice, e.g. v5e:4x4, v4:2x2x2, v6e:8x8.")
  flags.mark_flag_as_required("config")
  app.run(main)
