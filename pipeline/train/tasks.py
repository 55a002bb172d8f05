"""What changes with the MedMNIST task: training targets, loss, scores, metrics, the prediction summary.

As MedMNIST's own experiments do: multi-class and ordinal-regression sets train with a softmax and
cross-entropy; binary-class sets are stored with 2 classes and train as a 2-way softmax (MedMNIST's
AUC/ACC then read the last column); multi-label sets (ChestMNIST) train with one sigmoid per label
and binary cross-entropy. AUC and ACC are always `medmnist.evaluator.getAUC/getACC` with the task string.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from medmnist.evaluator import getACC, getAUC
from sklearn.metrics import confusion_matrix, roc_auc_score

from pipeline.params import MEDMNIST_TASKS

MULTI_LABEL = "multi-label, binary-class"


def check(task: str) -> str:
    if task not in MEDMNIST_TASKS:
        raise ValueError(f"unknown task {task!r}; MedMNIST's tasks are: {', '.join(MEDMNIST_TASKS)}")
    return task


def targets(labels: np.ndarray | torch.Tensor, task: str) -> torch.Tensor:
    """Labels as stored ((N, 1) or (N, L)) -> what the loss takes: (N,) int64 class indices, or
    (N, L) float32 0/1 for multi-label. Convert once, when the split moves to the device."""
    labels = torch.as_tensor(labels)
    if check(task) == MULTI_LABEL:
        return labels.float()
    return labels.reshape(-1).long()


def loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Mean loss of a batch; `labels` from `targets` (stored-shape labels are converted here too)."""
    if check(task) == MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels.reshape(-1).long())


def scores(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Per-class probabilities in float32: a sigmoid per label (multi-label) or a softmax over classes."""
    logits = logits.float()
    return torch.sigmoid(logits) if check(task) == MULTI_LABEL else torch.softmax(logits, dim=1)


def evaluate(labels: np.ndarray, scores: np.ndarray, task: str) -> dict[str, float]:
    """MedMNIST's AUC and ACC. `labels` as stored ((N, 1) or (N, L)), or (N,) for single-label sets."""
    labels = np.asarray(labels)
    return {"auc": float(getAUC(labels, scores, check(task))), "acc": float(getACC(labels, scores, task))}


def predictions(scores: np.ndarray, task: str) -> np.ndarray:
    """Hard predictions: the arg-max class (N,), or each label above 0.5 (N, L) as MedMNIST's ACC counts them."""
    return (scores > 0.5).astype(np.int64) if check(task) == MULTI_LABEL else scores.argmax(axis=1)


def prediction_summary(labels: np.ndarray, scores: np.ndarray, task: str, n_classes: int) -> dict:
    """What the predictions look like on a split, where it means something.

    Single-label tasks: {"kind": "confusion", "matrix": (K, K) counts (rows actual, columns predicted),
    "pairs": [{"actual", "predicted"}, ...] (the rows of a DVC confusion plot)}.
    Multi-label: {"kind": "per_label", "rows": [{"label", "positives", "positives_of", "predicted_positives", "auc",
    "acc"}, ...]}; a confusion matrix over label sets would mean nothing. A label whose split has only
    one value has no AUC (None).
    """
    labels = np.asarray(labels)
    predicted = predictions(scores, task)
    if task != MULTI_LABEL:
        actual = labels.reshape(-1)
        matrix = confusion_matrix(actual, predicted, labels=range(n_classes))
        return {"kind": "confusion", "matrix": matrix,
                "pairs": [{"actual": int(a), "predicted": int(p)} for a, p in zip(actual, predicted)]}
    rows = []
    for label in range(labels.shape[1]):
        y = labels[:, label]
        one_value = y.min() == y.max()
        rows.append({"label": label, "positives": int(y.sum()), "positives_of": len(y),
                     "predicted_positives": int(predicted[:, label].sum()),
                     "auc": None if one_value else float(roc_auc_score(y, scores[:, label])),
                     "acc": float((predicted[:, label] == y).mean())})
    return {"kind": "per_label", "rows": rows}
