"""GeoMeld-FM pretraining loop: one readable function under section banners (big_vision style).

`train_and_evaluate(config, workdir)` trains, evaluates the held-out loss every
`config.eval_every` steps (the last one's means also in `last_eval.json`), checkpoints (async,
every `config.checkpoint_every` steps and on preemption) and exports the encoder at the end. It
resumes from the workdir's newest complete checkpoint, data iterator included, so a resumed
run continues exactly; an evaluation or the export that a stop cut off runs on resuming.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time

import jax
import numpy as np
from etils import epath

from geomeld_jax import checkpointing
from geomeld_jax import input_pipeline
from geomeld_jax import metrics_writer
from geomeld_jax import sharding
from geomeld_jax import train_step as ts
from geomeld_jax.models import geomeld

# Config keys a checkpoint must agree on to be resumed (schedules and logging may change).
# input.num_workers: Grain's saved iterator position is per worker process; restoring it into a
# different worker count fails (KeyError) or, with more workers, silently reorders the data.
# input.train_split: the saved position is an index into that split's shuffled records.
RESUME_KEYS = ("model", "seed", "input.train_split", "input.crop_size", "input.text_len",
               "input.global_batch_size", "input.num_workers", "mesh")
# Written after each held-out evaluation: the step and its means. A stop or preemption between
# a checkpoint and its evaluation leaves it behind, and the resumed run evaluates that step.
LAST_EVAL_FILENAME = "last_eval.json"
# Model fields that change how the step computes, not what (each tested equal): a run may
# resume with another value, e.g. started on CPUs with dwconv_impl='taps', resumed on GPUs.
RESUME_EXEMPT_KEYS = ("model.dwconv_impl", "model.mae_visible_only",
                      "model.mae_heads_masked_only")


def check_resumable(workdir, config) -> None:
  """Refuses a workdir whose checkpoint an incompatible config wrote (errors name the keys).

  A model field the saved config lacks was added after that run started; the run had the
  field's default (GeoMeldFMConfig's rule), so that is what the new value is compared with.
  """
  defaults = {f"model.{field.name}": field.default
              for field in dataclasses.fields(geomeld.GeoMeldFMConfig)}
  checkpointing.check_compatible(workdir, config, RESUME_KEYS, RESUME_EXEMPT_KEYS, defaults)


def _dataset(config) -> input_pipeline.DatasetFiles:
  data_dir = config.input.data_dir
  if not data_dir:
    raise ValueError("config.input.data_dir is empty: point it at a dataset built by data_prep")
  if not config.input.build_demo_if_missing:
    return input_pipeline.locate_dataset(data_dir)  # its error names data_prep.build
  try:
    return input_pipeline.locate_dataset(data_dir)
  except FileNotFoundError:
    from data_prep import demo  # pylint: disable=g-import-not-at-top

    logging.info("no dataset in %s: building the synthetic demo dataset", data_dir)
    print(demo.build_demo(data_dir, num_samples=config.input.demo_num_samples))
  return input_pipeline.locate_dataset(
      data_dir, build_hint="python -m data_prep.demo --output_dir=" + str(data_dir))


def _check_intervals(config) -> None:
  for key in ("total_steps", "log_every", "eval_every", "checkpoint_every"):
    if config[key] <= 0:
      raise ValueError(f"config.{key} must be positive, got {config[key]}")


def _last_eval_step(workdir: epath.Path) -> int | None:
  path = workdir / LAST_EVAL_FILENAME
  return json.loads(path.read_text())["step"] if path.exists() else None


def _check_finite(step: int, metrics: dict[str, float], workdir: epath.Path) -> None:
  """Stops the run on a NaN/Inf loss, after writing what is needed to debug it."""
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if not bad:
    return
  path = workdir / "nonfinite_diagnostics.json"
  if jax.process_index() == 0:
    path.write_text(json.dumps({"step": step, "nonfinite": sorted(bad), "metrics": {
        k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}, indent=2))
  raise FloatingPointError(f"non-finite metrics at step {step}: {sorted(bad)}. Diagnostics in "
                           f"{path}; the last good checkpoint is kept untouched.")


def train_and_evaluate(config, workdir: str | pathlib.Path, *,
                       stop_after: int | None = None) -> dict[int, dict[str, float]]:
  """Runs (or resumes) pretraining; returns the logged training metrics by step.

  Args:
    config: a configs/pretrain.py config.
    workdir: run directory (checkpoints, TensorBoard, config, export).
    stop_after: stop after this step as a preempted job would (checkpoint, no export); a
      later call resumes. For time-boxed jobs and the resume tests.
  """
  _check_intervals(config)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_host0 = jax.process_index() == 0

  ##########################################################################################
  # Run metadata and resume compatibility                                                  #
  ##########################################################################################
  checkpointing.check_workdir_is_shared(workdir)  # multi-host: one workdir for all hosts
  check_resumable(workdir, config)
  checkpointing.save_config(workdir, config)
  if is_host0:
    metrics_writer.write_run_info(workdir, config)
  writer = metrics_writer.MetricWriter(workdir, config.total_steps, is_host0,
                                       global_batch_size=config.input.global_batch_size,
                                       console_filter=config.console_metrics)

  ##########################################################################################
  # Mesh, model, optimizer, sharded state                                                  #
  ##########################################################################################
  mesh = sharding.make_mesh(config.mesh)
  per_host_batch = sharding.per_process_batch_size(config.input.global_batch_size, mesh)
  logging.info("mesh %s; global batch %d (%d per host)", dict(mesh.shape),
               config.input.global_batch_size, per_host_batch)

  ##########################################################################################
  # Input pipeline                                                                         #
  ##########################################################################################
  files = _dataset(config)
  checkpointing.check_same_dataset(workdir, input_pipeline.fingerprint(files))
  normalizer = input_pipeline.normalizer(files)
  setup = ts.setup(config, mesh, normalizer)
  mcfg = setup.model_def.config
  data_kw = dict(global_batch_size=config.input.global_batch_size,
                 crop_size=config.input.crop_size, text_len=config.input.text_len,
                 seed=config.seed, process_index=jax.process_index(),
                 process_count=jax.process_count())
  train_ds = input_pipeline.make_dataset(files, config.input.train_split, train=True,
                                         num_workers=config.input.num_workers, **data_kw)
  train_iter = iter(train_ds)
  # Built now, not at the first evaluation: a missing or too small eval split fails before
  # any step is trained. Iterating it again starts it again.
  eval_ds = input_pipeline.make_dataset(files, config.input.eval_split, train=False,
                                        max_eval_batches=config.input.eval_batches, **data_kw)
  first = next(iter(train_ds))  # a second iterator: train_iter's position is untouched
  # Checked in plain Python before anything compiles: a wrong key fails here, by name.
  ts.check_batch(mcfg, normalizer, first)
  if mcfg.itc:
    if not files.tokenizer.is_file():
      raise ValueError(f"ITC is on but {files.root} has no tokenizer.model (no captions?)")
    vocab = input_pipeline.Tokenizer(files.tokenizer, config.input.text_len).vocab_size
    if vocab > mcfg.text_vocab_size:
      raise ValueError(f"the dataset's tokenizer has {vocab} pieces but config.model."
                       f"text_vocab_size is {mcfg.text_vocab_size}: raise it to >= {vocab}")
  del first

  ##########################################################################################
  # Initialise or restore                                                                  #
  ##########################################################################################
  ckpt = checkpointing.Checkpointer(workdir, save_interval_steps=config.checkpoint_every,
                                    max_to_keep=config.keep_checkpoints,
                                    async_save=config.async_checkpoints, catch_sigterm=True)
  restored = ckpt.restore_latest(setup.abstract_state, data_iter=train_iter)
  if restored is None:
    state, first_step = setup.init_state(), 0
    logging.info("initialised a new state: %s params",
                 f"{sum(x.size for x in jax.tree.leaves(state['params'])):,}")
  else:
    state, first_step = restored
    logging.info("resumed from step %d", first_step)

  ##########################################################################################
  # Train loop                                                                             #
  ##########################################################################################
  repl = sharding.replicated(mesh)

  def evaluate(step: int) -> None:
    sums: dict[str, float] = {}
    n = 0
    for i, batch in enumerate(eval_ds):
      m = jax.device_get(setup.eval_step(state, sharding.put_batch(batch, mesh),
                                         jax.device_put(np.int32(i), repl)))
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v)
      n += 1
    means = {f"eval/{k}": v / n for k, v in sums.items()} if n else {}
    writer.write_scalars(step, means)
    if is_host0:
      (workdir / LAST_EVAL_FILENAME).write_text(json.dumps({"step": step, **means}, indent=1))

  def is_eval_step(step: int) -> bool:
    return step % config.eval_every == 0 or step == config.total_steps

  history: dict[int, dict[str, float]] = {}
  t0 = time.monotonic()
  try:
    if first_step and is_eval_step(first_step) and _last_eval_step(workdir) != first_step:
      logging.info("evaluating step %d first: the run stopped before its evaluation", first_step)
      evaluate(first_step)
    for step in range(first_step + 1, config.total_steps + 1):
      batch = sharding.put_batch(next(train_iter), mesh)  # explicit, allowed by the guard
      with jax.transfer_guard(config.transfer_guard):  # no implicit copy inside the step
        state, metrics = setup.train_step(state, batch)
      final = step == config.total_steps or step == stop_after
      log_now = step % config.log_every == 0 or final
      save_now = ckpt.should_save(step) or final
      if log_now or save_now:
        history[step] = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, history[step], workdir)  # before any save: never save a NaN state
      if log_now:
        writer.write_scalars(step, history[step])
      if save_now:
        ckpt.maybe_save(step, state, train_iter, force=final)
      if ckpt.reached_preemption(step) or step == stop_after:
        logging.warning("stopping after step %d (preemption or stop_after): saved", step)
        return history
      if is_eval_step(step):
        evaluate(step)
  finally:
    # Whatever ends the loop (the end, a stop, a NaN, an error), a save in flight holds a good
    # state: let it commit before the process goes.
    ckpt.close()  # waits for it, and hands SIGTERM back
    writer.close()
  if first_step >= config.total_steps:
    logging.info("nothing to do: the checkpoint in %s is already at step %d", workdir, first_step)
  else:
    logging.info("trained steps %d..%d in %.1f s", first_step + 1, config.total_steps,
                 time.monotonic() - t0)

  ##########################################################################################
  # Export                                                                                 #
  ##########################################################################################
  # Also when this call trained nothing: a stop at the last step, or a kill during the
  # export, left the final checkpoint without its export.
  from geomeld_jax import export  # pylint: disable=g-import-not-at-top

  if config.export_at_end and not export.is_exported(workdir, config.total_steps):
    export.export_encoder(workdir, step=config.total_steps)
  return history
