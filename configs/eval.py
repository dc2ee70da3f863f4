r"""Evaluation hyper-parameters: GEO-Bench linear probing and fine-tuning (MMEarth protocol).

The arg picks a size: `full` (the paper's protocol, GPU) or `smoke` (CPU, tiny). Launch:

  python -m geomeld_jax.evaluation.run --config=configs/eval.py:full \
      --checkpoints=random,imagenet:/weights/convnextv2_atto.safetensors,runs/atto_full/export/100000 \
      --tasks=m-bigearthnet,m-so2sat --geobench_dir=$GEO_BENCH_DIR --out=results/geobench

CPU smoke on the converted real BigEarthNet subset:
  python -m geomeld_jax.evaluation.bigearthnet_to_geobench --out=/tmp/geobench_ben
  python -m geomeld_jax.evaluation.run --config=configs/eval.py:smoke --checkpoints=random \
      --tasks=m-bigearthnet --geobench_dir=/tmp/geobench_ben --out=/tmp/eval_ben
"""

import ml_collections as mlc

from configs import common

SIZES = ("full", "smoke")


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = common.parse_tokens(arg, groups={"size": SIZES}, defaults={"size": "full"})
  smoke = arg["size"] == "smoke"
  config = mlc.ConfigDict()
  config.arg = arg["size"]
  config.seeds = (0, 1) if smoke else (0, 1, 2)
  config.partition = "default"  # or 0.01x_train ... 1.00x_train (label efficiency)
  config.modes = ("probe",)  # any of probe, finetune
  config.max_samples = 64 if smoke else -1  # per split; -1 = all
  # m-so2sat band_stats scale: MMEarth divides mean/std by 1e4 (geobench.md §3 doubts it).
  config.so2sat_stats_divisor = 1e4
  config.fill_missing = "task"  # 'task' (so2sat duplicates, MMEarth), 'mask' or 'duplicate'
  # Bands dropped at test time for the robustness rows (empty: none).
  config.drop_bands = ("B2", "B3", "B4")
  # Random-init baseline / ImageNet init: the encoder they build.
  config.baseline = dict(variant="atto", stem="patch", patch_size=8 if smoke else 16)

  # Linear probe (mmearth_peer.md §3.2: LP blr 1e-2 for Tiny; AdamW wd 0.3, 100 epochs).
  config.probe = dict(
      lrs=(1e-3, 1e-2) if smoke else (1e-3, 3e-3, 1e-2, 3e-2),
      epochs=20 if smoke else 100,
      batch_size=16 if smoke else 1024,
      weight_decay=0.3,
      min_lr=1e-6,
      label_smoothing=0.2,
      feature_batch_size=8 if smoke else 64,
  )

  # Fine-tuning (classification: 100 epochs, lr 8e-4 at batch 1024 for Atto, layer decay 0.9,
  # drop path 0.1, smoothing 0.2; segmentation: 200 epochs, encoder frozen for 50, lr 1.25e-3
  # at batch 32, plain CE).
  config.finetune = dict(
      lr=1e-3 if smoke else 8e-4,
      epochs=2 if smoke else 100,
      batch_size=4 if smoke else 64,
      accum_steps=2 if smoke else 16,  # batch_size x accum_steps = the batch of 1024 (MMEarth 64 x 16)
      weight_decay=0.3 if not smoke else 0.05,
      min_lr=1e-6,
      layer_decay=0.9,
      drop_path=0.1,
      label_smoothing=0.2,
      seg_lr=1.25e-3,
      seg_epochs=2 if smoke else 200,
      seg_freeze_epochs=1 if smoke else 50,
      seg_batch_size=4 if smoke else 32,
      decoder_width=32 if smoke else 256,
  )
  return config
