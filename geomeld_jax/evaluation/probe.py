"""Linear probing: frozen encoder -> pooled features (computed once, cached) -> LN + linear head.

MMEarth protocol (mmearth_peer.md §3.2): features = LayerNorm(global average pool of the last
stage), a new linear head (init std 2e-5), AdamW with weight decay, cosine per step to
``min_lr``, label smoothing (so2sat: smoothed CE; bigearthnet: BCE with targets mapped to
1-s / s). The learning rate is swept (``config.probe.lrs``); the lr with the best validation
score is kept and its test score reported (MMEarth reports the last epoch; so do we, for
that lr).

Features are cached as ``.npz`` (``np.load(allow_pickle=False)``), keyed by a string that
names the checkpoint, task, partition, split and band options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from geomeld_jax.evaluation import metrics

HEAD_INIT_STD = 2e-5
LN_EPS = 1e-6


# ----------------------------------------------------------------------------------------
# Frozen features.
# ----------------------------------------------------------------------------------------


def fit_to_stride(x: np.ndarray, stride: int, mode: str = "crop") -> np.ndarray:
  """(N, H, W, C) -> H, W multiples of the encoder stride.

  'crop' keeps the top-left multiple (what a strided torch conv does with the remainder);
  'pad' zero-pads bottom/right (zeros are what an invalid band already is).
  """
  h, w = x.shape[1:3]
  if h % stride == 0 and w % stride == 0:
    return x
  if mode == "crop":
    hh, ww = (h // stride) * stride, (w // stride) * stride
    if not hh or not ww:
      raise ValueError(f"{h}x{w} input is smaller than the encoder stride {stride}")
    return x[:, :hh, :ww]
  if mode == "pad":
    ph, pw = -h % stride, -w % stride
    return np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")


def make_pooled_fn(encoder: nnx.Module) -> Callable[[np.ndarray], np.ndarray]:
  """A jitted x (B, H, W, C) -> mean-pooled final features (B, D), encoder frozen."""
  graphdef, state = nnx.split(encoder)

  @jax.jit
  def pooled(state, x):
    feats, _ = nnx.merge(graphdef, state)(x, deterministic=True)
    return jnp.mean(feats.astype(jnp.float32), axis=(1, 2))

  return lambda x: np.asarray(pooled(state, jnp.asarray(x)))


def extract_features(encoder: nnx.Module, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pooled features and labels of every (x, y) batch; the last batch is padded (one compile)."""
  fn = make_pooled_fn(encoder)
  stride = encoder.stride
  feats, labels = [], []
  for x, y in batches:
    x = fit_to_stride(np.asarray(x, np.float32), stride)
    n = len(x)
    for i in range(0, n, batch_size):
      chunk = x[i:i + batch_size]
      pad = batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      feats.append(fn(chunk)[:batch_size - pad])
    labels.append(np.asarray(y))
  if not feats:
    raise ValueError("no samples to extract features from: the split is empty")
  return np.concatenate(feats), np.concatenate(labels)


class FeatureCache:
  """``<dir>/<sha1(key)>.npz`` holding ``features``, ``labels`` and the key (no pickle)."""

  def __init__(self, directory: str | pathlib.Path | None):
    self.dir = pathlib.Path(directory) if directory else None

  def path(self, key: str) -> pathlib.Path | None:
    if self.dir is None:
      return None
    return self.dir / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".npz")

  def get_or_compute(self, key: str, compute: Callable[[], tuple[np.ndarray, np.ndarray]]
                     ) -> tuple[np.ndarray, np.ndarray]:
    path = self.path(key)
    if path is not None and path.is_file():
      with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) == key:
          return z["features"], z["labels"]
    feats, labels = compute()
    if path is not None:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(".tmp.npz")
      np.savez(tmp, features=feats, labels=labels, key=np.str_(key))
      tmp.replace(path)
    return feats, labels


# ----------------------------------------------------------------------------------------
# The head and its training.
# ----------------------------------------------------------------------------------------


def exact_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
  """The dataclass's fields from a config section; a missing or unknown key is an error.

  The values live in configs/eval.py only: no dataclass default can silently stand in.
  """
  names = [f.name for f in dataclasses.fields(cls)]
  missing, unknown = sorted(set(names) - set(d)), sorted(set(d) - set(names))
  if missing or unknown:
    raise ValueError(f"{cls.__name__}: config lacks {missing}, has unknown keys {unknown}")
  return {n: d[n] for n in names}


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Hyper-parameters of one linear-probe fit (configs/eval.py: config.probe)."""

  lrs: tuple[float, ...]
  epochs: int
  batch_size: int
  weight_decay: float
  min_lr: float
  label_smoothing: float
  feature_batch_size: int

  @classmethod
  def from_config(cls, cfg: Any) -> "ProbeConfig":
    d = dict(cfg)
    d["lrs"] = tuple(float(v) for v in d["lrs"])
    return cls(**exact_fields(cls, d))


def init_head(key: jax.Array, dim: int, num_classes: int) -> dict[str, jax.Array]:
  return {"ln_scale": jnp.ones((dim,)), "ln_bias": jnp.zeros((dim,)),
          "w": HEAD_INIT_STD * jax.random.truncated_normal(key, -2.0, 2.0, (dim, num_classes)),
          "b": jnp.zeros((num_classes,))}


def head_logits(params: dict[str, jax.Array], feats: jax.Array) -> jax.Array:
  f = feats.astype(jnp.float32)
  mu = jnp.mean(f, -1, keepdims=True)
  var = jnp.mean(jnp.square(f - mu), -1, keepdims=True)
  f = (f - mu) * jax.lax.rsqrt(var + LN_EPS) * params["ln_scale"] + params["ln_bias"]
  return f @ params["w"] + params["b"]


def classification_loss(kind: str, logits: jax.Array, y: jax.Array, num_classes: int,
                        smoothing: float) -> jax.Array:
  """MMEarth's losses: smoothed BCE (targets 1-s / s) or smoothed softmax CE."""
  if kind == "multilabel":
    t = jnp.where(y > 0, 1.0 - smoothing, smoothing) if smoothing else y.astype(jnp.float32)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, t))
  onehot = jax.nn.one_hot(y, num_classes)
  onehot = optax.smooth_labels(onehot, smoothing) if smoothing else onehot
  return jnp.mean(optax.softmax_cross_entropy(logits, onehot))


