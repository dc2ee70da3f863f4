"""The sharded train step: a pure jitted function of a plain pytree.

    state = {"params", "opt_state", "ema_params", "step"}

`ema_params` is the JEPA teacher (an EMA of the encoder params; an empty dict when JEPA is
off). The step draws its randomness from `fold_in(key(seed), step)`, so a resumed run replays
exactly the masks a run that never stopped would have drawn.

This module imports neither grain nor tfds: the GPU/TPU benchmark uses it with in-memory
batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from geomeld_jax import modalities as mod
from geomeld_jax import optim
from geomeld_jax import records
from geomeld_jax import sharding
from geomeld_jax.models import geomeld
from geomeld_jax.models import jepa

PyTree = Any


def model_config(config) -> geomeld.GeoMeldFMConfig:
  """`config.model` (a ConfigDict of every GeoMeldFMConfig field) -> the frozen dataclass."""
  return geomeld.GeoMeldFMConfig.from_dict(dict(config.model.items()))


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything the loop needs to run steps; built once by `setup`."""

  model_def: geomeld.ModelDef
  mesh: Mesh
  state_shardings: PyTree
  abstract_state: PyTree  # ShapeDtypeStructs carrying the shardings (restore target)
  init_state: Callable[[], PyTree]  # jitted: materialises the state already sharded
  train_step: Callable[..., tuple[PyTree, dict[str, jax.Array]]]  # (state, batch)
  eval_step: Callable[..., dict[str, jax.Array]]  # (state, batch, index)
  schedule: optax.Schedule


def setup(config, mesh: Mesh, normalizer: records.Normalizer) -> TrainSetup:
  """Builds the model definition, optimizer, shardings and the jitted init/train/eval steps.

  The steps take batches in storage form (input_pipeline) and normalise them on device with
  `normalizer` (the build's statistics, baked into the compiled step as constants).
  """
  mcfg = model_config(config)
  tx, schedule = optim.make_optimizer(config.optim)
  seed = int(config.seed)
  total_steps = int(config.total_steps)

  captured: dict[str, geomeld.ModelDef] = {}

  def init_fn():
    model_def, params = geomeld.init(mcfg, jax.random.key(seed))
    captured["model_def"] = model_def
    ema = jax.tree.map(jnp.copy, geomeld.encoder_params(params)) if mcfg.jepa else {}
    return {"params": params, "opt_state": tx.init(params), "ema_params": ema,
            "step": jnp.zeros((), jnp.int32)}

  # Shapes only: the full state never materialises unsharded on one device.
  abstract = jax.eval_shape(init_fn)
  model_def = captured["model_def"]
  shardings = sharding.state_sharding(abstract, mesh,
                                      min_size_to_shard_mb=config.min_size_to_shard_mb)
  init_state = jax.jit(init_fn, out_shardings=shardings)
  repl = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)

  def train_step(state, batch):
    batch = records.model_inputs(batch, normalizer, jnp)
    step = state["step"]
    rng = jax.random.fold_in(jax.random.key(seed), step)
    ema = state["ema_params"] if mcfg.jepa else None

    def loss_of(params):
      return geomeld.loss_fn(params, ema, model_def, batch, rng)

    (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = geomeld.clamp_params(mcfg, optax.apply_updates(state["params"], updates))
    new_ema = state["ema_params"]
    if mcfg.jepa:
      momentum = jepa.ema_momentum(step, total_steps, mcfg.ema_momentum_start,
                                   mcfg.ema_momentum_end)
      new_ema = jepa.ema_update(state["ema_params"], geomeld.encoder_params(params), momentum)
      metrics["ema_momentum"] = momentum
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)
    metrics["lr"] = schedule(step)
    new_state = {"params": params, "opt_state": opt_state, "ema_params": new_ema,
                 "step": step + 1}
    return new_state, metrics

  def eval_step(state, batch, index):
    batch = records.model_inputs(batch, normalizer, jnp)
    # Fixed masks per eval batch index: held-out losses are comparable across evaluations.
    rng = jax.random.fold_in(jax.random.key(seed + 1), index)
    ema = state["ema_params"] if mcfg.jepa else None
    _, metrics = geomeld.loss_fn(state["params"], ema, model_def, batch, rng, deterministic=True)
    if mcfg.itc and mcfg.vision_embedding == "visible":
      metrics.update(geomeld.unmasked_itc_metrics(state["params"], model_def, batch))
    return metrics

  jit_train = jax.jit(train_step, in_shardings=(shardings, batch_sh),
                      out_shardings=(shardings, repl), donate_argnums=(0,))
  jit_eval = jax.jit(eval_step, in_shardings=(shardings, batch_sh, repl), out_shardings=repl)
  return TrainSetup(model_def=model_def, mesh=mesh, state_shardings=shardings,
                    abstract_state=sharding.with_shardings(abstract, shardings),
                    init_state=init_state, train_step=jit_train, eval_step=jit_eval,
                    schedule=schedule)


