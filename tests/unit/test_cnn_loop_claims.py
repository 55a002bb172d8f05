"""Claims about the CNN training loop: the lr sequence of every scheduler, the returned model is
the best-validation one by `select_by` (not the last), the optimiser gets lr and weight decay,
augmentation reaches the training batches as configured, evaluation changes neither mode nor weights.

A scripted model makes validation scores exact: in eval mode its logits come from a table indexed
by the number of training steps taken (a buffer, so it travels with the state dict)."""

from __future__ import annotations

import math
import os
from dataclasses import fields, replace
from pathlib import Path

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
from pipeline.train.distributed import SINGLE

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
    # ... and as the training loop logs it at every epoch's last step: the lr those steps trained with.
    _, _, logs = _train(cfg)
    logged = [m["lr"] for m, _ in logs if "lr" in m]
    assert np.allclose(logged, [_lr_formula(cfg, e) for e in range(cfg.epochs)], rtol=1e-12, atol=1e-15)


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
    # An epoch of 3 steps is shorter than 4 curve points: every step is one (log_every 2 notwithstanding).
    assert [r["step"] for r in result.curve] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in result.curve] == [1, 1, 1, 2, 2, 2]
    assert [s for m, s in logs if "train_loss" in m] == [1, 2, 3, 4, 5, 6]
    capped = _train(_cfg(epochs=2, max_steps_per_epoch=2, batch_size=4, log_every=3), splits=_splits(n_train=10))
    assert capped[1].images_seen == 16 and len(capped[0].train_inputs) == 4
    assert [r["step"] for r in capped[1].curve] == [1, 2, 3, 4] and capped[1].curve[-1]["epoch"] == 2


def test_the_curve_has_at_least_four_points_per_epoch_and_log_every_when_that_is_finer():
    assert cnn_loop.curve_interval(100, 1407) == 100        # PathMNIST 64 px, batch 64: log_every stands
    assert cnn_loop.curve_interval(100, 200) == 50 and cnn_loop.curve_interval(2, 6) == 1
    assert cnn_loop.curve_interval(1000, 3) == 1 and cnn_loop.curve_interval(1000, 1) == 1


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


class _Stop(Exception):
    pass


def _interrupt_at_epoch_log(model, splits, cfg, checkpoint_dir, step):
    """Train until the end-of-epoch log at global `step`, then stop there as an interruption would
    (after the epoch's evaluation, before its checkpoint)."""
    def log(metrics, at):
        if "lr" in metrics and at == step:
            raise _Stop

    with pytest.raises(_Stop):
        cnn_loop.train(model, splits, cfg, 0, log, checkpoint_dir=checkpoint_dir)


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_ends(tmp_path):
    cfg = _cfg(epochs=3, select_by="acc", log_every=1)
    straight_model, straight, _ = _train(cfg, checkpoint_dir=tmp_path / "a")

    _interrupt_at_epoch_log(Scripted(), _splits(), cfg, tmp_path / "b", step=3)   # one step per epoch: epoch 3
    model, resumed, _ = _train(cfg, checkpoint_dir=tmp_path / "b", resume=True)
    assert resumed.resumed_from == 2 and len(model.train_inputs) == 1
    assert len(straight.curve) == 3 and resumed.curve == straight.curve    # the rows before the interruption too
    assert resumed.best_epoch == straight.best_epoch == 2 and resumed.best_val == straight.best_val
    assert int(model.steps) == int(straight_model.steps) == 2
    assert resumed.images_seen == straight.images_seen == 12
    # Another configuration does not resume.
    other, fresh, _ = _train(replace(cfg, lr=0.2), checkpoint_dir=tmp_path / "b", resume=True)
    assert fresh.resumed_from == 0 and len(other.train_inputs) == 3
    # Without resume the checkpoint is ignored.
    assert _train(cfg, checkpoint_dir=tmp_path / "b")[1].resumed_from == 0


def test_fingerprint_covers_every_config_key_and_the_data_contents():
    splits, cfg = _splits(), _cfg()
    key = cnn_loop.fingerprint(cfg, 0, splits, "synthetic")
    assert cnn_loop.fingerprint(cfg, 0, _splits(), "synthetic") == key
    for other in ({"lr": 0.2}, {"epochs": 4}, {"augment": ["hflip"]}, {"log_every": 7}, {"eval_batch_size": 99}):
        assert cnn_loop.fingerprint(replace(cfg, **other), 0, splits, "synthetic") != key
    assert cnn_loop.fingerprint(cfg, 1, splits, "synthetic") != key
    assert cnn_loop.fingerprint(cfg, 0, splits, "medmnist") != key
    assert cnn_loop.fingerprint(cfg, 0, {**splits, "val": _split([0, 1, 2])}, "synthetic") != key
    # Same shapes, one pixel or one label changed: another fingerprint.
    edited = _split(VAL_LABELS)
    edited.images[0, 0, 0, 0] += 1
    assert cnn_loop.fingerprint(cfg, 0, {**splits, "val": edited}, "synthetic") != key
    relabelled = _split([0, 1, 2, 0, 1, 1])
    assert cnn_loop.fingerprint(cfg, 0, {**splits, "val": relabelled}, "synthetic") != key
    assert "resume" not in {f.name for f in fields(Cnn)}   # an environment variable, not a param


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == CPU and devices.resolve_device("cpu") == CPU
    with pytest.raises(StageError, match="base.device is 'cuda' but no CUDA device is available"):
        devices.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("cuda")


# ---- to_device and the batches ----------------------------------------------------------------------

def _image_set(task="multi-class"):
    from pipeline.data.images import ImageSet
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for s, n in (("train", 5), ("val", 3), ("test", 2))}
    if task == "multi-label, binary-class":
        labels = {s: rng.integers(0, 2, (len(a), 3)).astype(np.uint8) for s, a in images.items()}
    else:
        labels = {s: rng.integers(0, 2, (len(a), 1)).astype(np.uint8) for s, a in images.items()}
    return ImageSet(images=images, labels=labels, task=task, **_image_set_extra())


def _image_set_extra():
    import inspect

    from pipeline.data.images import ImageSet
    names = [p for p in inspect.signature(ImageSet).parameters if p not in ("images", "labels", "task")]
    defaults = {"n_classes": 2, "classes": ["a", "b"], "source": "synthetic", "flag": "pathmnist", "size": 4,
                "channels": 3, "mean": 0.5, "std": 0.5}
    return {k: defaults.get(k) for k in names
            if inspect.signature(ImageSet).parameters[k].default is inspect.Parameter.empty}


@pytest.mark.parametrize("task", ["multi-class", "multi-label, binary-class"])
@pytest.mark.parametrize("keep_on_host", [None, False, True])
def test_to_device_holds_every_split_with_the_tasks_targets(task, keep_on_host):
    data = _image_set(task)
    splits = cnn_loop.to_device(data, CPU, keep_on_host=keep_on_host, size=6)
    assert list(splits) == ["train", "val", "test"]
    for s, split in splits.items():
        assert torch.equal(split.images, torch.from_numpy(data.images[s])) and split.images.dtype == torch.uint8
        assert torch.equal(split.labels, cnn_loop.tasks.targets(data.labels[s], task))
        assert split.labels.dtype == (torch.float32 if task != "multi-class" else torch.int64)
        assert split.labels_np is data.labels[s]
        assert split.device == CPU and split.task == task and split.size == 6
        assert split.on_host is bool(keep_on_host)
        assert not split.images.is_pinned()


