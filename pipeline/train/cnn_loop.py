"""One training loop for every CNN experiment.

The whole split lives on the device as one uint8 tensor; batches are taken by index, normalised
and augmented on the device; channels_last; bf16 autocast on CUDA; large evaluation batches.
Metrics are MedMNIST's own (`medmnist.evaluator.getAUC/getACC`). A checkpoint is written after
every epoch so an interrupted run can resume where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from medmnist.evaluator import getACC, getAUC

from pipeline import progress
from pipeline.data.pathmnist import PathMnist
from pipeline.params import Cnn
from pipeline.errors import StageError
from pipeline.train import augment

TASK = "multi-class"


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("base.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_determinism(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    if device.type == "cuda":
        # Deterministic cuDNN kernels; a few ops (e.g. grid_sample's backward, unused here for
        # inputs) have no deterministic CUDA version, so warn rather than fail.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class DeviceSplit:
    images: torch.Tensor   # (N, H, W, 3) uint8 on the device
    labels: torch.Tensor   # (N,) int64 on the device
    labels_np: np.ndarray

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """Float NCHW batch in channels_last memory layout (a permuted view of NHWC)."""
        return augment.to_input(self.images[index].permute(0, 3, 1, 2))


def to_device(data: PathMnist, device: torch.device) -> dict[str, DeviceSplit]:
    return {s: DeviceSplit(torch.from_numpy(data.images[s]).to(device), torch.from_numpy(data.labels[s]).to(device),
                           data.labels[s]) for s in data.images}


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict(model: torch.nn.Module, split: DeviceSplit, batch_size: int) -> np.ndarray:
    """Softmax scores (N, classes) as float32 numpy."""
    was_training = model.training
    model.eval()
    device = split.images.device
    scores = []
    for i in range(0, len(split.labels), batch_size):
        index = torch.arange(i, min(i + batch_size, len(split.labels)), device=device)
        with _autocast(device):
            logits = model(split.batch(index))
        scores.append(torch.softmax(logits.float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(scores).numpy()


def evaluate(model, split: DeviceSplit, batch_size: int) -> tuple[dict, np.ndarray]:
    scores = predict(model, split, batch_size)
    return {"auc": float(getAUC(split.labels_np, scores, TASK)), "acc": float(getACC(split.labels_np, scores, TASK))}, scores


def make_scheduler(optimizer, cfg: Cnn):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.step_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def train_step(model: torch.nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward (bf16 autocast on CUDA), cross-entropy, backward, optimiser step."""
    with _autocast(x.device):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@dataclass
class TrainResult:
    best_state: dict
    best_epoch: int
    best_val: dict
    curve: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    images_seen: int = 0
    resumed_from: int = 0


def fingerprint(cfg: Cnn, seed: int, splits: dict[str, DeviceSplit], data_source: str) -> str:
    """What a checkpoint must match to be resumed: the training config, seed and data."""
    relevant = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "eval_batch_size", "log_every")}
    shapes = {s: list(split.images.shape) for s, split in splits.items()}
    return hashlib.sha256(json.dumps([relevant, seed, shapes, data_source], sort_keys=True).encode()).hexdigest()


def projection(model, splits: dict[str, DeviceSplit], cfg: Cnn, label: str, seconds_per_step: float,
               steps_per_epoch: int, epochs_left: int) -> str:
    """The projected time of the rest of the stage, from the timed steps and one timed
    evaluation batch (eval mode: no state changes, no random numbers drawn)."""
    val = splits["val"]
    k = min(cfg.eval_batch_size, len(val.labels))
    start = time.perf_counter()
    predict(model, DeviceSplit(val.images[:k], val.labels[:k], val.labels_np[:k]), cfg.eval_batch_size)
    eval_seconds = (time.perf_counter() - start) / k
    total, per_epoch, detail = progress.cnn_projection(seconds_per_step, eval_seconds, steps_per_epoch, epochs_left,
                                                       cfg.log_every, len(val.labels), len(splits["test"].labels))
    device = val.images.device
    return progress.projection_message(label, device.type, total, detail, on_cpu=device.type == "cpu",
                                       seconds_per_epoch=per_epoch, steps_per_epoch=steps_per_epoch,
                                       epochs=epochs_left, size=val.images.shape[1])


