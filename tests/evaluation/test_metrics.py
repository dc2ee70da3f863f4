"""Metrics against hand-counted cases."""

import numpy as np
import pytest

from geomeld_jax.evaluation import metrics


def test_micro_f1_hand_counted():
  # logits > 0 <=> sigmoid > 0.5. Predictions: [1,0,1], [0,1,1]; targets: [1,1,0], [0,1,1].
  logits = np.array([[2.0, -1.0, 0.3], [-0.5, 1.0, 4.0]])
  targets = np.array([[1, 1, 0], [0, 1, 1]])
  # TP = 3 (0,0),(1,1),(1,2); FP = 1 (0,2); FN = 1 (0,1) -> F1 = 6 / 8.
  assert metrics.multilabel_counts(logits, targets).tolist() == [3, 1, 1]
  assert metrics.multilabel_micro_f1(logits, targets) == pytest.approx(0.75)
  # Exactly 0.5 is not positive (torchmetrics uses a strict >).
  assert metrics.multilabel_micro_f1(np.zeros((1, 2)), np.array([[1, 0]])) == 0.0


def test_top1_accuracy():
  logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.1, 0.2], [1.0, 0.0, 0.5]])
  assert metrics.top1_accuracy(logits, np.array([1, 0, 1, 2])) == pytest.approx(0.5)


def test_macro_iou_counts_every_class_and_skips_absent_ones():
  target = np.array([[0, 0, 1], [1, 2, 2]])
  pred = np.array([[0, 1, 1], [1, 2, 0]])
  cm = metrics.confusion_matrix(pred, target, num_classes=4)
  # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2;
  # class 3: no support, no prediction -> excluded.
  iou = metrics.per_class_iou(cm)
  np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 1 / 2])
  assert np.isnan(iou[3])
  assert metrics.macro_iou(cm) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
  # A class that is predicted but absent from the truth counts with IoU 0.
  cm2 = metrics.confusion_matrix(np.array([3, 0]), np.array([0, 0]), 4)
  assert metrics.macro_iou(cm2) == pytest.approx((0.5 + 0.0) / 2)
  with pytest.raises(ValueError, match="outside"):
    metrics.confusion_matrix(np.array([5]), np.array([0]), 4)


def test_retrieval_perfect_and_several_captions():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(6, 8))
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  image_of = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5])  # several captions for some images
  txt = img[image_of]  # captions identical to their image embedding
  r = metrics.retrieval_recalls(img @ txt.T, image_of)
  assert all(v == pytest.approx(100.0) for v in r.values())
  # Hand-built case: 3 images, 4 captions (image 0 has two).
  image_of = np.array([0, 0, 1, 2])
  s = np.array([[0.1, 0.9, 0.2, 0.3],   # image 0: its 2nd caption ranks first -> i2t R@1 hit
                [0.8, 0.0, 0.1, 0.7],   # image 1: its caption (col 2) ranks 3rd
                [0.0, 0.1, 0.0, 0.2]])  # image 2: its caption (col 3) ranks 1st
  r = metrics.retrieval_recalls(s, image_of, ks=(1, 2))
  assert r["i2t_R@1"] == pytest.approx(200 / 3) and r["i2t_R@2"] == pytest.approx(200 / 3)
  # t2i: caption 0 -> images ranked [1, 0, 2]: rank 1; caption 1 -> [0, ...]: rank 0;
  # caption 2 -> [0, 1, 2] tie 0.2 vs 0.1: image 1 rank 1; caption 3 -> [1, 0, 2]: image 2 rank 2.
  assert r["t2i_R@1"] == pytest.approx(25.0) and r["t2i_R@2"] == pytest.approx(75.0)
  assert r["mR"] == pytest.approx(np.mean([200 / 3, 200 / 3, 25.0, 75.0]))


def test_retrieval_counts_a_caption_shared_by_two_images_for_both():
  """Template captions repeat: "a forest" belongs to images 0 and 1, so retrieving it for
  either is a hit (scored per copy, image 1's copy lost to image 0's on the index tie)."""
  s = np.array([[0.9, 0.1],    # texts: 0 = "a forest" (images 0 and 1), 1 = "a lake" (image 2)
                [0.9, 0.2],
                [0.0, 0.8]])
  r = metrics.retrieval_recalls(s, [[0, 1], [2]], ks=(1,))
  assert r["i2t_R@1"] == pytest.approx(100.0) and r["t2i_R@1"] == pytest.approx(100.0)
  per_copy = metrics.retrieval_recalls(np.array([[0.9, 0.9, 0.1], [0.9, 0.9, 0.2], [0.0, 0.0, 0.8]]),
                                       [0, 1, 2], ks=(1,))
  assert per_copy["i2t_R@1"] == pytest.approx(200 / 3)  # the bias the sets remove
  with pytest.raises(ValueError, match="text 1 names images"):
    metrics.retrieval_recalls(s, [[0], []], ks=(1,))


def test_mean_std():
  assert metrics.mean_std([1.0, 3.0]) == pytest.approx((2.0, np.sqrt(2.0)))
  assert metrics.mean_std([5.0]) == (5.0, 0.0)
