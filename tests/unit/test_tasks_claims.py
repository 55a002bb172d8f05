"""Claims about what changes with the MedMNIST task: targets, loss, scores, metrics, predictions.

Every value is checked against an independent computation: the cross-entropy and binary
cross-entropy written out by hand, MedMNIST's own getAUC/getACC, sklearn's confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medmnist.evaluator import getACC, getAUC
from sklearn.metrics import confusion_matrix, roc_auc_score

from pipeline.params import MEDMNIST_TASKS
from pipeline.train import tasks

SINGLE_LABEL = ("multi-class", "binary-class", "ordinal-regression")
ML = "multi-label, binary-class"


def test_check_accepts_exactly_medmnist_tasks():
    assert tasks.MULTI_LABEL == ML and ML in MEDMNIST_TASKS
    for task in MEDMNIST_TASKS:
        assert tasks.check(task) == task
    for wrong in ("multiclass", "", "multi-label"):
        with pytest.raises(ValueError, match=f"unknown task '{wrong}'; MedMNIST's tasks are: multi-class, "
                                             "multi-label, binary-class, binary-class, ordinal-regression"):
            tasks.check(wrong)
    for fn in (lambda t: tasks.targets(np.zeros((2, 1)), t), lambda t: tasks.scores(torch.zeros(2, 2), t),
               lambda t: tasks.loss(torch.zeros(2, 2), torch.zeros(2), t),
               lambda t: tasks.predictions(np.zeros((2, 2)), t),
               lambda t: tasks.evaluate(np.array([[0], [1]]), np.array([[.2, .8], [.7, .3]]), t)):
        with pytest.raises(ValueError, match="unknown task 'nope'"):
            fn("nope")


@pytest.mark.parametrize("task", SINGLE_LABEL)
def test_single_label_targets_are_flat_int64_class_indices(task):
    stored = np.array([[2], [0], [1]], dtype=np.uint8)
    for labels in (stored, torch.from_numpy(stored), stored.reshape(-1)):
        t = tasks.targets(labels, task)
        assert t.dtype == torch.int64 and t.shape == (3,) and t.tolist() == [2, 0, 1]


def test_multi_label_targets_are_float_zero_one_in_stored_shape():
    stored = np.array([[1, 0, 1], [0, 0, 1]], dtype=np.uint8)
    t = tasks.targets(stored, ML)
    assert t.dtype == torch.float32 and t.shape == (2, 3) and t.tolist() == [[1, 0, 1], [0, 0, 1]]


LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, -3.0], [-1.0, 4.0, 1.0], [0.0, 0.0, 2.0]])


@pytest.mark.parametrize("task", SINGLE_LABEL)
def test_single_label_loss_is_the_mean_cross_entropy(task):
    y = np.array([[0], [2], [1], [1]])
    log_softmax = LOGITS - torch.log(torch.exp(LOGITS).sum(1, keepdim=True))
    by_hand = -log_softmax[torch.arange(4), torch.from_numpy(y[:, 0])].mean()
    for labels in (tasks.targets(y, task), torch.from_numpy(y)):     # targets, or stored shape
        loss = tasks.loss(LOGITS, labels, task)
        assert loss.shape == () and torch.isclose(loss, by_hand, rtol=1e-6)


def test_multi_label_loss_is_the_mean_binary_cross_entropy_per_label():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=np.uint8)
    p = torch.sigmoid(LOGITS.double())
    yt = torch.from_numpy(y).double()
    by_hand = -(yt * torch.log(p) + (1 - yt) * torch.log(1 - p)).mean()
    assert torch.isclose(tasks.loss(LOGITS, tasks.targets(y, ML), ML).double(), by_hand, rtol=1e-6)
    # Stored (integer) labels are converted to the logits' dtype here too.
    loss = tasks.loss(LOGITS.double(), torch.from_numpy(y), ML)
    assert loss.dtype == torch.float64 and torch.isclose(loss, by_hand, rtol=1e-12)


def test_scores_are_float32_softmax_over_classes_or_sigmoid_per_label():
    logits = LOGITS.to(torch.bfloat16)
    f = logits.float()
    for task in SINGLE_LABEL:
        s = tasks.scores(logits, task)
        by_hand = torch.exp(f) / torch.exp(f).sum(1, keepdim=True)
        assert s.dtype == torch.float32 and torch.allclose(s, by_hand, atol=1e-6)
    s = tasks.scores(logits, ML)
    assert s.dtype == torch.float32 and torch.allclose(s, 1 / (1 + torch.exp(-f)), atol=1e-6)


# Scores chosen so that every task string gives different MedMNIST metrics (not normalised, so the
# binary-class reading of the last column differs from the multi-class arg-max and per-class AUC).
EVAL_SCORES = np.array([[0.9, 0.6], [0.2, 0.1], [0.4, 0.45], [0.8, 0.7], [0.1, 0.9], [0.3, 0.2]], dtype=np.float32)
EVAL_LABELS = np.array([[1], [0], [1], [0], [1], [0]])
ML_LABELS = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 1], [0, 1]])


@pytest.mark.parametrize("task", MEDMNIST_TASKS)
def test_evaluate_is_medmnists_auc_and_acc_for_the_task(task):
    labels = ML_LABELS if task == ML else EVAL_LABELS
    got = tasks.evaluate(labels, EVAL_SCORES, task)
    want = {"auc": getAUC(labels, EVAL_SCORES, task), "acc": getACC(labels, EVAL_SCORES, task)}
    assert got == pytest.approx(want, abs=0) and set(got) == {"auc", "acc"}
    assert all(type(v) is float for v in got.values())
    if task != ML:   # (N,) labels and a list give the same
        assert tasks.evaluate(list(labels.reshape(-1)), EVAL_SCORES, task) == got


def test_the_metric_inputs_tell_the_tasks_apart():
    results = {t: tasks.evaluate(ML_LABELS if t == ML else EVAL_LABELS, EVAL_SCORES, t) for t in MEDMNIST_TASKS}
    assert results["binary-class"]["auc"] != results["multi-class"]["auc"]
    assert results["binary-class"]["acc"] != results["multi-class"]["acc"]


def test_predictions_are_the_argmax_or_each_label_strictly_above_one_half():
    scores = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.51], [0.1, 0.2, 0.7]])
    for task in SINGLE_LABEL:
        p = tasks.predictions(scores, task)
        assert p.tolist() == [1, 0, 2] and p.shape == (3,)
    p = tasks.predictions(scores, ML)
    assert p.dtype == np.int64 and p.tolist() == [[0, 0, 0], [1, 0, 1], [0, 0, 1]]   # 0.5 is not above 0.5


def test_single_label_summary_is_sklearns_confusion_matrix_over_all_classes():
    labels = np.array([[0], [1], [1], [0], [1], [0]])
    scores = np.array([[.7, .2, .1], [.2, .7, .1], [.6, .3, .1], [.1, .1, .8], [.1, .8, .1], [.9, .05, .05]])
    for task in SINGLE_LABEL:
        summary = tasks.prediction_summary(labels, scores, task, 4)   # classes 2 and 3 never predicted/actual
        predicted = scores.argmax(1)
        assert summary["kind"] == "confusion" and set(summary) == {"kind", "matrix", "pairs"}
        assert np.array_equal(summary["matrix"], confusion_matrix(labels[:, 0], predicted, labels=[0, 1, 2, 3]))
        assert summary["matrix"].shape == (4, 4) and summary["matrix"][0].tolist() == [2, 0, 1, 0]
        assert summary["pairs"] == [{"actual": a, "predicted": p} for a, p in [(0, 0), (1, 1), (1, 0), (0, 2),
                                                                               (1, 1), (0, 0)]]
        assert all(type(v) is int for pair in summary["pairs"] for v in pair.values())


def test_multi_label_summary_has_one_row_per_label_and_no_auc_where_a_label_has_one_value():
    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1], [1, 0, 1]])
    scores = np.array([[.9, .4, .7], [.6, .2, .3], [.4, .7, .8], [.1, .5, .9], [.8, .1, .2]])
    summary = tasks.prediction_summary(labels, scores, ML, 3)
    assert summary["kind"] == "per_label" and set(summary) == {"kind", "rows"}
    rows = summary["rows"]
    assert [r["label"] for r in rows] == [0, 1, 2]
    assert [r["positives"] for r in rows] == [3, 0, 5] and [r["positives_of"] for r in rows] == [5, 5, 5]
    assert [r["predicted_positives"] for r in rows] == [3, 1, 3]
    assert rows[0]["auc"] == roc_auc_score(labels[:, 0], scores[:, 0]) == pytest.approx(5 / 6)
    assert rows[1]["auc"] is None and rows[2]["auc"] is None      # all 0, all 1: no AUC
    assert [r["acc"] for r in rows] == [0.6, 0.8, 0.6]
    for r in rows:
        assert set(r) == {"label", "positives", "positives_of", "predicted_positives", "auc", "acc"}
        assert all(type(r[k]) is int for k in ("label", "positives", "positives_of", "predicted_positives"))
        assert type(r["acc"]) is float and (r["auc"] is None or type(r["auc"]) is float)