def cosine_lr(base_lr, min_lr, step, total_steps):
  frac = jnp.clip(step / jnp.maximum(total_steps, 1), 0.0, 1.0)
  return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)  # no decay on LN and biases (timm)


def fit_head(train_feats: np.ndarray, train_y: np.ndarray, *, kind: str, num_classes: int,
             lr: float, cfg: ProbeConfig, seed: int = 0) -> dict[str, jax.Array]:
  """Trains LN + linear on frozen features; one compile per (shape, config), lr is traced."""
  n, dim = train_feats.shape
  bs = min(cfg.batch_size, n)
  steps_per_epoch = max(1, n // bs)
  total = steps_per_epoch * cfg.epochs
  tx = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(cfg.weight_decay, _decay_mask))
  key = jax.random.key(seed)
  k_init, k_perm = jax.random.split(key)
  params = init_head(k_init, dim, num_classes)
  opt_state = tx.init(params)
  feats = jnp.asarray(train_feats, jnp.float32)
  y = jnp.asarray(train_y)

  @jax.jit
  def run(params, opt_state, base_lr, k_perm):
    def epoch(carry, k):
      params, opt_state, step = carry
      perm = jax.random.permutation(k, n)[: steps_per_epoch * bs].reshape(steps_per_epoch, bs)

      def one(carry, idx):
        params, opt_state, step = carry
        loss, grads = jax.value_and_grad(
            lambda p: classification_loss(kind, head_logits(p, feats[idx]), y[idx], num_classes,
                                          cfg.label_smoothing))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        lr_t = cosine_lr(base_lr, cfg.min_lr, step, total)
        params = jax.tree.map(lambda p, u: p - lr_t * u, params, updates)
        return (params, opt_state, step + 1), loss

      (params, opt_state, step), losses = jax.lax.scan(one, (params, opt_state, step), perm)
      return (params, opt_state, step), jnp.mean(losses)

    (params, _, _), losses = jax.lax.scan(
        epoch, (params, opt_state, jnp.zeros((), jnp.int32)), jax.random.split(k_perm, cfg.epochs))
    return params, losses

  params, _ = run(params, opt_state, jnp.float32(lr), k_perm)
  return params


def predict(params: dict[str, jax.Array], feats: np.ndarray) -> np.ndarray:
  return np.asarray(jax.jit(head_logits)(params, jnp.asarray(feats, jnp.float32)))


@dataclasses.dataclass
class ProbeResult:
  metric: str
  test: float  # % of the lr with the best validation score
  best_lr: float
  val_by_lr: dict[float, float]
  params: dict[str, Any]

  @property
  def best_lr_at_grid_edge(self) -> bool:
    """The chosen lr is the sweep's smallest or largest: the optimum may lie outside it."""
    return len(self.val_by_lr) > 1 and self.best_lr in (min(self.val_by_lr), max(self.val_by_lr))


def linear_probe(train: tuple[np.ndarray, np.ndarray], valid: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray], *, kind: str, num_classes: int,
                 cfg: ProbeConfig, seed: int = 0) -> ProbeResult:
  """The lr sweep on cached features: fit per lr, choose on valid, report test."""
  if kind not in ("multilabel", "multiclass"):
    raise ValueError(f"linear probing is for classification tasks, not {kind!r}")
  val_by_lr, fits = {}, {}
  name = ""
  for lr in cfg.lrs:
    params = fit_head(*train, kind=kind, num_classes=num_classes, lr=lr, cfg=cfg, seed=seed)
    name, val_by_lr[lr] = metrics.task_metric(kind, predict(params, valid[0]), valid[1],
                                              num_classes)
    fits[lr] = params
  best = max(cfg.lrs, key=lambda lr: (val_by_lr[lr], -lr))
  _, test_score = metrics.task_metric(kind, predict(fits[best], test[0]), test[1], num_classes)
  return ProbeResult(name, test_score, best, val_by_lr, fits[best])


def cache_key(**parts: Any) -> str:
  return json.dumps(parts, sort_keys=True, default=str)


def task_features(encoder: nnx.Module, task, split: str, *, cache: FeatureCache, checkpoint_id: str,
                  batch_size: int, max_samples: int | None = None,
                  drop_bands: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
  """Pooled features of a GeoBenchTask split through the cache."""
  # The task's files by size and mtime: a folder converted again gets new features and labels.
  files = {f.name: f"{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(
      task.dir.glob("*.json"))}
  key = cache_key(checkpoint=checkpoint_id, task=task.info.name, dir=str(task.dir),
                  partition=task.partition, split=split, max_samples=max_samples,
                  drop=sorted(drop_bands), dup=sorted(task.duplicates.items()),
                  stats_divisor=task.stats_divisor, files=files)

  def compute():
    batches = ((b.x, b.y) for b in task.iter_batches(split, 256, max_samples=max_samples,
                                                      drop_bands=drop_bands))
    try:
      return extract_features(encoder, batches, batch_size=batch_size)
    except ValueError as e:
      raise ValueError(f"{task.info.name} split {split!r} ({task.partition} partition in "
                       f"{task.dir}): {e}") from None

  return cache.get_or_compute(key, compute)