@pytest.mark.parametrize("keep_on_host", [False, True])
def test_to_device_moves_the_images_unless_kept_on_host_and_the_targets_always(keep_on_host):
    # the meta device stands in for a GPU: a tensor moved there shows it, one left behind stays on the CPU
    meta = torch.device("meta")
    for split in cnn_loop.to_device(_image_set(), meta, keep_on_host=keep_on_host).values():
        assert split.images.device == (CPU if keep_on_host else meta)
        assert split.labels.device == meta and split.device == meta and split.on_host is keep_on_host


def test_a_split_computes_where_its_images_are_unless_told():
    images = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    assert DeviceSplit(images, torch.zeros(2), np.zeros(2)).device == CPU
    meta = torch.device("meta")
    assert DeviceSplit(images, torch.zeros(2), np.zeros(2), device=meta).device == meta


@pytest.mark.parametrize("on_host", [False, True])
def test_batch_is_normalised_channels_last_and_resized_only_when_a_size_is_set(on_host):
    split = replace(_random_split(5, 4, size=6), on_host=on_host)
    index = torch.tensor([3, 1, 4])
    expected = split.images[index].permute(0, 3, 1, 2).float() / 127.5 - 1
    x = split.batch(index)
    assert x.shape == (3, 3, 6, 6) and torch.allclose(x, expected, atol=1e-6)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    for size in (6, 9):
        big = replace(split, size=size).batch(index)
        assert big.shape == (3, 3, size, size)
        assert torch.allclose(big, torch.nn.functional.interpolate(expected, size=(size, size), mode="bilinear",
                                                                   align_corners=False), atol=1e-6)
    assert not torch.allclose(replace(split, size=9).batch(index)[:, :, :6, :6], expected)


# ---- small pieces: out-of-memory advice, autocast, determinism, source digest, fingerprint ------------

def test_out_of_memory_becomes_advice_naming_the_params_to_halve():
    cfg = _cfg(batch_size=64, eval_batch_size=10)
    message = ("CUDA out of memory with cnn.batch_size=64 and cnn.eval_batch_size=10; try smaller values, e.g. "
               "`dvc exp run -S cnn.defaults.batch_size=32` or `-S cnn.defaults.eval_batch_size=5`")
    assert cnn_loop.out_of_memory_message(cfg) == message
    assert cnn_loop.out_of_memory_message(_cfg(batch_size=1, eval_batch_size=1)).endswith(
        "`dvc exp run -S cnn.defaults.batch_size=1` or `-S cnn.defaults.eval_batch_size=1`")
    with pytest.raises(StageError) as raised:
        with cnn_loop.out_of_memory_advice(cfg):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    assert str(raised.value) == message and raised.value.__cause__ is None and raised.value.__suppress_context__
    with pytest.raises(ValueError, match="other"):
        with cnn_loop.out_of_memory_advice(cfg):
            raise ValueError("other")


def test_autocast_is_bf16_and_only_on_cuda():
    cpu = cnn_loop._autocast(CPU)
    assert cpu.device == "cpu" and cpu._enabled is False
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else _nothing():
        cuda = cnn_loop._autocast(torch.device("cuda"))
    assert cuda.device == "cuda" and cuda.fast_dtype == torch.bfloat16


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_set_determinism_seeds_torch_and_on_cuda_asks_for_deterministic_kernels(monkeypatch):
    cnn_loop.set_determinism(123, CPU)
    assert torch.initial_seed() == 123
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append((a, k)))
    cnn_loop.set_determinism(5, CPU)
    assert torch.backends.cudnn.benchmark is True and calls == [] and "CUBLAS_WORKSPACE_CONFIG" not in __import__("os").environ
    cnn_loop.set_determinism(7, torch.device("cuda"))
    assert torch.initial_seed() == 7
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert calls == [((True,), {"warn_only": True})]
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    cnn_loop.set_determinism(7, torch.device("cuda"))
    assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"     # a user's setting is kept


def test_source_digest_is_the_sorted_unique_files_names_and_contents(tmp_path):
    import hashlib
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n"), b.write_text("y = 2\n")
    by_hand = hashlib.sha256(b"a.py\0x = 1\n\0" + b"b.py\0y = 2\n\0").hexdigest()
    assert cnn_loop.source_digest([b, a]) == cnn_loop.source_digest([a, str(b), a]) == by_hand
    b.write_text("y = 3\n")
    assert cnn_loop.source_digest([a, b]) != by_hand
    assert cnn_loop.LOOP_SOURCES == (Path(cnn_loop.__file__), Path(augment.__file__))


def test_fingerprint_is_the_hash_of_exactly_what_training_depends_on(tmp_path):
    import hashlib
    import json
    from dataclasses import asdict
    extra = tmp_path / "stage.py"
    extra.write_text("print('stage')\n")
    splits = {s: replace(split, task="binary-class", size=8) for s, split in _splits().items()}
    cfg = _cfg()
    config = cnn_loop.run_config(cfg, 3, splits, "src", code_files=[extra])
    code = cnn_loop.source_digest([*cnn_loop.LOOP_SOURCES, extra])
    assert config == {**asdict(cfg), "seed": 3, "data_digest": cnn_loop.data_digest(splits), "data_source": "src",
                      "task": "binary-class", "input_size": 8, "device_type": "cpu", "code": code}
    by_hand = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    key = cnn_loop.fingerprint(cfg, 3, splits, "src", code_files=[extra])
    assert key == by_hand
    extra.write_text("print('changed')\n")
    assert cnn_loop.fingerprint(cfg, 3, splits, "src", code_files=[extra]) != key
    assert cnn_loop.fingerprint(cfg, 3, {**splits, "train": replace(splits["train"], task="multi-class")}, "src",
                                code_files=[extra]) != cnn_loop.fingerprint(cfg, 3, splits, "src", code_files=[extra])


def test_data_digest_is_the_sha256_of_every_split_images_and_labels():
    import hashlib
    splits = _splits()
    digest = hashlib.sha256()
    for name in sorted(splits):
        for array in (splits[name].images.numpy(), splits[name].labels_np):
            digest.update(f"{name}:{array.dtype}:{array.shape}\0".encode() + array.tobytes())
    assert cnn_loop.data_digest(splits) == digest.hexdigest()


# ---- the loop: mode, seed, timing, logs, checkpoints, ranks -------------------------------------------

def test_training_puts_the_model_in_train_mode_and_seeds_torch():
    model = Scripted().eval()
    _, result, _ = _train(_cfg(epochs=2, select_by="acc"), model=model, seed=11)
    assert len(model.train_inputs) == 2 and result.best_epoch == 2     # it trained (train-mode forwards)
    assert torch.initial_seed() == 11


def test_training_moves_the_model_to_channels_last():
    model = _conv_model()
    cfg = _cfg(epochs=1, max_steps_per_epoch=1, batch_size=4)
    cnn_loop.train(model, {"train": _random_split(4, 5), "val": _random_split(6, 6), "test": _random_split(3, 7)},
                   cfg, 0, lambda m, s: None)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) and not model[0].weight.is_contiguous()


