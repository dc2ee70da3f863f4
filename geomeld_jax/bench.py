r"""Train-step benchmark: one JSON line per case, then a short table.

  python -m geomeld_jax.bench --config=configs/pretrain.py:atto,full \
      --objectives=encoder,s2_mae,mp_mae,full --batch_size=256 --steps=20

A case may override model fields after a '/', to compare variants in one run (one GPU call):
  --objectives=mp_mae,mp_mae/dwconv_impl=taps,full/jepa_context=mae_pass,full

Per case: compile seconds, step ms, samples/s, FLOPs per sample and MFU, the compiled step's
memory (XLA's memory analysis) and the process's peak device memory so far, and (when grain and
a built dataset are available: --data_dir) the input pipeline's host samples/s. With
--profile_dir, each case also traces 3 steps (TensorBoard/Perfetto files under
profile_dir/<case>/) and prints its 15 most expensive device ops per step: where the time goes,
from the same single GPU call. Batches are synthetic and live in device memory, so the step is
measured alone; the mesh spans every local device. Each case also reports its wall seconds
outside the timed loop (setup, lowering, profile) so a GPU budget can be planned.
Case 'encoder' is the plain ConvNeXtV2 forward+backward (the speed reference in
ARCHITECTURE.md); the others are the full train step of that ablation preset.

FLOPs come from XLA's cost analysis of the LOWERED program (before backend passes): on GPU the
compiled program's count leaves out the cuDNN and cuBLAS custom calls (measured on an H100:
0.78 GFLOP/sample for an MP-MAE step that does 5.1), and lowering costs no compile. Model FLOPs
(`flops_per_step`, the MFU basis) are 3x the forward pass of the train loss, the usual
convention. `xla_step_flops` counts the train step's own graph (the JEPA teacher runs forward
only, so it is below 3x forward when JEPA is on).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import nnx
from ml_collections import config_flags

from geomeld_jax import modalities as mod
from geomeld_jax import records
from geomeld_jax import sharding
from geomeld_jax import train_step as ts
from geomeld_jax.models import convnextv2
from geomeld_jax.models import geomeld

# Dense bf16 peak FLOP/s per chip, for MFU. Keyed by a substring of `device_kind`.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
                   "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


# The fields an ablation preset sets (geomeld.GeoMeldFMConfig.preset): a case picks them by
# naming the preset, so they cannot be overridden after '/'.
PRESET_FIELDS = ("targets", "jepa", "itc", "loss_weighting")


def parse_case(case: str, model_fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
  """'mp_mae/stem=original/patch_size=32' -> ('mp_mae', {'stem': 'original', 'patch_size': 32}).

  Values take the type of the config's current value; an unknown field, or one the preset
  sets, is an error naming it.
  """
  name, *assignments = case.split("/")
  overrides = {}
  for assignment in assignments:
    field, sep, text = assignment.partition("=")
    if not sep or field not in model_fields:
      raise ValueError(f"case {case!r}: {assignment!r} is not field=value for a model field "
                       f"(fields: {sorted(model_fields)})")
    if field in PRESET_FIELDS:
      raise ValueError(f"case {case!r}: {field} is set by the preset; name another preset "
                       f"({', '.join(geomeld.PRESETS)}) instead")
    current = model_fields[field]
    if isinstance(current, bool):
      if text not in ("true", "false", "True", "False"):
        raise ValueError(f"case {case!r}: {field} takes true/false, got {text!r}")
      overrides[field] = text.lower() == "true"
    else:
      overrides[field] = type(current)(text) if current is not None else text
  return name, overrides


def _peak_flops() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)


def _peak_memory() -> int | None:
  """The process's peak device memory so far: a high-water mark over every case run before."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _compiled_memory(compiled) -> int | None:
  """This step's own device memory per device: arguments + outputs + temporaries - aliased."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def _flops(lowered) -> float:
  """FLOPs of a lowered program: the whole (global) computation, before partitioning."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _time_steps(run, steps: int) -> float:
  for _ in range(2):
    jax.block_until_ready(run())
  t0 = time.perf_counter()
  for _ in range(steps):
    out = run()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op it came from (metadata op_name), from `as_text()`."""
  pattern = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]+)"',
                       re.MULTILINE)
  return {name: op for name, op in pattern.findall(hlo_text)}


# Block parts named by convnextv2's scopes: where inside the encoder the time goes.
_PARTS = re.compile(r"/(stem|downsample\d|dwconv|mlp|gather|scatter)/")


def device_time_profile(trace_dir: str, num_steps: int, hlo_text: str = "",
                        top: int = 15) -> dict[str, Any]:
  """Where a step's device time goes, from a `jax.profiler` Perfetto trace.

  Device ops are the events of the '/device:*' processes (GPU streams, TPU 'XLA Ops'), minus
  the per-module and per-step envelope lines; on a CPU-only trace, the XLA worker threads'
  events minus the runtime's own '::' spans. Events are grouped by HLO instruction (kernel
  name when the trace has none) and labelled with the JAX op behind it (from `hlo_text`).
  Kernels inside a GPU command buffer are grouped by the fusion their kernel name names; where
  XLA reuses one kernel for identical fusions, the first fusion's label is shown.

  Returns {"top_ops": the `top` ops by time, "by_branch": share per loss branch (the
  named scopes of geomeld.loss_fn; '-' = unscoped: optimizer, loss combination),
  "by_part": share per encoder part (stem, dwconv, mlp, gather, scatter, downsample)}.
  """
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}

  def is_op(e) -> bool:
    thread = threads.get((e["pid"], e["tid"]), "")
    if devices:
      return e["pid"] in devices and not re.search(r"Modules|Steps|Framework|Source", thread)
    return thread.startswith("tf_XLA") and "::" not in e["name"]

  jax_ops = hlo_op_names(hlo_text)
  # XLA:GPU names a fusion's kernel after its instruction, '.' and '-' written as '_'.
  by_kernel = {re.sub(r"[.\-]", "_", name): name for name in jax_ops}
  total: dict[str, float] = collections.defaultdict(float)
  count: dict[str, int] = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and is_op(e):
      name = e.get("args", {}).get("hlo_op") or e["name"]
      if name not in jax_ops:
        # Every kernel of a command buffer (a CUDA graph of many instructions) carries the
        # buffer's name as hlo_op; its kernel name still names the fusion. Library kernels
        # (cuDNN, cuBLAS) match nothing and stay under the buffer's name.
        name = by_kernel.get(e["name"], name)
      total[name] += float(e.get("dur", 0.0))
      count[name] += 1
  device_us = sum(total.values())
  by_branch: dict[str, float] = collections.defaultdict(float)
  by_part: dict[str, float] = collections.defaultdict(float)
  for name, us in total.items():
    jax_op = jax_ops.get(name, "")
    branch = re.search(r"jvp\((\w+)\)", jax_op)
    by_branch[branch.group(1) if branch else "-"] += us / device_us
    part = _PARTS.search(jax_op)
    by_part[part.group(1) if part else "-"] += us / device_us
  top_ops = [{"op": name, "jax_op": jax_ops.get(name, ""), "ms_per_step": us / 1e3 / num_steps,
              "share": us / device_us, "calls_per_step": count[name] / num_steps}
             for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:top]]

  def ranked(shares):
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))

  return {"device_ms_per_step": device_us / 1e3 / num_steps, "top_ops": top_ops,
          "by_branch": ranked(by_branch), "by_part": ranked(by_part)}


def _profile(run, compiled, profile_dir: str, steps: int = 3) -> dict[str, Any]:
  jax.block_until_ready(run())
  with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
    for _ in range(steps):
      out = run()
    jax.block_until_ready(out)
  return device_time_profile(profile_dir, steps, compiled.as_text())


def encoder_case(config, mesh, batch_size: int, crop: int, dtype: str, steps: int,
                 profile_dir: str | None = None) -> dict:
  """Plain ConvNeXtV2 forward+backward with a trivial loss (no masking, no decoder)."""
  mcfg = ts.model_config(config)
  model = convnextv2.ConvNeXtV2(mcfg.variant, mod.SENTINEL2.num_bands, stem=mcfg.stem,
                                patch_size=mcfg.patch_size, dwconv_impl=mcfg.dwconv_impl,
                                dtype=jnp.dtype(dtype),
                                rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  repl = sharding.replicated(mesh)
  params = jax.device_put(params, repl)
  x = jax.device_put(np.random.default_rng(0).normal(
      size=(batch_size, crop, crop, mod.SENTINEL2.num_bands)).astype(np.float32),
                     sharding.batch_sharding(mesh))

  def loss(p, x):
    feats, _ = nnx.merge(graphdef, p)(x.astype(dtype))
    return jnp.mean(jnp.square(feats.astype(jnp.float32)))

  step = jax.jit(jax.grad(loss), in_shardings=(repl, sharding.batch_sharding(mesh)),
                 out_shardings=repl)
  t0 = time.perf_counter()
  lowered = step.lower(params, x)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  step_s = _time_steps(lambda: compiled(params, x), steps)
  out = {"compile_s": compile_s, "step_s": step_s,
         "flops_per_step": 3 * _flops(jax.jit(loss).lower(params, x)),
         "xla_step_flops": _flops(lowered), "compiled_memory_bytes": _compiled_memory(compiled)}
  if profile_dir:
    out["profile"] = _profile(lambda: compiled(params, x), compiled, profile_dir)
  return out


def train_case(config, mesh, objective: str, batch_size: int, crop: int, dtype: str,
               steps: int, profile_dir: str | None = None) -> dict:
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    mcfg = dataclasses.asdict(geomeld.GeoMeldFMConfig.preset(
        objective, **{k: v for k, v in cfg.model.items() if k not in PRESET_FIELDS}))
    mcfg["compute_dtype"] = dtype
    cfg.model = mcfg
    cfg.input.global_batch_size = batch_size
  normalizer = records.Normalizer(ts.synthetic_statistics())
  setup = ts.setup(cfg, mesh, normalizer)
  host = ts.synthetic_batch(setup.model_def.config, batch_size, crop, cfg.input.text_len)
  batch = sharding.put_batch(host, mesh)
  state = setup.init_state()
  t0 = time.perf_counter()
  lowered = setup.train_step.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  step_s = _time_steps(run, steps)
  loss = float(jax.device_get(run()))
  out = {"compile_s": compile_s, "step_s": step_s,
         "flops_per_step": 3 * _flops(train_loss_forward(setup, normalizer).lower(
             holder["state"], batch)),
         "xla_step_flops": _flops(lowered), "compiled_memory_bytes": _compiled_memory(compiled),
         "final_loss": loss}
  if profile_dir:
    out["profile"] = _profile(run, compiled, profile_dir)
  return out


def train_loss_forward(setup: ts.TrainSetup, normalizer: records.Normalizer):
  """The train step's loss, forward only, jitted: what model FLOPs (3x forward) count.

  Not `setup.eval_step`: with ITC on, evaluation adds an unmasked encoder pass for a metric
  (`unmasked_itc_metrics`) that training never runs.
  """
  mcfg = setup.model_def.config

  def forward(state, batch):
    inputs = records.model_inputs(batch, normalizer, jnp)
    ema = state["ema_params"] if mcfg.jepa else None
    return geomeld.loss_fn(state["params"], ema, setup.model_def, inputs, jax.random.key(0))[0]

  return jax.jit(forward)


def input_case(data_dir: str, batch_size: int, crop: int, text_len: int, seconds: float = 10.0
               ) -> dict:
  from geomeld_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  files = input_pipeline.locate_dataset(data_dir)
  it = iter(input_pipeline.make_dataset(files, "train", global_batch_size=batch_size,
                                        crop_size=crop, text_len=text_len, seed=0, train=True))
  next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  return {"input_samples_per_s_host": n * batch_size / (time.perf_counter() - t0)}


def main(argv):
  del argv
  args = flags.FLAGS
  config = args.config
  batch = args.batch_size
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)))
  peak = _peak_flops()
  device = f"{jax.device_count()}x {jax.devices()[0].device_kind}"
  rows: list[dict[str, Any]] = []
  cases = [(case, *parse_case(case, dict(config.model.items()))) for case in args.objectives]
  for case, objective, overrides in cases:
    kw = dict(batch_size=batch, crop=args.crop_size, dtype=args.compute_dtype, steps=args.steps,
              profile_dir=(os.path.join(args.profile_dir, re.sub(r"[^\w.-]", "_", case))
                           if args.profile_dir else None))
    case_config = config.copy_and_resolve_references()
    with case_config.unlocked():
      case_config.model.update(overrides)
    t0 = time.perf_counter()
    try:
      if objective == "encoder":
        r = encoder_case(case_config, mesh, **kw)
      else:
        r = train_case(case_config, mesh, objective, **kw)
    except Exception as e:  # a case that does not fit (e.g. OOM) is reported, not fatal
      r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    r.update(case=case, device=device, variant=case_config.model.variant, batch_size=batch,
             crop_size=args.crop_size, compute_dtype=args.compute_dtype,
             peak_memory_bytes=_peak_memory(), case_wall_s=time.perf_counter() - t0)
    if "step_s" in r:
      r["step_ms"] = 1e3 * r["step_s"]
      r["samples_per_s"] = batch / r["step_s"]
      r["flops_per_sample"] = r["flops_per_step"] / batch
      if peak:
        r["mfu"] = r["flops_per_step"] / r["step_s"] / (peak * jax.device_count())
    print(json.dumps(r), flush=True)
    if "profile" in r:
      _print_profile(r["profile"])
    rows.append(r)
  if args.data_dir:
    r = input_case(args.data_dir, batch, args.crop_size, config.input.text_len)
    r.update(case="input_pipeline")
    print(json.dumps(r), flush=True)
  width = max(10, *(len(r["case"]) for r in rows))
  print(f"\n{'case':{width}s} {'samples/s':>10s} {'step ms':>9s} {'compile s':>10s} "
        f"{'GFLOP/sample':>13s} {'MFU':>6s} {'step GiB':>9s} {'case s':>7s}")
  for r in rows:
    if "error" in r:
      print(f"{r['case']:{width}s} {r['error']}")
      continue
    mem = r["compiled_memory_bytes"]
    print(f"{r['case']:{width}s} {r['samples_per_s']:10.0f} {r['step_ms']:9.1f} {r['compile_s']:10.1f} "
          f"{r['flops_per_sample'] / 1e9:13.2f} {r.get('mfu', float('nan')):6.3f} "
          f"{(mem or 0) / 2**30:9.2f} {r['case_wall_s']:7.0f}")


def _print_profile(profile: dict[str, Any]) -> None:
  def shares(d):
    return " | ".join(f"{k} {100 * v:.0f}%" for k, v in d.items() if v >= 0.005)

  print(f"  device time {profile['device_ms_per_step']:.1f} ms/step; by branch: "
        f"{shares(profile['by_branch'])}")
  print(f"  by encoder part: {shares(profile['by_part'])}")
  for op in profile["top_ops"]:
    print(f"  {op['ms_per_step']:9.3f} ms {100 * op['share']:5.1f}% "
          f"x{op['calls_per_step']:<4.0f} {op['op'][:40]:40s} {op['jax_op'][-90:]}")
  print(flush=True)


def define_flags() -> None:
  """The CLI's flags; defined only when run as a script, so tests can import the module."""
  config_flags.DEFINE_config_file("config", "configs/pretrain.py:atto,full",
                                  "Base config; the objective is replaced per case.")
  flags.DEFINE_list(
      "objectives", ["encoder", "mp_mae", "full"],
      "Cases: 'encoder' or an ablation preset (s2_mae, mp_mae, ...), each optionally followed "
      "by '/field=value' model-config overrides, e.g. 'mp_mae/stem=original'.")
  flags.DEFINE_integer("batch_size", 256, "Global batch size.")
  flags.DEFINE_integer("crop_size", 128, "Tile size fed to the model.")
  flags.DEFINE_integer("steps", 20, "Timed steps per case (after 2 warm-up steps).")
  flags.DEFINE_enum("compute_dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
  flags.DEFINE_string("data_dir", "", "A built dataset to time the input pipeline on.")
  flags.DEFINE_string("profile_dir", "", "Also trace 3 steps per case here and print the top "
                      "device ops (empty: no profile).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
