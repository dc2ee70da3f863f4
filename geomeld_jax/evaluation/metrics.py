"""Evaluation metrics over a whole split (numpy, accumulated; never averaged per batch).

As the MMEarth protocol computes them with torchmetrics (geobench.md §3):
* multi-label micro-F1: sigmoid, then ``p > 0.5`` (strict, as torchmetrics), counts summed
  over every sample and class: F1 = 2 TP / (2 TP + FP + FN).
* top-1 accuracy (micro).
* macro IoU from one global confusion matrix, every class included (class 0 "no data" of
  cashew/SA-crop is a normal class); a class with no support and no prediction has an
  undefined IoU and weight 0 in the mean (current torchmetrics).
* retrieval R@K with several captions per image (objectives.md §6).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def multilabel_counts(logits: np.ndarray, targets: np.ndarray, threshold: float = 0.5
                      ) -> np.ndarray:
  """(TP, FP, FN) summed over samples and classes; logits and targets are (N, C)."""
  logits, targets = np.asarray(logits), np.asarray(targets)
  if logits.shape != targets.shape or logits.ndim != 2:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} must both be (N, C)")
  pred = _sigmoid(logits) > threshold
  true = targets > 0.5
  return np.array([np.sum(pred & true), np.sum(pred & ~true), np.sum(~pred & true)], np.int64)


def f1_from_counts(counts: np.ndarray) -> float:
  tp, fp, fn = (int(c) for c in counts)
  denom = 2 * tp + fp + fn
  return 2.0 * tp / denom if denom else 0.0


def multilabel_micro_f1(logits: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> float:
  """Micro-averaged F1 of sigmoid(logits) > threshold against 0/1 targets (N, C)."""
  if not len(targets):
    raise ValueError("multilabel_micro_f1 of an empty set")
  return f1_from_counts(multilabel_counts(logits, targets, threshold))


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of samples whose argmax logit is the label; logits (N, C), labels (N,)."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"logits must be (N, C) and labels (N,), got {logits.shape}, {labels.shape}")
  if not len(labels):
    raise ValueError("top1_accuracy of an empty set")
  return float(np.mean(np.argmax(logits, axis=1) == labels))


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
  """(num_classes, num_classes) counts, rows = true class, columns = predicted class."""
  pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
  if pred.shape != target.shape:
    raise ValueError(f"pred {pred.shape} and target {target.shape} differ in size")
  for name, a in (("pred", pred), ("target", target)):
    if a.size and (a.min() < 0 or a.max() >= num_classes):
      raise ValueError(f"{name} holds classes outside [0, {num_classes}): "
                       f"[{a.min()}, {a.max()}]")
  idx = target.astype(np.int64) * num_classes + pred.astype(np.int64)
  return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
  """IoU per class; NaN where a class has neither support nor predictions."""
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, tp / np.maximum(union, 1e-300), np.nan)


def macro_iou(confusion: np.ndarray) -> float:
  """Mean IoU over the classes that occur in the targets or predictions (all classes count)."""
  if not np.asarray(confusion).sum():
    raise ValueError("macro_iou of an empty set")
  iou = per_class_iou(confusion)
  return float(np.nanmean(iou))


def task_metric(kind: str, logits: np.ndarray, targets: np.ndarray,
                num_classes: int) -> tuple[str, float]:
  """(name, value in %) of the task's headline metric."""
  if kind == "multilabel":
    return "micro_f1", 100.0 * multilabel_micro_f1(logits, targets)
  if kind == "multiclass":
    return "top1_acc", 100.0 * top1_accuracy(logits, targets)
  if kind == "segmentation":
    pred = np.argmax(logits, axis=-1)
    return "miou", 100.0 * macro_iou(confusion_matrix(pred, targets, num_classes))
  raise ValueError(f"unknown task kind {kind!r}")


# ----------------------------------------------------------------------------------------
# Retrieval.
# ----------------------------------------------------------------------------------------


def retrieval_recalls(similarity: np.ndarray, images_of_text: Sequence[int | Sequence[int]],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Image->text and text->image R@K (%) and their mean ``mR``.

  Args:
    similarity: (N_images, N_texts) scores.
    images_of_text: per text, the image it belongs to, or every image it is a correct caption
      of (one text shared by several images: the same string must not count as a hit for
      one of them and a miss for the others). An image without captions is no i2t query.
    ks: the K values.

  i2t R@K: fraction of images with at least one of their captions among the top-K texts.
  t2i R@K: fraction of texts with at least one of their images among the top-K images.
  Ranks count strictly higher scores plus earlier-index ties (a stable sort on -S), in float32.
  """
  s = np.asarray(similarity, np.float32)
  n_img, n_txt = s.shape
  if len(images_of_text) != n_txt:
    raise ValueError(f"images_of_text must have {n_txt} entries for a {s.shape} similarity, "
                     f"got {len(images_of_text)}")
  relevant = np.zeros((n_img, n_txt), bool)
  for t, images in enumerate(images_of_text):
    images = np.atleast_1d(np.asarray(images, np.int64))
    if images.size == 0 or images.min() < 0 or images.max() >= n_img:
      raise ValueError(f"text {t} names images {images.tolist()}: need one or more in [0, {n_img})")
    relevant[images, t] = True
  # Rank of every text in each image's list, and of every image in each text's list.
  order_i2t = np.argsort(-s, axis=1, kind="stable")
  rank_i2t = np.empty_like(order_i2t)
  np.put_along_axis(rank_i2t, order_i2t, np.arange(n_txt)[None, :].repeat(n_img, 0), axis=1)
  order_t2i = np.argsort(-s, axis=0, kind="stable")
  rank_t2i = np.empty_like(order_t2i)
  np.put_along_axis(rank_t2i, order_t2i, np.arange(n_img)[:, None].repeat(n_txt, 1), axis=0)
  never = np.iinfo(np.int64).max
  best_text = np.where(relevant, rank_i2t, never).min(axis=1)  # per image: its best caption
  best_image = np.where(relevant, rank_t2i, never).min(axis=0)  # per text: its best image
  has_caption = relevant.any(axis=1)
  out: dict[str, float] = {}
  for k in ks:
    out[f"i2t_R@{k}"] = (100.0 * float(np.mean(best_text[has_caption] < k))
                         if has_caption.any() else 0.0)
  for k in ks:
    out[f"t2i_R@{k}"] = 100.0 * float(np.mean(best_image < k)) if n_txt else 0.0
  out["mR"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks]))
  return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample std (ddof=1; 0 for a single value) of per-seed results."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
