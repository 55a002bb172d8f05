"""Claims about the CNN training loop: the lr sequence of every scheduler, the returned model is
the best-validation one by `select_by` (not the last), the optimiser gets lr and weight decay,
augmentation reaches the training batches as configured, evaluation changes neither mode nor weights.

A scripted model makes validation scores exact: in eval mode its logits come from a table indexed
by the number of training steps taken (a buffer, so it travels with the state dict)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from medmnist.evaluator import getACC, getAUC
from torch import nn

from pipeline.errors import StageError
from pipeline.params import Cnn
from pipeline import devices
from pipeline.train import augment, cnn_loop
from pipeline.train.cnn_loop import DeviceSplit

CPU = torch.device("cpu")
VAL_LABELS = np.array([0, 1, 2, 0, 1, 2])
# Validation logits after 0, 1, 2, 3 training steps (one step per epoch below).
TABLE = torch.tensor([
    [[0, 0, 0]] * 6,                                                          # before training
    [[1, 1.9, 2.9], [.9, 2, 2.9], [.9, 1.9, 3], [1, 1.9, 2.9], [.9, 2, 2.9], [.9, 1.9, 3]],  # AUC 1, ACC 1/3
    [[5, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0], [0, 0, 5], [5, 0, 0]],       # ACC 4/6, AUC < 1
    [[0, 0, 0]] * 6,                                                          # last: AUC 0.5, ACC 1/3
], dtype=torch.float32)


def _split(labels, size=4, offset=0) -> DeviceSplit:
    n = len(labels)
    images = torch.zeros(n, size, size, 3, dtype=torch.uint8)
    images[:, :, :, :] = torch.arange(offset, offset + n, dtype=torch.uint8)[:, None, None, None]   # pixel = index
    images[:, 0, 1, 1] = 200   # something asymmetric for flips
    labels = np.asarray(labels, dtype=np.int64)
    return DeviceSplit(images, torch.from_numpy(labels), labels)


class Scripted(nn.Module):
    def __init__(self, table=TABLE):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -0.2, 0.1]))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.table = table
        self.train_inputs: list[torch.Tensor] = []

    def forward(self, x):
        if self.training:
            self.steps += 1
            self.train_inputs.append(x.detach().clone())
            return self.w.expand(len(x), -1) + 0 * x.mean()
        index = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
        return self.table[min(int(self.steps), len(self.table) - 1)][index] + 0 * self.w


def _splits(n_train=8):
    return {"train": _split([0] * n_train), "val": _split(VAL_LABELS), "test": _split(VAL_LABELS)}


def _cfg(**kw) -> Cnn:
    base = dict(epochs=3, batch_size=4, eval_batch_size=4, lr=0.1, scheduler="none", log_every=1000,
                max_steps_per_epoch=1)
    base.update(kw)
    return Cnn(**base)


def _train(cfg, splits=None, model=None, seed=0, **kw):
    model = model or Scripted()
    logs = []
    result = cnn_loop.train(model, splits or _splits(), cfg, seed, lambda m, s: logs.append((dict(m), s)), **kw)
    return model, result, logs


def test_the_scripted_epochs_score_as_designed():
    aucs, accs = [], []
    for logits in TABLE[1:]:
        scores = torch.softmax(logits, 1).numpy()
        aucs.append(getAUC(VAL_LABELS, scores, "multi-class"))
        accs.append(getACC(VAL_LABELS, scores, "multi-class"))
    assert np.argmax(aucs) == 0 and np.argmax(accs) == 1 and aucs[0] == 1.0
    assert aucs[2] < max(aucs) and accs[2] < max(accs)


@pytest.mark.parametrize("select_by,best", [("auc", 1), ("acc", 2)])
def test_returned_model_is_the_best_validation_one_by_select_by_not_the_last(select_by, best):
    model, result, logs = _train(_cfg(select_by=select_by))
    epoch_logs = [m for m, _ in logs if "epoch_val_auc" in m]
    assert len(epoch_logs) == 3
    metric = [m[f"epoch_val_{select_by}"] for m in epoch_logs]
    assert result.best_epoch == best == int(np.argmax(metric)) + 1
    assert int(model.steps) == best                       # the weights (state) of the best epoch
    val, _ = cnn_loop.evaluate(model, _splits()["val"], 4)
    assert val == result.best_val
    assert result.best_val[select_by] == max(metric)
    assert torch.equal(result.best_state["steps"], torch.tensor(best))


def test_a_later_epoch_must_be_strictly_better_to_replace_the_best():
    table = torch.stack([TABLE[0], TABLE[1], TABLE[1], TABLE[3]])
    model, result, _ = _train(_cfg(select_by="auc"), model=Scripted(table))
    assert result.best_epoch == 1 and int(model.steps) == 1


def _lr_formula(cfg: Cnn, epoch: int) -> float:
    if cfg.scheduler == "cosine":
        return cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2
    if cfg.scheduler == "step":
        return cfg.lr * cfg.step_gamma ** (epoch // cfg.step_size)
    return cfg.lr


@pytest.mark.parametrize("options", [{"scheduler": "cosine", "epochs": 5}, {"scheduler": "step", "epochs": 6,
                                     "step_size": 2, "step_gamma": 0.5}, {"scheduler": "step", "epochs": 4},
                                     {"scheduler": "none", "epochs": 3}])
def test_every_scheduler_gives_the_lr_sequence_its_params_say(options):
    cfg = _cfg(**options)
    # Directly, epoch by epoch (lr during epoch e+1 = value after e scheduler steps) ...
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = cnn_loop.make_scheduler(optimizer, cfg)
    seen = []
    for _ in range(cfg.epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert np.allclose(seen, [_lr_formula(cfg, e) for e in range(cfg.epochs)], rtol=1e-12, atol=1e-15)
    # ... and as the training loop logs it after every epoch.
    _, _, logs = _train(cfg)
    logged = [m["lr"] for m, _ in logs if "lr" in m]
    assert np.allclose(logged, [_lr_formula(cfg, e) for e in range(1, cfg.epochs + 1)], rtol=1e-12, atol=1e-15)


def test_optimizer_is_adam_with_the_configured_lr_and_weight_decay():
    for wd in (0.0, 0.5):
        cfg = _cfg(epochs=1, lr=0.03, weight_decay=wd)
        model, _, _ = _train(cfg)
        reference = nn.Parameter(torch.tensor([0.5, -0.2, 0.1]))
        optimizer = torch.optim.Adam([reference], lr=0.03, weight_decay=wd)
        torch.nn.functional.cross_entropy(reference.expand(4, -1), torch.zeros(4, dtype=torch.long)).backward()
        optimizer.step()
        assert torch.allclose(model.w.detach(), reference.detach(), atol=1e-7), wd
    assert not torch.allclose(_train(_cfg(epochs=1, weight_decay=0.5))[0].w, _train(_cfg(epochs=1))[0].w)


@pytest.mark.parametrize("names", [[], ["hflip"], ["rotation"], ["rotation", "hflip"]])
def test_training_batches_get_exactly_the_configured_augmentation(names):
    cfg = _cfg(epochs=2, augment=names, rotation_degrees=40.0, max_steps_per_epoch=0, batch_size=3)
    splits = _splits(n_train=6)
    model, _, _ = _train(cfg, splits=splits, seed=7)
    generator = torch.Generator().manual_seed(7)
    expected = []
    for _ in range(2):
        order = torch.randperm(6, generator=generator)
        for i in range(2):
            expected.append(augment.apply(splits["train"].batch(order[i * 3:(i + 1) * 3]), names, 40.0, generator))
    assert len(model.train_inputs) == 4
    for got, want in zip(model.train_inputs, expected):
        assert torch.equal(got, want)
    if not names:   # no augmentation: the plain normalised images
        first = torch.randperm(6, generator=torch.Generator().manual_seed(7))[:3]
        assert torch.equal(model.train_inputs[0], splits["train"].batch(first))


def test_steps_per_epoch_images_seen_and_the_logged_curve():
    cfg = _cfg(epochs=2, max_steps_per_epoch=0, batch_size=4, log_every=2)
    model, result, logs = _train(cfg, splits=_splits(n_train=10))
    assert int(model.steps) in (1, 2, 3, 4, 5, 6) and len(model.train_inputs) == 6   # ceil(10/4) = 3 per epoch
    assert [len(x) for x in model.train_inputs] == [4, 4, 2, 4, 4, 2]
    assert result.images_seen == 20
    assert [r["step"] for r in result.curve] == [2, 4, 6] and [r["epoch"] for r in result.curve] == [1, 2, 2]
    assert [s for m, s in logs if "train_loss" in m] == [2, 4, 6]
    capped = _train(_cfg(epochs=2, max_steps_per_epoch=2, batch_size=4, log_every=3), splits=_splits(n_train=10))
    assert capped[1].images_seen == 16 and len(capped[0].train_inputs) == 4
    # The last row ends the curve at the last step when it is not a multiple of log_every.
    assert [r["step"] for r in capped[1].curve] == [3, 4] and capped[1].curve[-1]["epoch"] == 2


def test_logged_train_loss_averages_the_steps_since_the_last_log():
    cfg = _cfg(epochs=1, max_steps_per_epoch=0, batch_size=2, log_every=2, lr=1e-9)
    _, result, _ = _train(cfg, splits=_splits(n_train=4))
    loss = torch.nn.functional.cross_entropy(torch.tensor([[0.5, -0.2, 0.1]]), torch.tensor([0])).item()
    assert np.isclose(result.curve[0]["train_loss"], loss, rtol=1e-5)


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 3))


def _random_split(n, seed, size=8):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    labels = np.arange(n) % 3
    return DeviceSplit(images, torch.from_numpy(labels), labels)


@pytest.mark.parametrize("training", [True, False])
def test_evaluation_changes_neither_mode_nor_weights(training):
    model, split = _conv_model(), _random_split(12, 1)
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics, scores = cnn_loop.evaluate(model, split, 5)
    assert model.training is training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert scores.shape == (12, 3) and scores.dtype == np.float32 and np.allclose(scores.sum(1), 1, atol=1e-6)
    assert np.array_equal(cnn_loop.predict(model, split, 100), scores)    # eval mode: no dropout, batch-independent
    assert metrics == {"auc": getAUC(split.labels_np, scores, "multi-class"),
                       "acc": getACC(split.labels_np, scores, "multi-class")}


def test_batch_is_the_normalised_nchw_images():
    split = _random_split(4, 2)
    x = split.batch(torch.tensor([2, 0]))
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x, split.images[[2, 0]].permute(0, 3, 1, 2).float() / 127.5 - 1)


def test_train_step_is_one_optimizer_step_on_the_cross_entropy():
    model, split = _conv_model(), _random_split(6, 3)
    reference = _conv_model()
    x, y = split.batch(torch.arange(6)), split.labels
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference))
    model.eval(), reference.eval()
    loss = cnn_loop.train_step(model, opt, x, y)
    ref_loss = torch.nn.functional.cross_entropy(reference(x), y)
    ref_opt.zero_grad()
    ref_loss.backward()
    ref_opt.step()
    assert torch.isclose(loss, ref_loss.detach()) and not loss.requires_grad
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b)


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_ends(tmp_path):
    cfg = _cfg(epochs=3, select_by="acc")
    straight_model, straight, _ = _train(cfg, checkpoint_dir=tmp_path / "a")

    class Stop(Exception):
        pass

    epochs_logged = []

    def stop_in_epoch_3(metrics, step):
        if "lr" in metrics:
            epochs_logged.append(step)
            if len(epochs_logged) == 3:
                raise Stop

    with pytest.raises(Stop):
        cnn_loop.train(Scripted(), _splits(), cfg, 0, stop_in_epoch_3, checkpoint_dir=tmp_path / "b")
    model, resumed, _ = _train(replace(cfg, resume=True), checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_from == 2 and len(model.train_inputs) == 1
    assert resumed.best_epoch == straight.best_epoch == 2 and resumed.best_val == straight.best_val
    assert int(model.steps) == int(straight_model.steps) == 2
    assert resumed.images_seen == straight.images_seen == 12
    # Another configuration does not resume.
    other, fresh, _ = _train(replace(cfg, resume=True, lr=0.2), checkpoint_dir=tmp_path / "b")
    assert fresh.resumed_from == 0 and len(other.train_inputs) == 3
    # Without resume the checkpoint is ignored.
    assert _train(cfg, checkpoint_dir=tmp_path / "b")[1].resumed_from == 0


def test_fingerprint_ignores_only_resume_eval_batch_and_log_every():
    splits, cfg = _splits(), _cfg()
    key = cnn_loop.fingerprint(cfg, 0, splits, "synthetic")
    for same in ({"resume": True}, {"eval_batch_size": 99}, {"log_every": 7}):
        assert cnn_loop.fingerprint(replace(cfg, **same), 0, splits, "synthetic") == key
    for other in ({"lr": 0.2}, {"epochs": 4}, {"augment": ["hflip"]}):
        assert cnn_loop.fingerprint(replace(cfg, **other), 0, splits, "synthetic") != key
    assert cnn_loop.fingerprint(cfg, 1, splits, "synthetic") != key
    assert cnn_loop.fingerprint(cfg, 0, splits, "medmnist") != key
    assert cnn_loop.fingerprint(cfg, 0, {**splits, "val": _split([0, 1, 2])}, "synthetic") != key


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == CPU and devices.resolve_device("cpu") == CPU
    with pytest.raises(StageError, match="base.device is 'cuda' but no CUDA device is available"):
        devices.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("cuda")
