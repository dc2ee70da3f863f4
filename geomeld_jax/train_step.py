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
import optax
from jax.sharding import Mesh

from geomeld_jax import modalities as mod
from geomeld_jax import optim
from geomeld_jax import sharding
from geomeld_jax.models import geomeld
from geomeld_jax.models import jepa

PyTree = Any


def _tuplify(v):
  return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


def model_config(config) -> geomeld.GeoMeldFMConfig:
  """`config.model` (a ConfigDict of every GeoMeldFMConfig field) -> the frozen dataclass."""
  fields = {f.name for f in dataclasses.fields(geomeld.GeoMeldFMConfig)}
  given = dict(config.model.items())
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"config.model has unknown keys {unknown}")
  return geomeld.GeoMeldFMConfig(**{k: _tuplify(v) for k, v in given.items()})


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


def setup(config, mesh: Mesh) -> TrainSetup:
  """Builds the model definition, optimizer, shardings and the jitted init/train/eval steps."""
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
    # Fixed masks per eval batch index: held-out losses are comparable across evaluations.
    rng = jax.random.fold_in(jax.random.key(seed + 1), index)
    ema = state["ema_params"] if mcfg.jepa else None
    _, metrics = geomeld.loss_fn(state["params"], ema, model_def, batch, rng, deterministic=True)
    return metrics

  jit_train = jax.jit(train_step, in_shardings=(shardings, batch_sh),
                      out_shardings=(shardings, repl), donate_argnums=(0,))
  jit_eval = jax.jit(eval_step, in_shardings=(shardings, batch_sh, repl), out_shardings=repl)
  return TrainSetup(model_def=model_def, mesh=mesh, state_shardings=shardings,
                    abstract_state=sharding.with_shardings(abstract, shardings),
                    init_state=init_state, train_step=jit_train, eval_step=jit_eval,
                    schedule=schedule)


def synthetic_batch(mcfg: geomeld.GeoMeldFMConfig, batch_size: int, size: int,
                    text_len: int, seed: int = 0) -> dict[str, Any]:
  """A random host batch matching the batch contract (benchmarks, AOT and tests)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  out: dict[str, Any] = {}
  for key, (shape, kind) in geomeld.batch_spec(mcfg, batch_size, size, size).items():
    if kind == "float":
      out[key] = rng.normal(size=shape).astype(np.float32)
    elif kind == "bool":
      out[key] = np.ones(shape, bool)
    else:  # class targets: in range for every class map and image-level class target
      num_classes = min([m.num_classes for m in mod.PIXEL_MODALITIES.values() if m.is_classes]
                        + [t.num_classes for t in mod.IMAGE_TARGETS.values() if t.num_classes])
      out[key] = rng.integers(-1, num_classes, size=shape).astype(np.int32)
  if mcfg.itc:
    tokens = rng.integers(3, mcfg.text_vocab_size, size=(batch_size, text_len)).astype(np.int32)
    tokens[:, -1] = 1  # EOS
    out["text_tokens"] = tokens
    out["has_caption"] = np.ones(batch_size, bool)
  return out