def test_multi_label_train_step_is_a_step_on_the_binary_cross_entropy():
    w = nn.Parameter(torch.tensor([[0.3, -0.2], [0.1, 0.4]]))
    ref = nn.Parameter(w.detach().clone())
    x, y = torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    class Lin(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, x):
            return x @ self.p

    loss = cnn_loop.train_step(Lin(w), torch.optim.SGD([w], lr=0.5), x, y, "multi-label, binary-class")
    ref_loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ ref, y)
    ref_loss.backward()
    with torch.no_grad():
        ref -= 0.5 * ref.grad
    assert torch.isclose(loss, ref_loss.detach()) and torch.allclose(w, ref)


class _Clock:
    """A fake perf_counter: only a model's forward passes move it (1 s per training step, 100 s per
    evaluation batch), so the measured training time is exact."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    @staticmethod
    def time():   # the wall clock (checkpoint file ages) stays real
        import time
        return time.time()


class Timed(Scripted):
    def __init__(self, clock, table=TABLE):
        super().__init__(table)
        self.clock = clock

    def forward(self, x):
        self.clock.now += 1.0 if self.training else 100.0
        return super().forward(x)


def test_train_seconds_count_the_training_steps_only_not_the_evaluations(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(cnn_loop, "time", clock)
    cfg = _cfg(epochs=2, max_steps_per_epoch=0, batch_size=2, log_every=2, eval_batch_size=4)
    model, result, logs = _train(cfg, splits=_splits(n_train=6), model=Timed(clock))
    assert len(model.train_inputs) == 6 and result.train_seconds == 6.0


def _expected_losses(cfg, steps, labels=0):
    """The train losses of the Scripted model under Adam, step by step (no scheduler)."""
    ref = nn.Parameter(torch.tensor([0.5, -0.2, 0.1]))
    optimizer = torch.optim.Adam([ref], lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(ref.expand(cfg.batch_size, -1), torch.zeros(cfg.batch_size, dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append(loss.item())
    return out


def test_every_log_call_and_curve_row_is_exact():
    cfg = _cfg(epochs=2, max_steps_per_epoch=0, batch_size=2, log_every=2, lr=0.05)
    model, result, logs = _train(cfg, splits=_splits(n_train=6))
    losses = _expected_losses(cfg, 6)

    def val(steps):   # the validation scores after `steps` training steps
        scores = torch.softmax(TABLE[min(steps, 3)], 1).numpy()
        return {"auc": getAUC(VAL_LABELS, scores, "multi-class"), "acc": getACC(VAL_LABELS, scores, "multi-class")}
    # 3 steps per epoch, fewer than 4: a curve point at every step, then the epoch's record (with the
    # lr its steps trained with) at its last step.
    expected_logs = []
    for epoch in (1, 2):
        for step in range(3 * epoch - 2, 3 * epoch + 1):
            expected_logs.append(({"train_loss": losses[step - 1], "val_auc": val(step)["auc"],
                                   "val_acc": val(step)["acc"]}, step))
        expected_logs.append(({"epoch_val_auc": val(3 * epoch)["auc"], "epoch_val_acc": val(3 * epoch)["acc"],
                               "lr": 0.05}, 3 * epoch))
    assert [s for _, s in logs] == [s for _, s in expected_logs]
    for (got, _), (want, _) in zip(logs, expected_logs):
        assert got == pytest.approx(want, rel=1e-5) and set(got) == set(want)
    rows = [{"step": s, "epoch": (s + 2) // 3, "train_loss": m["train_loss"], "val_auc": m["val_auc"],
             "val_acc": m["val_acc"]} for m, s in expected_logs if "train_loss" in m]
    assert result.curve == [pytest.approx(r, rel=1e-5) for r in rows]


def test_the_curve_ends_at_the_last_step_with_the_mean_loss_since_the_last_log():
    cfg = _cfg(epochs=1, max_steps_per_epoch=0, batch_size=2, log_every=1000, lr=0.05)
    _, result, logs = _train(cfg, splits=_splits(n_train=18))   # 9 steps: a point every 2, then step 9
    assert [r["step"] for r in result.curve] == [2, 4, 6, 8, 9]
    scores = torch.softmax(TABLE[3], 1).numpy()
    assert result.curve[-1] == pytest.approx({
        "step": 9, "epoch": 1, "train_loss": _expected_losses(cfg, 9)[8],
        "val_auc": getAUC(VAL_LABELS, scores, "multi-class"), "val_acc": getACC(VAL_LABELS, scores, "multi-class")},
        rel=1e-5)
    assert [s for m, s in logs if "train_loss" in m] == [2, 4, 6, 8, 9]   # MLflow's curve ends there too
    assert result.curve[0]["train_loss"] == pytest.approx(sum(_expected_losses(cfg, 2)) / 2, rel=1e-5)   # steps 1-2


def test_the_last_curve_row_averages_every_step_since_the_last_point_and_mlflow_gets_the_same_row():
    cfg = _cfg(epochs=1, max_steps_per_epoch=0, batch_size=2, log_every=1000, lr=0.05)
    _, result, logs = _train(cfg, splits=_splits(n_train=28))   # 14 steps: a point every 3, then steps 13-14
    assert [r["step"] for r in result.curve] == [3, 6, 9, 12, 14]
    losses = _expected_losses(cfg, 14)
    assert result.curve[-1]["train_loss"] == pytest.approx((losses[12] + losses[13]) / 2, rel=1e-5)
    final = [(m, s) for m, s in logs if "train_loss" in m][-1]
    assert final == ({k: result.curve[-1][k] for k in ("train_loss", "val_auc", "val_acc")}, 14)


def test_the_best_is_kept_when_no_epoch_beats_the_initial_minus_one():
    zero = torch.zeros(4, 6, 3)      # AUC 0.5, ACC 1/3 every epoch: the first epoch is the best
    model, result, _ = _train(_cfg(epochs=2, select_by="acc"), model=Scripted(zero))
    assert result.best_epoch == 1 and int(model.steps) == 1 and result.best_val["acc"] == pytest.approx(1 / 3)


def test_a_checkpoint_named_by_the_fingerprint_is_written_after_every_epoch(tmp_path):
    cfg = _cfg(epochs=2)
    seen = []

    def log(metrics, step):
        if "lr" in metrics:
            seen.append(sorted(p.name for p in tmp_path.iterdir()))

    model = Scripted()
    result = cnn_loop.train(model, _splits(), cfg, 0, log, checkpoint_dir=tmp_path, data_source="d")
    key = cnn_loop.fingerprint(cfg, 0, _splits(), "d")
    assert result.checkpoint == tmp_path / f"{key[:16]}.pt"
    assert seen == [[], [f"{key[:16]}.pt"]]      # written after the epoch's log, before the next epoch
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["fingerprint"] == key and state["epoch"] == 2 and state["step"] == 2
    # The caller's code files are part of the name: a checkpoint of other stage code is not resumed.
    stage = tmp_path / "stage.py"
    stage.write_text("x = 1\n")
    with_code = cnn_loop.train(Scripted(), _splits(), cfg, 0, lambda m, s: None, checkpoint_dir=tmp_path / "c",
                               data_source="d", code_files=[stage])
    assert with_code.checkpoint.name == f"{cnn_loop.fingerprint(cfg, 0, _splits(), 'd', [stage])[:16]}.pt" \
        != result.checkpoint.name
    assert state["best_epoch"] == result.best_epoch and state["curve"] == result.curve
    assert state["images_seen"] == 8 and state["train_seconds"] == result.train_seconds
    assert int(state["model"]["steps"]) == 2 and torch.equal(state["best_state"]["steps"], result.best_state["steps"])
    assert _train(cfg)[1].checkpoint is None


def test_resume_restores_weights_optimizer_scheduler_and_random_stream(tmp_path):
    # Last epoch best, cosine lr, hflip augmentation: only a full restore gives the straight run's end.
    table = torch.stack([TABLE[0], TABLE[0], TABLE[3], TABLE[0], TABLE[2], TABLE[0], TABLE[1]])   # 2 steps/epoch
    cfg = _cfg(epochs=3, select_by="auc", scheduler="cosine", augment=["hflip"], max_steps_per_epoch=0,
               batch_size=4)
    straight_model = Scripted(table)
    _, straight, straight_logs = _train(cfg, splits=_splits(6), model=straight_model, checkpoint_dir=tmp_path / "a")

    _interrupt_at_epoch_log(Scripted(table), _splits(6), cfg, tmp_path / "b", step=4)
    # An interrupted epoch 2: the checkpoint after epoch 1 is there.
    saved = torch.load(next((tmp_path / "b").iterdir()), weights_only=True)
    assert saved["epoch"] == 1 and saved["train_seconds"] > 0
    model, resumed, logs = _train(cfg, splits=_splits(6), model=Scripted(table),
                                  checkpoint_dir=tmp_path / "b", resume=True)
    assert resumed.resumed_from == 1 and resumed.best_epoch == straight.best_epoch == 3
    assert torch.equal(model.w, straight_model.w)              # Adam's state came back
    assert all(torch.equal(a, b) for a, b in zip(model.train_inputs, straight_model.train_inputs[2:]))
    # The resumed run logs the whole history: the calls before the interruption re-logged with their
    # steps, then the rest (lr of the cosine schedule included).
    assert logs == straight_logs and len(logs) == 9   # 2 curve points and the epoch's record, per epoch
    assert resumed.curve == straight.curve and resumed.images_seen == straight.images_seen == 18
    assert resumed.train_seconds > saved["train_seconds"]


def test_a_rank_other_than_the_first_trains_on_its_share_and_writes_no_checkpoint(tmp_path, monkeypatch):
    from pipeline.train.distributed import World
    wrapped = []
    monkeypatch.setattr(cnn_loop.distributed, "wrap", lambda model, world, device: wrapped.append(world) or model)
    cfg = _cfg(epochs=1, max_steps_per_epoch=0, batch_size=3)
    model = Scripted()
    world = World(1, 2, 1)
    cnn_loop.train(model, _splits(6), cfg, 0, lambda m, s: None, checkpoint_dir=tmp_path, world=world)
    assert wrapped == [world] and list(tmp_path.iterdir()) == []
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    split = _splits(6)["train"]
    # Global batches of 3, padded to 4: this rank takes positions 1 and 3 (= 0) of each.
    assert [x.shape[0] for x in model.train_inputs] == [2, 2]
    assert torch.equal(model.train_inputs[0], split.batch(order[[1, 0]]))
    assert torch.equal(model.train_inputs[1], split.batch(order[[4, 3]]))


def test_projection_times_one_evaluation_batch_without_changing_anything(monkeypatch):
    from pipeline import progress
    calls = {}
    monkeypatch.setattr(progress, "cnn_projection", lambda *a: calls.setdefault("projection", a) and (10.0, 2.0, "d"))
    monkeypatch.setattr(progress, "cnn_projection", lambda *a: (calls.__setitem__("projection", a), (10.0, 2.0, "d"))[1])
    monkeypatch.setattr(progress, "projection_message",
                        lambda *a, **k: (calls.__setitem__("message", (a, k)), "message")[1])
    clock = _Clock()
    clock.now = 1000.0
    monkeypatch.setattr(cnn_loop, "time", clock)
    model = Timed(clock)
    splits = _splits()
    splits["val"] = replace(splits["val"], images=torch.zeros(6, 4, 5, 3, dtype=torch.uint8))   # 4 high, 5 wide
    cfg = _cfg(eval_batch_size=4, log_every=5, epochs=7)
    seen = []
    monkeypatch.setattr(cnn_loop, "predict", lambda m, split, bs: seen.append((len(split.labels), len(split.images),
                                                                               len(split.labels_np), bs)) or
                        clock.__setattr__("now", clock.now + 100.0 * len(split.labels)))
    assert cnn_loop.projection(model, splits, cfg, "resnet", 0.25, 3, 4) == ("message", 10.0)
    assert seen == [(4, 4, 4, 4)]
    assert calls["projection"] == (0.25, 100.0, 3, 4, 1, 6, 6)   # log_every 5 > 3 steps: a point every step
    assert calls["message"] == (("resnet", "cpu", 10.0, "d"), {"on_cpu": True, "seconds_per_epoch": 2.0,
                                                                "steps_per_epoch": 3, "epochs": 4, "size": 4})
    splits = {s: replace(v, size=9) for s, v in splits.items()}
    seen.clear()
    cnn_loop.projection(model, splits, replace(cfg, eval_batch_size=50), "r", 0.5, 1, 1)
    assert seen == [(6, 6, 6, 50)] and calls["message"][1]["size"] == 9


def test_to_device_defaults_to_the_images_own_size():
    assert all(split.size == 0 for split in cnn_loop.to_device(_image_set(), CPU).values())


def test_splits_stay_on_the_host_only_when_they_exceed_the_share_of_free_cuda_memory(monkeypatch):
    data = _image_set()
    nbytes = sum(a.nbytes for a in data.images.values())
    asked = []
    for free, expected in ((2 * nbytes, False), (2 * nbytes - 1, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (asked.append(device), (free, 10 ** 12))[1])
        assert cnn_loop.too_big_for(data, torch.device("cuda", 1)) is expected
    assert asked == [torch.device("cuda", 1)] * 2 and cnn_loop.DEVICE_SHARE == 0.5
    assert cnn_loop.too_big_for(data, CPU) is False                 # the CPU: never (and no CUDA query)
    assert len(asked) == 2


class _Recorded(Scripted):
    def __init__(self):
        super().__init__()
        self.to_calls = []

    def to(self, *args, **kwargs):
        self.to_calls.append((args, kwargs))
        return super().to(*args, **kwargs)


def test_model_generator_permutation_and_shards_live_on_the_training_device(monkeypatch):
    seen = {"generator": [], "randperm": [], "shard": [], "wrap": []}
    real_generator, real_randperm, real_shard = torch.Generator, torch.randperm, cnn_loop.distributed.shard
    monkeypatch.setattr(cnn_loop.torch, "Generator", lambda device=None: (seen["generator"].append(device),
                                                                        real_generator(device=device))[1])
    monkeypatch.setattr(cnn_loop.torch, "randperm", lambda *a, **k: (seen["randperm"].append(k.get("device")),
                                                                     real_randperm(*a, **k))[1])
    monkeypatch.setattr(cnn_loop.distributed, "shard", lambda n, world, device: (seen["shard"].append(device),
                                                                                real_shard(n, world, device))[1])
    monkeypatch.setattr(cnn_loop.distributed, "wrap", lambda model, world, device: (seen["wrap"].append(device),
                                                                                   model)[1])
    model = _Recorded()
    _train(_cfg(epochs=2), model=model)
    assert model.to_calls[0] == ((CPU,), {"memory_format": torch.channels_last})
    assert seen == {"generator": [CPU], "randperm": [CPU, CPU], "shard": [CPU, CPU], "wrap": [CPU]}


def test_a_multi_label_split_trains_on_the_binary_cross_entropy():
    ml = "multi-label, binary-class"
    labels = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype=np.uint8)
    images = torch.zeros(4, 4, 4, 3, dtype=torch.uint8)
    train_split = DeviceSplit(images, cnn_loop.tasks.targets(labels, ml), labels, task=ml)
    splits = {**_splits(), "train": train_split}
    _, result, _ = _train(_cfg(epochs=1, lr=1e-9, log_every=1, batch_size=4), splits=splits)
    w = torch.tensor([0.5, -0.2, 0.1])
    by_hand = torch.nn.functional.binary_cross_entropy_with_logits(w.expand(4, -1), torch.from_numpy(labels).float())
    assert result.curve[0]["train_loss"] == pytest.approx(by_hand.item(), rel=1e-6)


def test_training_batches_are_rotated_with_the_configured_interpolation():
    cfg = _cfg(epochs=1, augment=["rotation"], rotation_degrees=30.0, rotation_interpolation="bilinear",
               max_steps_per_epoch=0, batch_size=4)
    splits = {**_splits(), "train": _random_split(4, 8)}
    model, _, _ = _train(cfg, splits=splits, seed=3)
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(4, generator=generator)
    want = augment.rotate(splits["train"].batch(order), 30.0, generator, "bilinear")
    assert torch.equal(model.train_inputs[0], want)
    same_draws = torch.Generator().manual_seed(3)
    torch.randperm(4, generator=same_draws)
    assert not torch.equal(want, augment.rotate(splits["train"].batch(order), 30.0, same_draws, "nearest"))


def test_resume_without_a_checkpoint_directory_trains_afresh():
    model, result, _ = _train(_cfg(epochs=2), resume=True)
    assert result.resumed_from == 0 and result.checkpoint is None and len(model.train_inputs) == 2


def test_the_checkpoint_of_a_run_without_a_data_source_is_named_by_its_fingerprint(tmp_path):
    cfg = _cfg(epochs=1)
    _, result, _ = _train(cfg, checkpoint_dir=tmp_path)
    assert result.checkpoint == tmp_path / f"{cnn_loop.fingerprint(cfg, 0, _splits(), '')[:16]}.pt"
    assert result.checkpoint.exists()


def test_resumed_training_time_is_exactly_the_uninterrupted_runs(tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(cnn_loop, "time", clock)
    cfg = _cfg(epochs=3, max_steps_per_epoch=0, batch_size=4, log_every=2)
    _, straight, _ = _train(cfg, splits=_splits(8), model=Timed(clock), checkpoint_dir=tmp_path / "a")

    _interrupt_at_epoch_log(Timed(clock), _splits(8), cfg, tmp_path / "b", step=6)
    _, resumed, _ = _train(cfg, resume=True, splits=_splits(8), model=Timed(clock),
                           checkpoint_dir=tmp_path / "b")
    assert straight.train_seconds == 6.0 and resumed.train_seconds == 6.0 and resumed.resumed_from == 2
    assert resumed.checkpoint == straight.checkpoint.parent.parent / "b" / straight.checkpoint.name


def test_console_output_reports_this_runs_numbers(monkeypatch):
    """The bars, the one projection (main process) and the epoch lines carry the run's own values."""
    from pipeline import progress
    from pipeline.train.distributed import World
    bars, lines, said, projected = [], [], [], []
    real_bar = progress.bar

    def bar(*args, **kwargs):
        made = real_bar(*args, **kwargs)
        bars.append((args, kwargs, made))
        return made

    monkeypatch.setattr(progress, "bar", bar)
    monkeypatch.setattr(progress, "epoch_line", lambda *a, **k: lines.append((a, k)))
    monkeypatch.setattr(progress, "say", said.append)
    monkeypatch.setattr(cnn_loop, "projection", lambda *a: projected.append(a) or ("projected!", 1.0))
    clock = _Clock()
    monkeypatch.setattr(cnn_loop, "time", clock)
    cfg = _cfg(epochs=2, max_steps_per_epoch=0, batch_size=2, scheduler="step", step_size=1, step_gamma=0.5,
               lr=0.05)
    model = Timed(clock)
    splits = _splits(6)
    _, result, logs = _train(cfg, splits=splits, model=model, label="net")
    losses = _expected_losses_with_lrs(cfg, [0.05] * 3 + [0.025] * 3)
    assert [(a, k["items_per_step"], k.get("disable")) for a, k, _ in bars] == \
        [((3, "net epoch 1/2"), 2, None), ((3, "net epoch 2/2"), 2, None)]
    assert said == ["projected!"] and len(projected) == 1
    p = projected[0]
    assert p[0] is model and p[1] is splits and p[2] == cfg and p[3] == "net" and p[5:] == (3, 2)
    assert isinstance(p[4], float) and p[4] > 0          # seconds per timed step
    epoch_logs = [m for m, _ in logs if "lr" in m]
    assert len(lines) == 2
    for epoch, ((args, kwargs), logged) in enumerate(zip(lines, epoch_logs), 1):
        # 3 training steps and 4 validations of 2 batches on the fake clock (a curve point every step of
        # this 3-step epoch, and the epoch's end)
        assert args == (epoch, 2, 803.0)
        assert kwargs["prefix"] == "net" and kwargs["lr"] == [0.05, 0.025][epoch - 1]
        assert kwargs["val_auc"] == logged["epoch_val_auc"] and kwargs["val_acc"] == logged["epoch_val_acc"]
        assert kwargs["train_loss"] == pytest.approx(np.mean(losses[3 * (epoch - 1):3 * epoch]), rel=1e-5)
    # Another rank: no projection, no epoch lines, its bars turned off.
    bars.clear(), lines.clear(), said.clear(), projected.clear()
    monkeypatch.setattr(cnn_loop.distributed, "wrap", lambda model, world, device: model)
    cnn_loop.train(Timed(clock), splits, cfg, 0, lambda m, s: None, world=World(1, 2, 1))
    assert said == [] and projected == [] and lines == []
    assert [k.get("disable") for _, k, _ in bars] == [True, True]