def train(model: torch.nn.Module, splits: dict[str, DeviceSplit], cfg: Cnn, seed: int,
          log: Callable[[dict, int], None], checkpoint: Path | None = None, data_source: str = "",
          label: str = "cnn") -> TrainResult:
    """Train on `splits` (from `to_device`), keep the best-validation weights in `model`."""
    train_split, val_split = splits["train"], splits["val"]
    device = train_split.images.device
    set_determinism(seed, device)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    generator = torch.Generator(device=device).manual_seed(seed)
    n = len(train_split.labels)
    steps_per_epoch = -(-n // cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    key = fingerprint(cfg, seed, splits, data_source)
    result = TrainResult(best_state={}, best_epoch=0, best_val={"auc": -1.0, "acc": -1.0})
    start_epoch, step = 1, 0

    if checkpoint is not None and cfg.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("fingerprint") == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"].cpu())
            result = TrainResult(best_state=state["best_state"], best_epoch=state["best_epoch"],
                                 best_val=state["best_val"], curve=state["curve"],
                                 train_seconds=state["train_seconds"], images_seen=state["images_seen"],
                                 resumed_from=state["epoch"])
            start_epoch, step = state["epoch"] + 1, state["step"]
            print(f"resuming from {checkpoint} after epoch {state['epoch']}")
        else:
            print(f"{checkpoint} is from another configuration; starting afresh")

    model.train()
    running, running_n = 0.0, 0
    timer = progress.StepTimer(steps_per_epoch, sync=torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            # The logged train loss averages the steps since the last log within this epoch, so a
            # run resumed at an epoch boundary logs exactly what an uninterrupted run logs.
            running, running_n = 0.0, 0
            order = torch.randperm(n, device=device, generator=generator)
            tick = epoch_start = time.perf_counter()
            bar = progress.bar(steps_per_epoch, f"{label} epoch {epoch}/{cfg.epochs}", items_per_step=cfg.batch_size)
            for i in range(steps_per_epoch):
                timer.begin()
                index = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                x = augment.apply(train_split.batch(index), cfg.augment, cfg.rotation_degrees, generator)
                loss = train_step(model, optimizer, x, train_split.labels[index])
                seconds_per_step = timer.end()
                if seconds_per_step is not None:
                    progress.say(projection(model, splits, cfg, label, seconds_per_step, steps_per_epoch,
                                            cfg.epochs - epoch + 1))
                bar.step(loss)
                step += 1
                result.images_seen += len(index)
                running += loss.detach()
                running_n += 1
                if step % cfg.log_every == 0:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    result.train_seconds += time.perf_counter() - tick
                    val, _ = evaluate(model, val_split, cfg.eval_batch_size)
                    row = {"step": step, "epoch": epoch, "train_loss": float(running) / running_n,
                           "val_auc": val["auc"], "val_acc": val["acc"]}
                    result.curve.append(row)
                    log({"train_loss": row["train_loss"], "val_auc": val["auc"], "val_acc": val["acc"]}, step)
                    running, running_n = 0.0, 0
                    tick = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.synchronize()
            result.train_seconds += time.perf_counter() - tick
            bar.close()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            val, _ = evaluate(model, val_split, cfg.eval_batch_size)
            progress.epoch_line(epoch, cfg.epochs, time.perf_counter() - epoch_start, prefix=label,
                                train_loss=bar.mean_loss, val_auc=val["auc"], val_acc=val["acc"], lr=lr)
            log({"epoch_val_auc": val["auc"], "epoch_val_acc": val["acc"], "lr": optimizer.param_groups[0]["lr"]}, step)
            if val[cfg.select_by] > result.best_val[cfg.select_by]:
                result.best_val, result.best_epoch = val, epoch
                result.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if checkpoint is not None:
                _save_checkpoint(checkpoint, {
                    "fingerprint": key, "epoch": epoch, "step": step, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(), "best_state": result.best_state,
                    "best_epoch": result.best_epoch, "best_val": result.best_val, "curve": result.curve,
                    "train_seconds": result.train_seconds, "images_seen": result.images_seen})
    except torch.cuda.OutOfMemoryError:
        raise StageError(f"CUDA out of memory with cnn.batch_size={cfg.batch_size} and "
                         f"cnn.eval_batch_size={cfg.eval_batch_size}; try smaller values, e.g. "
                         f"`dvc exp run -S cnn.defaults.batch_size={max(1, cfg.batch_size // 2)}`") from None
    if running_n:   # end the curve at the last step
        val, _ = evaluate(model, val_split, cfg.eval_batch_size)
        result.curve.append({"step": step, "epoch": cfg.epochs, "train_loss": float(running) / running_n,
                             "val_auc": val["auc"], "val_acc": val["acc"]})
    model.load_state_dict(result.best_state)
    return result


def _save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a checkpoint is either the previous epoch's or this one's, never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)