def _synthetic_range(m: mod.PixelModality) -> tuple[np.ndarray, np.ndarray]:
  lo = m.band_valid_range()[:, 0]
  return lo, np.minimum(m.band_valid_range()[:, 1] - lo, 1000.0)


def synthetic_statistics() -> dict[str, Any]:
  """Statistics matching `synthetic_batch` (uniform values), for `records.Normalizer`."""
  out = {}
  for m in mod.PIXEL_MODALITIES.values():
    lo, width = _synthetic_range(m)
    out[m.name] = {"bands": list(m.bands), "mean": list(lo + width / 2),
                   "std": list(width / np.sqrt(12.0))}
  return out


def synthetic_batch(mcfg: geomeld.GeoMeldFMConfig, batch_size: int, size: int,
                    text_len: int, seed: int = 0) -> dict[str, Any]:
  """A random host batch in storage form, as input_pipeline yields (benchmarks and tests)."""
  rng = np.random.default_rng(seed)
  out: dict[str, Any] = {}
  for m in mod.PIXEL_MODALITIES.values():
    shape = (batch_size, size, size, m.num_bands)
    if m.is_classes:
      codes = rng.integers(0, m.num_classes, size=shape)
      out[m.name] = np.where(rng.random(shape) < 0.05, mod.CLASS_NODATA, codes).astype(np.uint8)
    else:
      lo, width = _synthetic_range(m)
      physical = lo + rng.random(shape) * width
      out[m.name] = np.stack([mod.to_storage(m, p)[0] for p in physical])
  for t in mod.IMAGE_TARGETS.values():
    if t.kind is mod.TargetKind.IMAGE_CLASSES:
      out[t.name] = rng.integers(-1, t.num_classes, size=batch_size).astype(np.int32)
    else:
      out[t.name] = rng.uniform(-1, 1, size=(batch_size, t.dims)).astype(np.float32)
      out[f"{t.name}_valid"] = rng.random(batch_size) < 0.9
  tokens = rng.integers(3, mcfg.text_vocab_size, size=(batch_size, text_len)).astype(np.int32)
  tokens[:, -1] = 1  # sticky EOS
  out["text_tokens"] = tokens
  out["has_caption"] = np.ones(batch_size, bool)
  return out


def abstract_batch(config, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the step receives, as sharded ShapeDtypeStructs in storage dtypes
  (for `train_step.lower(...)` without data: AOT compiles, HLO inspection)."""
  one = synthetic_batch(model_config(config), 1, config.input.crop_size, config.input.text_len)
  batch_sh = sharding.batch_sharding(mesh)
  size = int(config.input.global_batch_size)
  return {k: jax.ShapeDtypeStruct((size,) + v.shape[1:], v.dtype, sharding=batch_sh)
          for k, v in one.items()}


def check_batch(mcfg: geomeld.GeoMeldFMConfig, normalizer: records.Normalizer,
                host_batch: Mapping[str, Any]) -> None:
  """The model's batch check, on what the step will see after on-device normalisation."""
  abstract = jax.eval_shape(lambda b: records.model_inputs(b, normalizer, jnp),
                            {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host_batch.items()})
  geomeld.check_batch(mcfg, abstract)
