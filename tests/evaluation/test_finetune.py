"""Fine-tuning: layer ids / lr scales, and one tiny classification and segmentation run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import eval as eval_config
from geomeld_jax.evaluation import finetune
from geomeld_jax.evaluation import geobench
from geomeld_jax.evaluation import probe

CFG = finetune.FinetuneConfig.from_config({
    **eval_config.get_config("smoke").finetune, **dict(
        lr=1e-3, epochs=1, batch_size=4, seg_lr=1e-3, seg_epochs=2, seg_freeze_epochs=1,
        seg_batch_size=4, decoder_width=16)})


def test_layer_ids_follow_mmearth_single_rule(tiny_encoder):
  depths = tiny_encoder.depths
  params = nnx.state(tiny_encoder, nnx.Param)
  ids = {}
  for path, _ in __import__("jax").tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    ids[keys[:3]] = finetune.encoder_layer_id(path, depths)
  head_id = sum(depths) + 1
  # One id per block, counted through the stages; a downsampler shares its next stage's first id.
  for s, depth in enumerate(depths):
    for b in range(depth):
      assert ids[("stages", s, b)] == sum(depths[:s]) + b + 1
  for i in range(len(depths) - 1):
    downsampler = [v for k, v in ids.items() if k[0].startswith("downsample") and k[1] == i]
    assert downsampler and set(downsampler) == {sum(depths[:i]) + 1}
  # MMEarth's stem modules match no rule and fall to the head's id (lr scale 1).
  assert {v for k, v in ids.items() if k[0].startswith("stem")} == {head_id}
  scales = finetune.lr_scales(nnx.State({"encoder": params}), 0.9, depths)
  block = scales["encoder"]["stages"][len(depths) - 1][depths[-1] - 1]
  assert np.isclose(float(__import__("jax").tree.leaves(block)[0]), 0.9)


def _split(n, seg, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 32, 32, 12)).astype(np.float32)
  y = (x[..., 0] > 0).astype(np.int32) if seg else (x[:, :, :, 1].mean((1, 2)) > 0).astype(np.int32)
  return geobench.Split(x, y, np.ones(12, bool), [str(i) for i in range(n)])


def test_classification_and_segmentation_finetune_run(tiny_encoder):
  before = np.asarray(tiny_encoder.stages[0][0].dwconv.kernel[...]).copy()
  name, score = finetune.finetune_task(tiny_encoder, _split(8, False, 0), _split(4, False, 1),
                                       kind="multiclass", num_classes=2, cfg=CFG)
  assert name == "top1_acc" and 0.0 <= score <= 100.0
  # 4 training tiles: one step per epoch, the shapes and freeze step of the next two tests, so
  # the three share two compiled segmentation steps (frozen and trained encoder).
  name, score = finetune.finetune_task(tiny_encoder, _split(4, True, 0), _split(4, True, 1),
                                       kind="segmentation", num_classes=2, cfg=CFG)
  assert name == "miou" and 0.0 <= score <= 100.0
  # The source encoder is never modified (fine-tuning trains a copy).
  np.testing.assert_array_equal(before, np.asarray(tiny_encoder.stages[0][0].dwconv.kernel[...]))


def test_frozen_phase_leaves_encoder_untouched(tiny_encoder):
  cfg = CFG  # drop path on, as in the other segmentation runs: their compiled steps are shared
  model = finetune.build_task_model(tiny_encoder, "segmentation", 2, cfg)
  enc_before = np.asarray(model.encoder.stem_conv.kernel[...]).copy()
  head_before = np.asarray(model.head.cls.kernel[...]).copy()
  s = _split(4, True, 2)
  finetune.train(model, s.x, s.y, kind="segmentation", num_classes=2, lr=1e-2, epochs=1,
                 batch_size=4, cfg=cfg, freeze_epochs=1)
  np.testing.assert_array_equal(enc_before, np.asarray(model.encoder.stem_conv.kernel[...]))
  assert not np.allclose(head_before, np.asarray(model.head.cls.kernel[...]))


def test_frozen_step_runs_no_encoder_backward(tiny_encoder):
  """The frozen phase's step skips the encoder's backward: at least 1.5x its forward less work."""
  model = finetune.build_task_model(tiny_encoder, "segmentation", 2, CFG)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-3)
  step = finetune.make_step(graphdef, rest, tx, jax.tree.map(jnp.ones_like, params),
                            kind="segmentation", num_classes=2, smoothing=0.0)
  xb, yb = jnp.zeros((1, 4, 32, 32, 12)), jnp.zeros((1, 4, 32, 32), jnp.int32)

  def flops(train_encoder):
    lowered = step.lower(params, tx.init(params), xb, yb, jax.random.key(0), jnp.float32(1e-3),
                         train_encoder=train_encoder)
    return lowered.cost_analysis()["flops"]

  encoder_forward = jax.jit(lambda x: model.encoder(x)[0]).lower(xb[0]).cost_analysis()["flops"]
  assert encoder_forward > 0
  assert flops(True) - flops(False) >= 1.5 * encoder_forward, (flops(True), flops(False),
                                                               encoder_forward)


def test_unfrozen_encoder_takes_a_fresh_adam_step(tiny_encoder):
  """Epoch 0 frozen, epoch 1 trained: the encoder's first update is Adam's first step.

  Adam's first step is lr * scale * g / (|g| + eps), i.e. +-lr * scale where |g| >> eps (biases
  and norms: no weight decay). Moments kept through the frozen epoch would blend the frozen
  epoch's gradient into it (torch skips frozen parameters entirely). Drop path (on, to share
  the other runs' compiled steps) changes the gradient but not that sign step.
  """
  cfg = CFG
  model = finetune.build_task_model(tiny_encoder, "segmentation", 2, cfg)
  bias_before = np.asarray(model.encoder.downsample_convs[0].bias[...]).copy()
  s = _split(4, True, 2)
  lr = 1e-2
  finetune.train(model, s.x, s.y, kind="segmentation", num_classes=2, lr=lr, epochs=2,
                 batch_size=4, cfg=cfg, freeze_epochs=1)
  step = np.abs(np.asarray(model.encoder.downsample_convs[0].bias[...]) - bias_before)
  scales = finetune.lr_scales(nnx.state(model, nnx.Param), cfg.layer_decay, tiny_encoder.depths)
  scale = float(scales["encoder"]["downsample_convs"][0]["bias"])
  assert 0 < scale < 1  # a layer-decayed parameter
  expected = float(probe.cosine_lr(lr, cfg.min_lr, 1, 2)) * scale
  np.testing.assert_allclose(np.median(step / expected), 1.0, rtol=1e-3)
  assert np.mean(np.abs(step / expected - 1.0) < 1e-2) > 0.9, step / expected


def test_accumulated_micro_batches_step_like_one_big_batch(tiny_encoder):
  cfg = dataclasses.replace(CFG, drop_path=0.0)  # no randomness: the two must match
  s = _split(8, False, 3)
  params = []
  for batch_size, accum_steps in ((8, 1), (4, 2)):
    model = finetune.build_task_model(tiny_encoder, "multiclass", 2, cfg)
    finetune.train(model, s.x, s.y, kind="multiclass", num_classes=2, lr=1e-2, epochs=1,
                   batch_size=batch_size, accum_steps=accum_steps, cfg=cfg)
    params.append(np.asarray(model.head.fc.kernel[...]))
  np.testing.assert_allclose(params[0], params[1], rtol=1e-4, atol=1e-6)
  assert not np.allclose(params[0], finetune.build_task_model(tiny_encoder, "multiclass", 2, cfg)
                         .head.fc.kernel[...])  # it did step
