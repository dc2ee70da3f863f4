r"""GeoMeld-FM pretraining: ConvNeXtV2 on Sentinel-2 with MP-MAE (+ JEPA, + ITC).

The arg after the colon picks at most one token from each group:
  size:      smoke (CPU, tiny, on the embedded demo dataset) | atto | tiny | base
  objective: s2_mae | mp_mae | mp_mae_jepa | mp_mae_itc | full   (the paper's ablations)
Default: `atto,full`. Any field can be overridden with `--config.a.b=value`; an unknown key or
a value of the wrong type is an error that names it.

CPU smoke run (builds the demo dataset first when it is missing):
  python -m geomeld_jax.main --config=configs/pretrain.py:smoke --workdir=/tmp/geomeld_smoke

One GPU host (all local GPUs):
  launch/gpu.sh --config=configs/pretrain.py:atto,full --workdir=/data/runs/atto_full -- \
      --config.input.data_dir=/data/geomeld --config.input.global_batch_size=256

TPU pod slice (same SHA on every worker, one process per host):
  launch/tpu.sh run --config=configs/pretrain.py:tiny,full --workdir=gs://bucket/runs/tiny \
      --data-bucket=gs://data -- --config.input.data_dir=/tmp/gcsfuse/geomeld \
      --config.mesh="(('data',-1),('fsdp',4))"

Ablations as in the paper (LP/FT numbers in ../shared/design/ARCHITECTURE.md):
  for o in s2_mae mp_mae mp_mae_jepa mp_mae_itc full; do
    python -m geomeld_jax.main --config=configs/pretrain.py:atto,$o --workdir=runs/atto_$o; done
"""

import dataclasses

import ml_collections as mlc

from configs import common
from geomeld_jax.models import geomeld

SIZES = ("smoke", "atto", "tiny", "base")
OBJECTIVES = geomeld.PRESETS  # s2_mae, mp_mae, mp_mae_jepa, mp_mae_itc, full


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = common.parse_tokens(arg, groups={"size": SIZES, "objective": OBJECTIVES},
                            defaults={"size": "atto", "objective": "full"})
  smoke = arg["size"] == "smoke"
  config = mlc.ConfigDict()
  config.arg = f"{arg['size']},{arg['objective']}"
  config.seed = 0

  # --- Input -------------------------------------------------------------------------------
  config.input = dict(
      # A directory holding a dataset built by data_prep (or its parent).
      data_dir="/tmp/geomeld_demo" if smoke else "",
      # Build the synthetic demo dataset into data_dir when nothing is there (smoke only:
      # a real run must never silently train on synthetic data).
      build_demo_if_missing=smoke,
      demo_num_samples=512,  # 32 clusters of 16 tiles: enough blocks for a val split
      train_split="train",
      eval_split="val",
      global_batch_size=8 if smoke else 4096,
      # Random crop size (MMEarth crops 128 -> 112); must be divisible by the encoder stride.
      crop_size=32 if smoke else 128,
      text_len=32 if smoke else 64,
      num_workers=0 if smoke else 8,  # grain worker processes per host (0 = in-process)
      eval_batches=2 if smoke else 50,
  )

  # --- Model (every field of geomeld.GeoMeldFMConfig; the preset fills the ablation) --------
  size = {"smoke": "atto"}.get(arg["size"], arg["size"])
  model = dataclasses.asdict(geomeld.GeoMeldFMConfig.preset(arg["objective"], variant=size))
  model.update(compute_dtype="float32" if smoke else "bfloat16")
  if smoke:  # 32-px crops, patch 8 -> a 4x4 grid; narrow decoder and text tower
    model.update(patch_size=8, decoder_width=64, text_context=32, text_width=64, text_layers=2,
                 text_heads=2, embed_dim=64, jepa_min_context=2,
                 text_vocab_size=1000)  # the demo tokenizer has <= 1000 pieces
  config.model = model

  # --- Optimizer (AdamW, warmup + cosine; FCMAE/MMEarth recipe scaled to the batch) ---------
  config.total_steps = 300 if smoke else 100_000
  config.optim = dict(
      # Peak lr per 256 samples; the peak lr follows the global batch (the MAE/FCMAE linear
      # scaling rule), so `--config.input.global_batch_size=256` also rescales the lr.
      # smoke: 2.5e-4 at its batch of 8. At 4x that (1e-3), ITC at batch 8 squeezed the
      # encoder's features into one direction (feature_std 0.5 -> 0.1 within 20 steps), the
      # held-out ITC loss stayed at chance and the JEPA teacher followed (README, Measured).
      base_lr=0.008 if smoke else 1.5e-4,
      lr_batch_unit=256,
      min_lr=0.0,
      warmup_steps=20 if smoke else 5_000,
      total_steps=config.get_ref("total_steps"),
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.05,
      grad_clip_norm=1.0,
      mu_dtype="float32",  # Adam's first moment; "bfloat16" halves its memory
  )
  # A reference, not a value: it is recomputed whenever base_lr or the batch is overridden.
  # `--config.optim.lr=x` still sets the peak lr outright.
  config.optim.lr = (config.optim.get_ref("base_lr") * config.input.get_ref("global_batch_size")
                     / config.optim.get_ref("lr_batch_unit"))

  # --- Parallelism -------------------------------------------------------------------------
  # ('data', -1): every remaining device does data parallelism; raise fsdp to shard params
  # (and their optimizer moments) larger than min_size_to_shard_mb over that axis.
  config.mesh = (("data", -1), ("fsdp", 1))
  config.min_size_to_shard_mb = 4.0
  config.transfer_guard = "disallow"  # implicit host<->device copies are bugs: fail loudly

  # --- Logging, evaluation, checkpoints ----------------------------------------------------
  config.log_every = 10 if smoke else 100
  # Console shows these (regex); TensorBoard gets every metric (weights, counts, norms...).
  # feature_std / jepa/target_std: the student's / teacher's feature spread (collapse watch).
  config.console_metrics = r"^(eval/)?loss|^lr$|^grad_norm$|i2t_top1|feature_std|target_std"
  config.eval_every = 100 if smoke else 5_000
  config.checkpoint_every = 100 if smoke else 2_000
  config.keep_checkpoints = 2 if smoke else 3
  config.async_checkpoints = True
  config.export_at_end = True
  return config
