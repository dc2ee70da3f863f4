"""Parameter counts per variant and FLOPs per sample from XLA's cost analysis.

  python -m geomeld_jax.models.summary    # counts for every variant, FLOPs for atto
  python -m geomeld_jax.models.summary --preset mp_mae --flops atto,tiny --image_size 128

Parameter counts come from abstract shapes (`nnx.eval_shape`), so no weights are
allocated. FLOPs are XLA's estimate for the lowered (unoptimised) HLO of one pretraining
loss evaluation (forward) and of its gradient (forward + backward), divided by the batch,
and of the encoder's unmasked forward; a multiply-add counts as 2 FLOPs.
"""

from __future__ import annotations

import argparse
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from geomeld_jax import modalities as mod
from geomeld_jax.models import convnextv2
from geomeld_jax.models import geomeld

_FLOPS_BATCH = 2


def abstract_param_counts(config: geomeld.GeoMeldFMConfig) -> dict[str, int]:
  """Parameters per top-level submodule (and 'total') without allocating them."""
  model = nnx.eval_shape(lambda: geomeld.GeoMeldFM(config, rngs=nnx.Rngs(0)))
  return geomeld.param_counts(nnx.state(model, nnx.Param))


def _abstract_batch(config: geomeld.GeoMeldFMConfig, batch: int,
                    size: int) -> dict[str, jax.ShapeDtypeStruct]:
  dtypes = {"float": jnp.float32, "bool": jnp.bool_, "int": jnp.int32}
  spec = geomeld.batch_spec(config, batch, size, size)
  out = {k: jax.ShapeDtypeStruct(shape, dtypes[kind]) for k, (shape, kind) in spec.items()}
  if config.itc:
    out["text_tokens"] = jax.ShapeDtypeStruct((batch, config.text_context), jnp.int32)
  return out


def _flops(lowered) -> float:
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
    cost = cost[0]
  return float(cost.get("flops", math.nan))


def flops_per_sample(config: geomeld.GeoMeldFMConfig, image_size: int) -> dict[str, float]:
  """{'encoder_fwd', 'loss_fwd', 'loss_fwd_bwd'} FLOPs per sample (XLA estimate)."""
  if config.drop_path_rate:
    raise ValueError("cost the pretraining config with drop_path_rate=0 (abstract RNG state "
                     "cannot be lowered)")
  abstract = nnx.eval_shape(lambda: geomeld.build(config, jax.random.key(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  model_def = geomeld.ModelDef(config, graphdef, rest)
  batch = _abstract_batch(config, _FLOPS_BATCH, image_size)
  ema = geomeld.encoder_params(params) if config.jepa else None
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

  def loss(p, e, b, k):
    return geomeld.loss_fn(p, e, model_def, b, k)[0]

  def encode(p, b):
    model = geomeld.merge(model_def, p)
    return model.encoder(b[mod.INPUT_MODALITY].astype(config.dtype))[0]

  out = {
      "encoder_fwd": _flops(jax.jit(encode).lower(params, batch)),
      "loss_fwd": _flops(jax.jit(loss).lower(params, ema, batch, key)),
      "loss_fwd_bwd": _flops(jax.jit(jax.grad(loss)).lower(params, ema, batch, key)),
  }
  return {k: v / _FLOPS_BATCH for k, v in out.items()}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="full", choices=geomeld.PRESETS)
  parser.add_argument("--variants", default=",".join(convnextv2.VARIANTS),
                      help="comma-separated variants for the parameter table")
  parser.add_argument("--flops", default="atto",
                      help="comma-separated variants to cost (slow for big ones); '' for none")
  parser.add_argument("--image_size", type=int, default=mod.TILE_SIZE)
  args = parser.parse_args(argv)

  variants = [v for v in args.variants.split(",") if v]
  print(f"GeoMeld-FM preset {args.preset!r}: parameters (millions)")
  rows = {v: abstract_param_counts(geomeld.GeoMeldFMConfig.preset(args.preset, variant=v))
          for v in variants}
  columns = sorted({c for r in rows.values() for c in r} - {"total"}) + ["total"]
  print(f"{'variant':<8}" + "".join(f"{c:>16}" for c in columns))
  for v, r in rows.items():
    print(f"{v:<8}" + "".join(f"{r.get(c, 0) / 1e6:>16.3f}" for c in columns))

  for v in [v for v in args.flops.split(",") if v]:
    config = geomeld.GeoMeldFMConfig.preset(args.preset, variant=v)
    f = flops_per_sample(config, args.image_size)
    print(f"{v} @ {args.image_size}px GFLOPs/sample: encoder fwd {f['encoder_fwd'] / 1e9:.3f}, "
          f"loss fwd {f['loss_fwd'] / 1e9:.3f}, loss fwd+bwd {f['loss_fwd_bwd'] / 1e9:.3f}")


if __name__ == "__main__":
  main()