def _expected_losses_with_lrs(cfg, lrs):
    ref = nn.Parameter(torch.tensor([0.5, -0.2, 0.1]))
    optimizer = torch.optim.Adam([ref], lr=lrs[0])
    out = []
    for lr in lrs:
        optimizer.param_groups[0]["lr"] = lr
        loss = torch.nn.functional.cross_entropy(ref.expand(cfg.batch_size, -1),
                                                 torch.zeros(cfg.batch_size, dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append(loss.item())
    return out


# ---- resume, pruning, NaN scores, absurd projections (issues 17.4, 18.9, 18.11, 18.13) ----------------

def test_the_checkpoint_keeps_its_config_and_a_mismatch_names_the_keys_that_differ(tmp_path, capsys):
    cfg = _cfg(epochs=3, log_every=1)
    _interrupt_at_epoch_log(Scripted(), _splits(), cfg, tmp_path, step=2)
    (saved,) = tmp_path.iterdir()
    config = torch.load(saved, weights_only=True)["config"]
    assert config == cnn_loop.run_config(cfg, 0, _splits(), "") and config["log_every"] == 1
    capsys.readouterr()
    _, fresh, _ = _train(replace(cfg, lr=0.2, log_every=2), checkpoint_dir=tmp_path, resume=True)
    out = capsys.readouterr().out
    assert fresh.resumed_from == 0 and f"the newest one, {saved}, was made with other settings" in out
    assert "lr: 0.1 -> 0.2" in out and "log_every: 1 -> 2" in out and "epochs:" not in out


def test_a_checkpoint_of_other_data_with_the_same_shapes_is_not_resumed(tmp_path, capsys):
    cfg = _cfg(epochs=3)
    _interrupt_at_epoch_log(Scripted(), _splits(), cfg, tmp_path, step=2)
    splits = _splits()
    splits["train"].images[0, 0, 0, 0] += 1    # one pixel of the training split
    _, result, _ = _train(cfg, splits=splits, checkpoint_dir=tmp_path, resume=True)
    assert result.resumed_from == 0 and "data_digest: " in capsys.readouterr().out


def test_stale_checkpoint_files_are_pruned_at_the_start_and_live_ones_kept(tmp_path):
    import os
    import time
    cfg = _cfg(epochs=1)
    key = cnn_loop.fingerprint(cfg, 0, _splits(), "")[:16]
    killed_write = tmp_path / f"tmp.{key}.pt.abc123.pt"            # this run's, from a killed write
    old = tmp_path / ("0" * 16 + ".pt")                             # another fingerprint, 8 days untouched
    old_tmp = tmp_path / f"tmp.{'1' * 16}.pt.x.pt"
    recent = tmp_path / ("2" * 16 + ".pt")                          # another fingerprint, an hour old
    recent_tmp = tmp_path / f"tmp.{'3' * 16}.pt.y.pt"               # maybe a live run's write
    for path in (killed_write, old, old_tmp, recent, recent_tmp):
        path.write_bytes(b"x")
    for path, age in ((old, 8 * 86400), (old_tmp, 8 * 86400), (recent, 3600)):
        os.utime(path, (time.time() - age, time.time() - age))
    _, result, _ = _train(cfg, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([recent.name, recent_tmp.name, result.checkpoint.name])
    assert cnn_loop.PRUNE_AFTER_DAYS == 7


def _nan_auc_splits():
    # The validation split has no class 1: its multi-class AUC is undefined (NaN), its ACC is not.
    splits = _splits()
    splits["val"] = _split([0, 0, 2, 0, 0, 2])
    return splits


def test_nan_validation_scores_still_keep_a_best_state_the_last_epoch(capsys):
    splits = _nan_auc_splits()
    assert math.isnan(cnn_loop.evaluate(Scripted().eval(), splits["val"], 4)[0]["auc"])
    model, result, _ = _train(_cfg(epochs=3, select_by="auc"), splits=splits)
    assert result.best_epoch == 3 and int(model.steps) == 3 and result.best_state    # loaded, no error
    out = capsys.readouterr().out
    assert "validation auc is NaN" in out and "no epoch had a finite validation auc: kept the last epoch" in out


def test_a_nan_score_never_beats_a_finite_one():
    assert cnn_loop._better({"auc": 0.2}, {"auc": math.nan}, "auc")
    assert not cnn_loop._better({"auc": math.nan}, {"auc": 0.2}, "auc")
    assert cnn_loop._better({"auc": math.nan}, {"auc": math.nan}, "auc")   # all NaN: the later one
    assert cnn_loop._better({"auc": math.nan}, {}, "auc")                 # the first epoch always
    assert not cnn_loop._better({"auc": 0.2}, {"auc": 0.2}, "auc")


def test_an_absurd_projection_is_refused_after_the_timed_steps_unless_forced(monkeypatch):
    monkeypatch.setattr(cnn_loop, "projection", lambda *a: ("projected: 99y", 15 * 86400.0))
    monkeypatch.delenv("PIPELINE_FORCE", raising=False)
    model = Scripted()
    cfg = _cfg(epochs=1, max_steps_per_epoch=0, batch_size=1)   # 8 steps: the timer projects after 7
    with pytest.raises(StageError, match="refused: over 14 days.*PIPELINE_FORCE=1"):
        _train(cfg, model=model)
    assert len(model.train_inputs) < 8
    monkeypatch.setenv("PIPELINE_FORCE", "1")
    assert len(_train(cfg)[0].train_inputs) == 8
    monkeypatch.setattr(cnn_loop, "projection", lambda *a: ("projected: 13d", 13 * 86400.0))
    monkeypatch.delenv("PIPELINE_FORCE")
    assert len(_train(cfg)[0].train_inputs) == 8


class _Conv(nn.Module):
    """Two leaf modules with known output sizes: conv 3->2 channels, then a ReLU (same size)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x)).mean(dim=(2, 3))


def test_activation_estimate_counts_every_leaf_output_of_one_image():
    model = _Conv().train()
    split = _split([0, 1, 2])                  # 4x4 images
    assert cnn_loop.activation_bytes_per_image(model, split) == 2 * (2 * 4 * 4 * 4)   # two 2x4x4 fp32 outputs
    assert model.training


def test_the_suggested_batch_size_is_what_the_memory_left_after_the_weights_holds(monkeypatch):
    import re
    from pipeline.train.distributed import World
    monkeypatch.delenv("PIPELINE_FORCE", raising=False)
    model, per_image, weights = _Conv(), 2 * (2 * 4 * 4 * 4), 6 * 4   # fp32 bytes: two 2x4x4 outputs; 6 weights

    def suggested(free: int, batch_size: int) -> int:
        monkeypatch.setattr(cnn_loop, "available_memory", lambda device: free)
        with pytest.raises(StageError) as refused:
            cnn_loop.refuse_too_big(model, _split([0]), _cfg(batch_size=batch_size), SINGLE)
        return int(re.search(r"batch_size=(\d+)`", str(refused.value))[1])

    # weights, gradients and Adam's two moments (4x the weights) come off first: 36.996 images fit
    assert suggested(37 * per_image + 4 * weights - 1, 200) == 36
    assert suggested(4 * weights - 1, 200) == 1          # not even the weights fit: the floor is 1
    # 201 over 2 processes is 101 a process (rounded up), so 100.5 images' worth is refused
    monkeypatch.setattr(cnn_loop, "available_memory", lambda device: int(100.5 * per_image) + 4 * weights)
    with pytest.raises(StageError):
        cnn_loop.refuse_too_big(model, _split([0]), _cfg(batch_size=201), World(0, 2, 0))


def test_a_batch_that_cannot_fit_the_memory_is_refused_before_the_first_step_unless_forced(monkeypatch):
    monkeypatch.delenv("PIPELINE_FORCE", raising=False)
    model = _Conv()
    weights = 6 * 4
    monkeypatch.setattr(cnn_loop, "available_memory", lambda device: 100 * 256 + 4 * weights)   # 100 images' worth
    cnn_loop.refuse_too_big(model, _split([0]), _cfg(batch_size=100), SINGLE)
    with pytest.raises(StageError, match=r"batch_size=101 needs about .* GiB on cpu.*"
                                         r"cnn.defaults.batch_size=100`.*PIPELINE_FORCE=1"):
        cnn_loop.refuse_too_big(model, _split([0]), _cfg(batch_size=101), SINGLE)
    from pipeline.train.distributed import World
    cnn_loop.refuse_too_big(model, _split([0]), _cfg(batch_size=200), World(0, 2, 0))   # 100 per process
    monkeypatch.setenv("PIPELINE_FORCE", "1")
    cnn_loop.refuse_too_big(model, _split([0]), _cfg(batch_size=101), SINGLE)
    # In training, before any step.
    monkeypatch.delenv("PIPELINE_FORCE")
    monkeypatch.setattr(cnn_loop, "available_memory", lambda device: 0)
    scripted = Scripted()
    with pytest.raises(StageError, match="needs about"):
        _train(_cfg(), model=scripted)
    assert scripted.train_inputs == []


# -- resuming and guarding -------------------------------------------------------------------------

def test_config_diff_names_every_differing_key_also_one_only_one_side_has():
    assert cnn_loop.config_diff({"lr": 0.1, "seed": 1, "old": None}, {"lr": 0.2, "seed": 1, "new": 3}) == [
        "lr: 0.1 -> 0.2", "new: '(absent)' -> 3", "old: None -> '(absent)'"]
    assert cnn_loop.config_diff({"a": 1}, {"a": 1}) == []


def _aged_files(folder, now, ages):
    """One small file per name, last modified `ages[name]` seconds before `now`."""
    for name, age in ages.items():
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (now - age, now - age))


def test_prune_checkpoints_removes_this_runs_leftovers_and_files_older_than_the_limit_only(tmp_path):
    now, limit = 1_000_000_000.0, cnn_loop.PRUNE_AFTER_DAYS * 86400
    keep = tmp_path / "run.pt"
    ages = {"run.pt": limit * 3, "tmp.run.pt.123": 0, "other.pt": limit + 1, "at_limit.pt": limit, "new.pt": 0}
    _aged_files(tmp_path, now, ages)
    removed = cnn_loop.prune_checkpoints(tmp_path, keep, now=now)
    assert sorted(p.name for p in removed) == ["other.pt", "tmp.run.pt.123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["at_limit.pt", "new.pt", "run.pt"]
    assert cnn_loop.prune_checkpoints(tmp_path / "none", keep) == []


def test_resume_mismatch_names_the_newest_checkpoint_and_what_differs(tmp_path):
    assert cnn_loop.resume_mismatch_message(tmp_path / "none", {}) == \
        f"no checkpoint in {tmp_path / 'none'} to resume; starting afresh"
    for i, (name, lr) in enumerate([("a.pt", 0.1), ("b.pt", 0.3), ("tmp.c.pt", 0.9)]):
        torch.save({"config": {"lr": lr, "seed": 1}}, tmp_path / name)
        os.utime(tmp_path / name, (1e9 + i, 1e9 + i))
    os.utime(tmp_path / "a.pt", (2e9, 2e9))   # the newest by time, not by name
    message = cnn_loop.resume_mismatch_message(tmp_path, {"lr": 0.2, "seed": 2})
    assert message == (f"no checkpoint for this configuration and code; the newest one, {tmp_path / 'a.pt'}, was made "
                       "with other settings; starting afresh. What differs (checkpoint -> now):\n  lr: 0.1 -> 0.2\n"
                       "  seed: 1 -> 2")


def test_a_projection_beyond_the_limit_is_refused_unless_forced(monkeypatch):
    limit = cnn_loop.MAX_PROJECTED_DAYS * 86400
    monkeypatch.delenv("PIPELINE_FORCE", raising=False)
    cnn_loop.refuse_absurd("fine", limit)                      # at the limit: runs
    with pytest.raises(StageError, match=r"^too long\nrefused: over 14 days\. .*PIPELINE_FORCE=1"):
        cnn_loop.refuse_absurd("too long", limit + 1)
    monkeypatch.setenv("PIPELINE_FORCE", "1")
    cnn_loop.refuse_absurd("forced", limit * 10)


# ---- CUDA paths without a GPU, checkpoints from elsewhere, the loop's edges ------------------------

def test_available_memory_is_the_free_memory_of_the_training_cuda_device(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (asked.append(device), (123_456_789, 10**12))[1])
    assert cnn_loop.available_memory(torch.device("cuda", 1)) == 123_456_789   # free, not total
    assert asked == [torch.device("cuda", 1)]                                  # that device, not the current one
    import psutil
    assert abs(cnn_loop.available_memory(CPU) - psutil.virtual_memory().available) < 2**30 and len(asked) == 1


def _no_gpu_but_cuda_calls_recorded(monkeypatch):
    """No GPU here: pinning and copies to a CUDA device are recorded instead of done (the tensor stays
    on the CPU, a pinned one is marked). Returns the list of copies: (device, non_blocking, from pinned)."""
    copies = []
    real_to = torch.Tensor.to

    def pin_memory(self):
        out = self.clone()
        out.pinned_for_test = True
        return out

    def to(self, *args, **kwargs):
        device = args[0] if args and isinstance(args[0], (torch.device, str, type(None))) else kwargs.get("device")
        pinned = getattr(self, "pinned_for_test", False)
        if pinned or (device is not None and torch.device(device).type == "cuda"):
            copies.append((device, kwargs.get("non_blocking", False), pinned))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    return copies


def test_splits_too_big_for_a_cuda_device_are_kept_in_pinned_host_memory(monkeypatch, capsys):
    data = _image_set()
    copies = _no_gpu_but_cuda_calls_recorded(monkeypatch)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10, 10**9))   # 10 bytes free: far too small
    cuda = torch.device("cuda")
    for keep_on_host in (None, True):
        splits = cnn_loop.to_device(data, cuda, keep_on_host=keep_on_host)
        for s, split in splits.items():
            assert split.on_host and split.device == cuda
            assert getattr(split.images, "pinned_for_test", False)     # pinned: batches copy asynchronously
            assert torch.equal(split.images, torch.from_numpy(data.images[s]))
    assert "kept in pinned host memory" in capsys.readouterr().out
    # Only the targets went to the device (one per split, per call), the images never did.
    assert [(d, pinned) for d, _, pinned in copies] == [(cuda, False)] * 6


def test_a_host_kept_batch_for_a_cuda_device_is_pinned_then_copied_without_blocking(monkeypatch):
    copies = _no_gpu_but_cuda_calls_recorded(monkeypatch)
    cuda = torch.device("cuda")
    host = _random_split(5, 4)
    split = replace(host, device=cuda, on_host=True)
    index = torch.tensor([3, 1])
    x = split.batch(index)
    assert copies == [(cuda, True, True)]        # one asynchronous copy of the pinned gathered images
    assert torch.allclose(x, host.images[index].permute(0, 3, 1, 2).float() / 127.5 - 1)


def _as_written_on_a_gpu(state, path, monkeypatch):
    """Save `state` as a CUDA run would: every tensor's storage tagged cuda:0."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)


def test_a_checkpoint_written_on_a_gpu_is_read_on_a_machine_without_one(tmp_path, monkeypatch):
    cfg = _cfg(epochs=3, log_every=1)
    _interrupt_at_epoch_log(Scripted(), _splits(), cfg, tmp_path, step=2)
    (path,) = tmp_path.iterdir()
    state = torch.load(path, weights_only=True)
    _as_written_on_a_gpu(state, path, monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # When the settings differ, the differences are named from it, not from nothing ...
    message = cnn_loop.resume_mismatch_message(tmp_path, {**state["config"], "lr": 0.2})
    assert message.endswith("What differs (checkpoint -> now):\n  lr: 0.1 -> 0.2")
    # ... and it resumes onto this run's device (a run moved from cuda:0 to cuda:1 has the same config).
    model, resumed, _ = _train(cfg, checkpoint_dir=tmp_path, resume=True)
    assert resumed.resumed_from == 1 and len(model.train_inputs) == 2


class _Payload:
    """Pickled, it makes a directory when unpickled: stands for code smuggled into a checkpoint file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_checkpoint_file_is_never_unpickled_as_code(tmp_path):
    import pickle
    cfg = _cfg(epochs=3)
    _interrupt_at_epoch_log(Scripted(), _splits(), cfg, tmp_path / "ck", step=2)
    (path,) = (tmp_path / "ck").iterdir()
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**state, "extra": _Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        _train(cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    assert not marker.exists()
    # The mismatch message reads the newest checkpoint's config the same safe way: nothing runs.
    message = cnn_loop.resume_mismatch_message(tmp_path / "ck", {"lr": 0.2})
    assert not marker.exists() and message.endswith("\n  lr: '(absent)' -> 0.2")


def test_a_checkpoint_without_a_config_shows_every_key_as_new(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "old.pt")    # written before configs were kept
    message = cnn_loop.resume_mismatch_message(tmp_path, {"lr": 0.2, "seed": 1})
    assert message.endswith("What differs (checkpoint -> now):\n  lr: '(absent)' -> 0.2\n  seed: '(absent)' -> 1")


def test_config_diff_names_a_new_key_even_when_its_value_is_none():
    assert cnn_loop.config_diff({}, {"weights_file": None}) == ["weights_file: '(absent)' -> None"]
    assert cnn_loop.config_diff({"weights_file": None}, {}) == ["weights_file: None -> '(absent)'"]


def test_a_write_in_progress_is_never_named_as_the_newest_checkpoint(tmp_path):
    torch.save({"config": {"lr": 0.1}}, tmp_path / "a.pt")
    torch.save({"config": {"lr": 0.9}}, tmp_path / "tmp.b.pt.x1.pt")    # atomic_path's temporary name
    os.utime(tmp_path / "a.pt", (1e9, 1e9))
    os.utime(tmp_path / "tmp.b.pt.x1.pt", (2e9, 2e9))                    # newer, but half written
    message = cnn_loop.resume_mismatch_message(tmp_path, {"lr": 0.2})
    assert f"the newest one, {tmp_path / 'a.pt'}," in message and message.endswith("lr: 0.1 -> 0.2")


def test_pruning_tolerates_a_file_another_starting_stage_removed_first(tmp_path):
    # Two stages sharing the folder start at once: the other one unlinks the stale file right after
    # this one has checked it (the last moment it can), and this one must not fail on that.
    class Raced(type(tmp_path)):
        def is_file(self):
            found = super().is_file()
            if found and self.name == "other.pt":
                os.unlink(self)
            return found

    now = 1_000_000_000.0
    _aged_files(tmp_path, now, {"run.pt": 0, "tmp.run.pt.1": 0, "other.pt": 30 * 86400})
    removed = cnn_loop.prune_checkpoints(Raced(tmp_path), Raced(tmp_path / "run.pt"), now=now)
    assert sorted(p.name for p in removed) == ["other.pt", "tmp.run.pt.1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_pruning_skips_a_file_another_starting_stage_removed_before_it_was_looked_at(tmp_path):
    # the other stage wins the race earlier: the file is listed, then gone before its age is read
    class Raced(type(tmp_path)):
        def stat(self, **kwargs):
            if self.name == "other.pt" and os.path.exists(self):
                os.unlink(self)
            return super().stat(**kwargs)

    now = 1_000_000_000.0
    _aged_files(tmp_path, now, {"run.pt": 0, "tmp.run.pt.1": 0, "other.pt": 30 * 86400, "older.pt": 40 * 86400})
    removed = cnn_loop.prune_checkpoints(Raced(tmp_path), Raced(tmp_path / "run.pt"), now=now)
    assert sorted(p.name for p in removed) == ["older.pt", "tmp.run.pt.1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_train_seconds_count_every_step_also_those_after_the_last_curve_point(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(cnn_loop, "time", clock)
    cfg = _cfg(epochs=1, max_steps_per_epoch=0, batch_size=2, log_every=1000)
    model, result, _ = _train(cfg, splits=_splits(n_train=28), model=Timed(clock))   # 14 steps, a point every 3
    assert [r["step"] for r in result.curve] == [3, 6, 9, 12, 14]
    assert len(model.train_inputs) == 14 and result.train_seconds == 14.0


def test_several_processes_are_checked_against_memory_for_their_share_of_the_batch(monkeypatch):
    from pipeline.train.distributed import World
    monkeypatch.delenv("PIPELINE_FORCE", raising=False)
    monkeypatch.setattr(cnn_loop.distributed, "wrap", lambda model, world, device: model)
    # The scripted model: 12 bytes of output per image, 12 bytes of weights (48 with grads and Adam).
    monkeypatch.setattr(cnn_loop, "available_memory", lambda device: 2 * 12 + 48)   # 2 images' worth
    cfg = _cfg(epochs=1, batch_size=4)
    model = Scripted()
    cnn_loop.train(model, _splits(), cfg, 0, lambda m, s: None, world=World(1, 2, 1))   # 2 a process: fits
    assert len(model.train_inputs) == 1
    with pytest.raises(StageError, match="batch_size=4 needs about"):
        _train(cfg)                                                                      # 4 in one: refused


def test_the_refusal_of_an_absurd_projection_carries_the_projection(monkeypatch):
    monkeypatch.setattr(cnn_loop, "projection", lambda *a: ("projected: 99 days (3 s/step)", 99 * 86400.0))
    monkeypatch.delenv("PIPELINE_FORCE", raising=False)
    with pytest.raises(StageError) as refused:
        _train(_cfg(epochs=1, max_steps_per_epoch=0, batch_size=1))
    assert str(refused.value).startswith("projected: 99 days (3 s/step)\nrefused: over 14 days.")


def test_a_run_with_finite_scores_says_nothing_about_non_finite_ones(capsys):
    _train(_cfg(epochs=2))
    assert "no epoch had a finite" not in capsys.readouterr().out


def test_progress_is_labelled_cnn_unless_the_caller_names_it(monkeypatch):
    from pipeline import progress
    names, real_bar = [], progress.bar
    monkeypatch.setattr(progress, "bar", lambda steps, name, **k: (names.append(name), real_bar(steps, name, **k))[1])
    _train(_cfg(epochs=2))
    assert names == ["cnn epoch 1/2", "cnn epoch 2/2"]


def test_a_run_without_a_checkpoint_folder_does_not_hash_the_data(tmp_path, monkeypatch):
    # Hashing every split is seconds of work on a large set, needed only to name a checkpoint.
    hashed, real = [], cnn_loop.data_digest
    monkeypatch.setattr(cnn_loop, "data_digest", lambda splits: (hashed.append(1), real(splits))[1])
    _train(_cfg(epochs=1))
    assert hashed == []
    _train(_cfg(epochs=1), checkpoint_dir=tmp_path)
    assert hashed == [1]
