"""Evaluate frozen features: kNN, linear probe, dense (segmentation) probe, retrieval.

The papers judge a self-supervised backbone without fine-tuning it: features are extracted
once with the backbone frozen, then a cheap model is fitted on top.

- weighted kNN (DINO): no training at all; measures whether neighbours in feature space share
  a label.
- linear probe: a linear classifier on [CLS] (optionally concatenated with the mean patch
  token); measures linear separability of the global representation.
- dense linear probe: a linear layer on every patch token, upsampled to the mask; mIoU.
  Measures the quality of local features (DINOv3's headline number on ADE20k). `dense_probe`
  is the version to trust on small data: patch-grid targets, class-balanced loss, a sweep
  validated on held-out images, per-class IoU, next to `majority_baseline` and a raw-pixel
  probe (`patchify`).
- patch-similarity agreement: label-free; does cosine similarity of patch features tell which
  patches belong to the same object (ROC AUC over patch pairs)?
- retrieval: nearest neighbours by cosine similarity; mAP and recall@k.
- paired sign test: whether one model beats another on the same queries by more than chance.

Everything works from plain tensors; `extract_features` produces them from a model. One module per idea:
features.py, knn.py, linear.py, dense.py, retrieval.py, paired.py; the names below are the package's public API.
"""
from dinolite.eval.dense import (
    class_balanced_weights,
    confusion_matrix,
    dense_linear_probe,
    dense_logits,
    dense_probe,
    majority_baseline,
    masks_to_patches,
    miou_from_confusion,
    patch_similarity_agreement,
    patchify,
    roc_auc,
)
from dinolite.eval.features import cls_mean_patch, extract_features, image_to_tensor
from dinolite.eval.knn import knn_accuracy, knn_classify, knn_vote, search
from dinolite.eval.linear import LinearProbe, linear_probe
from dinolite.eval.paired import paired_sign_test
from dinolite.eval.retrieval import average_precision, retrieval_metrics, retrieve
