"""One training loop for every CNN experiment.

The whole split lives on the device as one uint8 tensor (or, when it does not fit, in pinned host
memory with batches copied asynchronously); batches are taken by index, normalised and augmented
on the device; channels_last; bf16 autocast for training on CUDA, fp32 for every evaluation;
large evaluation batches. Loss, scores and metrics follow the set's MedMNIST task
(`pipeline.train.tasks`; metrics are `medmnist.evaluator.getAUC/getACC`). A checkpoint is written
after every epoch so an interrupted run can resume where it stopped. Under torchrun the same loop
trains one model on several devices (`pipeline.train.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline import progress
from pipeline.data.images import ImageSet
from pipeline.errors import StageError
from pipeline.models.cnn import resize_batch
from pipeline.outputs import atomic_path
from pipeline.params import Cnn
from pipeline.train import augment, distributed, tasks
from pipeline.train.distributed import SINGLE, World


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
    images: torch.Tensor   # (N, H, W, C) uint8 on the device, or in (pinned) host memory if on_host
    labels: torch.Tensor   # on the device, as the loss takes them (`tasks.targets`)
    labels_np: np.ndarray  # as stored, for MedMNIST's metrics
    device: torch.device | None = None   # where the model computes (default: where the images are)
    on_host: bool = False
    task: str = "multi-class"
    size: int = 0          # the size the model sees (`cnn.upsample_to`); 0 = the images' own

    def __post_init__(self):
        if self.device is None:
            self.device = self.images.device

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """Float NCHW batch on the device, channels_last memory layout (a permuted view of NHWC)."""
        if self.on_host:   # gather on the host, copy to the device without blocking the host
            images = self.images[index.cpu()]
            if self.device.type == "cuda":
                images = images.pin_memory()
            images = images.to(self.device, non_blocking=True)
        else:
            images = self.images[index]
        x = augment.to_input(images.permute(0, 3, 1, 2))
        return resize_batch(x, self.size) if self.size else x


# Share of the device's free memory the image splits may take; the rest is for the model's
# weights, optimiser state and activations.
DEVICE_SHARE = 0.5


def too_big_for(data: ImageSet, device: torch.device) -> bool:
    """Whether the image splits would take more than DEVICE_SHARE of the CUDA device's free memory."""
    return device.type == "cuda" and \
        sum(a.nbytes for a in data.images.values()) > DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]


def to_device(data: ImageSet, device: torch.device, keep_on_host: bool | None = None,
              size: int = 0) -> dict[str, DeviceSplit]:
    """Every split on the device, or (keep_on_host, or by default when the splits would take more
    than DEVICE_SHARE of the device's free memory) in pinned host memory, batches copied over."""
    if keep_on_host is None:
        keep_on_host = too_big_for(data, device)
        if keep_on_host:
            print("the image splits do not fit on the device: kept in pinned host memory, batches copied over")
    splits = {}
    for s in data.images:
        images = torch.from_numpy(data.images[s])
        if not keep_on_host:
            images = images.to(device)
        elif device.type == "cuda":
            images = images.pin_memory()
        splits[s] = DeviceSplit(images, tasks.targets(data.labels[s], data.task).to(device), data.labels[s],
                                device, keep_on_host, data.task, size)
    return splits


def out_of_memory_message(cfg: Cnn) -> str:
    return (f"CUDA out of memory with cnn.batch_size={cfg.batch_size} and cnn.eval_batch_size={cfg.eval_batch_size}; "
            f"try smaller values, e.g. `dvc exp run -S cnn.defaults.batch_size={max(1, cfg.batch_size // 2)}` "
            f"or `-S cnn.defaults.eval_batch_size={max(1, cfg.eval_batch_size // 2)}`")


@contextmanager
def out_of_memory_advice(cfg: Cnn):
    """Turn a CUDA out-of-memory error anywhere inside (moving the data, training, evaluating)
    into a StageError that names the params to change."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise StageError(out_of_memory_message(cfg)) from None


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict(model: torch.nn.Module, split: DeviceSplit, batch_size: int) -> np.ndarray:
    """Scores (N, outputs) as float32 numpy (softmax, or sigmoid per label), computed in fp32 (no
    autocast: bf16 logits would quantise the scores into AUC ties and could change the selected epoch)."""
    was_training = model.training
    model.eval()
    scores = []
    for i in range(0, len(split.labels), batch_size):
        index = torch.arange(i, min(i + batch_size, len(split.labels)), device=split.device)
        logits = model(split.batch(index))
        scores.append(tasks.scores(logits, split.task).cpu())
    model.train(was_training)
    return torch.cat(scores).numpy()


def evaluate(model, split: DeviceSplit, batch_size: int) -> tuple[dict, np.ndarray]:
    scores = predict(model, split, batch_size)
    return tasks.evaluate(split.labels_np, scores, split.task), scores


def make_scheduler(optimizer, cfg: Cnn):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.step_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def train_step(model: torch.nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor,
               task: str = "multi-class") -> torch.Tensor:
    """Forward (bf16 autocast on CUDA), the task's loss, backward, optimiser step."""
    with _autocast(x.device):
        loss = tasks.loss(model(x), y, task)
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
    resumed_from: int = 0            # the epoch a resumed run continued after (0: not resumed)
    checkpoint: Path | None = None   # this run's epoch checkpoint (the caller removes it on success)


# The code a checkpoint's training depends on (callers add their own files, e.g. the stage script
# and the model factory): a change to any of them makes an old checkpoint unusable.
LOOP_SOURCES = (Path(__file__), Path(augment.__file__))

# Files in a stage's checkpoint folder that no run has touched for this long are removed at the
# next start of that stage: checkpoints of runs that never finished (or whose stage DVC restored
# from its run-cache instead) and temporary files of killed writes. A live run rewrites its own
# checkpoint after every epoch.
PRUNE_AFTER_DAYS = 7
# Refuse, before training on, a run projected to take longer than this (PIPELINE_FORCE=1 runs it anyway).
MAX_PROJECTED_DAYS = 14


def source_digest(files) -> str:
    digest = hashlib.sha256()
    for path in sorted({Path(f).resolve() for f in files}):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def data_digest(splits: dict[str, DeviceSplit]) -> str:
    """sha256 of every split's images and labels, in split order (their contents, not their shapes)."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        split = splits[name]
        for array in (split.images.cpu().contiguous().numpy(), np.ascontiguousarray(split.labels_np)):
            digest.update(f"{name}:{array.dtype}:{array.shape}\0".encode())
            digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def run_config(cfg: Cnn, seed: int, splits: dict[str, DeviceSplit], data_source: str, code_files=()) -> dict:
    """Everything a checkpoint's training depends on, by name: every key of the config (log_every
    shapes the curve, eval_batch_size the evaluation's rounding), the seed, the data's content
    digest and source, the task, the model's input size, the device type and the source digest
    of the loop, the augmentations and the caller's `code_files`."""
    return {**asdict(cfg), "seed": seed, "data_digest": data_digest(splits), "data_source": data_source,
            "task": splits["train"].task, "input_size": splits["train"].size,
            "device_type": splits["train"].device.type, "code": source_digest([*LOOP_SOURCES, *code_files])}


def config_fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def fingerprint(cfg: Cnn, seed: int, splits: dict[str, DeviceSplit], data_source: str,
                code_files=()) -> str:
    """What a checkpoint must match to be resumed: the hash of `run_config`."""
    return config_fingerprint(run_config(cfg, seed, splits, data_source, code_files))


def config_diff(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every key whose value differs (a key only one side has included)."""
    missing = "(absent)"
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
            for k in sorted(old.keys() | new.keys()) if old.get(k, missing) != new.get(k, missing)]


def prune_checkpoints(folder: Path, keep: Path, now: float | None = None) -> list[Path]:
    """At a stage's start: remove the temporary files of `keep` (a killed write of this very run)
    and every other file untouched for PRUNE_AFTER_DAYS. Returns what was removed."""
    if not folder.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for path in folder.iterdir():
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:   # another stage starting beside this one pruned it first
            continue
        ours = path.name.startswith(f"tmp.{keep.name}.")
        old = path != keep and now - mtime > PRUNE_AFTER_DAYS * 86400
        if path.is_file() and (ours or old):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _saved_config(path: Path) -> dict:
    try:   # mmap: only the small config is read from a checkpoint of hundreds of MB
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config", {})
    except Exception:  # noqa: BLE001 - an unreadable old checkpoint only means no diff to show
        return {}


def resume_mismatch_message(folder: Path, config: dict) -> str:
    """Why there is nothing to resume: no checkpoint at all, or what differs from the newest one."""
    others = sorted((p for p in folder.glob("*.pt") if not p.name.startswith("tmp.")),
                    key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    if not others:
        return f"no checkpoint in {folder} to resume; starting afresh"
    diff = config_diff(_saved_config(others[0]), config)
    return (f"no checkpoint for this configuration and code; the newest one, {others[0]}, was made with "
            f"other settings; starting afresh. What differs (checkpoint -> now):\n  " + "\n  ".join(diff))


def projection(model, splits: dict[str, DeviceSplit], cfg: Cnn, label: str, seconds_per_step: float,
               steps_per_epoch: int, epochs_left: int) -> tuple[str, float]:
    """The projected time of the rest of the stage (message, seconds), from the timed steps and
    one timed evaluation batch (eval mode: no state changes, no random numbers drawn)."""
    val = splits["val"]
    k = min(cfg.eval_batch_size, len(val.labels))
    start = time.perf_counter()
    predict(model, replace(val, images=val.images[:k], labels=val.labels[:k], labels_np=val.labels_np[:k]),
            cfg.eval_batch_size)
    eval_seconds = (time.perf_counter() - start) / k
    total, per_epoch, detail = progress.cnn_projection(seconds_per_step, eval_seconds, steps_per_epoch, epochs_left,
                                                       curve_interval(cfg.log_every, steps_per_epoch), len(val.labels),
                                                       len(splits["test"].labels))
    return progress.projection_message(label, val.device.type, total, detail, on_cpu=val.device.type == "cpu",
                                       seconds_per_epoch=per_epoch, steps_per_epoch=steps_per_epoch,
                                       epochs=epochs_left, size=val.size or val.images.shape[1]), total


def refuse_absurd(message: str, seconds: float) -> None:
    """Stop before training on when the projection is beyond any reasonable wait, unless forced."""
    if seconds > MAX_PROJECTED_DAYS * 86400 and os.environ.get("PIPELINE_FORCE", "") != "1":
        raise StageError(f"{message}\nrefused: over {MAX_PROJECTED_DAYS} days. Lower cnn epochs, steps or image "
                         "size (above), or set PIPELINE_FORCE=1 to run it anyway")


@torch.no_grad()
def activation_bytes_per_image(model: torch.nn.Module, split: DeviceSplit) -> int:
    """Bytes of the outputs of every leaf module for one image in fp32: about what autograd keeps
    per training image (eval mode: no state changes, no random numbers drawn)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        total += sum(t.numel() * 4 for t in (output if isinstance(output, (tuple, list)) else [output])
                     if isinstance(t, torch.Tensor))

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        model(split.batch(torch.arange(1, device=split.device)))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total


def available_memory(device: torch.device) -> int:
    """Free bytes where training runs: the CUDA device's, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def refuse_too_big(model: torch.nn.Module, split: DeviceSplit, cfg: Cnn, world: World = SINGLE) -> None:
    """Stop before the first step when one training batch's activations plus the weights, their
    gradients and Adam's two moments cannot fit the memory there is, unless forced. An estimate
    on the low side: it only refuses what cannot run."""
    batch = -(-cfg.batch_size // world.size)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    needed = batch * activation_bytes_per_image(model, split) + 4 * weights
    free = available_memory(split.device)
    if needed > free and os.environ.get("PIPELINE_FORCE", "") != "1":
        fits = max(1, int(batch * (free - 4 * weights) / max(needed - 4 * weights, 1)))
        raise StageError(f"cnn batch_size={cfg.batch_size} needs about {needed / 2**30:.1f} GiB on "
                         f"{split.device.type}, which has {free / 2**30:.1f} GiB free; try `dvc exp run -S "
                         f"cnn.defaults.batch_size={fits}` (or smaller images), or set PIPELINE_FORCE=1 to try anyway")


def _selection_value(val: dict, key: str) -> float:
    """The validation score epochs are compared by; NaN (e.g. AUC of a split missing a class) counts as the worst."""
    value = val.get(key, math.nan)
    return -math.inf if value is None or math.isnan(value) else value


def _better(val: dict, best: dict, key: str) -> bool:
    """Whether this epoch replaces the best so far: the first epoch always; later ones when strictly
    better, or when neither has a finite score (so an all-NaN run keeps its last epoch)."""
    if not best:
        return True
    new, old = _selection_value(val, key), _selection_value(best, key)
    return new > old or new == old == -math.inf


def train(model: torch.nn.Module, splits: dict[str, DeviceSplit], cfg: Cnn, seed: int,
          log: Callable[[dict, int], None], checkpoint_dir: Path | None = None, data_source: str = "",
          code_files=(), world: World = SINGLE, label: str = "cnn", resume: bool = False) -> TrainResult:
    """Train on `splits` (from `to_device`), keep the best-validation weights in `model`.

    With `checkpoint_dir`, a checkpoint named by the run's fingerprint is written there after every
    epoch (with the config it was made with and every `log` call so far), and `resume` continues
    from it, first replaying those `log` calls so the new run carries the whole curve; the caller
    deletes it (`result.checkpoint`) once its outputs are written. At the start, stale files of the
    folder are pruned (`prune_checkpoints`). With a `world` of several processes (torchrun), each
    rank trains on its share of every global batch; only rank 0 writes checkpoints (every rank logs
    through `log`: the caller passes a no-op on the others).
    """
    train_split, val_split = splits["train"], splits["val"]
    device = train_split.device
    set_determinism(seed, device)
    model = model.to(device, memory_format=torch.channels_last)
    net = distributed.wrap(model, world, device)   # `model` itself in one process
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    generator = torch.Generator(device=device).manual_seed(seed)
    n = len(train_split.labels)
    steps_per_epoch = -(-n // cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    log_every = curve_interval(cfg.log_every, steps_per_epoch)
    config = run_config(cfg, seed, splits, data_source, code_files) if checkpoint_dir is not None else {}
    key = config_fingerprint(config)
    checkpoint = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{key[:16]}.pt"
    result = TrainResult(best_state={}, best_epoch=0, best_val={}, checkpoint=checkpoint)
    logged: list[tuple[dict, int]] = []   # every log call, kept in the checkpoint for a resumed run

    def record(metrics: dict, at: int) -> None:
        logged.append((metrics, at))
        log(metrics, at)

    start_epoch, step = 1, 0
    if checkpoint is not None and world.is_main:
        for path in prune_checkpoints(checkpoint.parent, checkpoint):
            print(f"removed stale checkpoint file {path}")
    if checkpoint is not None and resume and not checkpoint.exists():
        print(resume_mismatch_message(checkpoint.parent, config))
    if checkpoint is not None and resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("config") != config:
            print("\n  ".join([f"{checkpoint} was made with other settings; starting afresh. What differs:",
                                *config_diff(state.get("config", {}), config)]))
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"].cpu())
            result = TrainResult(best_state=state["best_state"], best_epoch=state["best_epoch"],
                                 best_val=state["best_val"], curve=state["curve"],
                                 train_seconds=state["train_seconds"], images_seen=state["images_seen"],
                                 resumed_from=state["epoch"], checkpoint=checkpoint)
            start_epoch, step = state["epoch"] + 1, state["step"]
            print(f"resuming from {checkpoint} after epoch {state['epoch']}")
            for metrics, at in state["logged"]:   # the history before the interruption, with its steps
                record(metrics, at)

    refuse_too_big(model, val_split, cfg, world)   # one validation image: eval mode, no state changes
    model.train()
    # Progress bars, the projected time and epoch lines (one process prints them under torchrun).
    timer = progress.StepTimer(steps_per_epoch, sync=torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    for epoch in range(start_epoch, cfg.epochs + 1):
        # The logged train loss averages the steps since the last log within this epoch, so a
        # run resumed at an epoch boundary logs exactly what an uninterrupted run logs.
        running, running_n = 0.0, 0
        order = torch.randperm(n, device=device, generator=generator)
        tick = epoch_start = time.perf_counter()
        bar = progress.bar(steps_per_epoch, f"{label} epoch {epoch}/{cfg.epochs}", items_per_step=cfg.batch_size,
                           **({} if world.is_main else {"disable": True}))
        for i in range(steps_per_epoch):
            timer.begin()
            index = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = augment.apply(train_split.batch(index), cfg.augment, cfg.rotation_degrees, generator,
                              cfg.rotation_interpolation)
            mine = distributed.shard(len(index), world, device)   # all positions in one process
            loss = train_step(net, optimizer, x[mine], train_split.labels[index][mine], train_split.task)
            seconds_per_step = timer.end()
            if seconds_per_step is not None and world.is_main:
                paused = time.perf_counter()   # the projection's evaluation batch is not training time
                message, projected = projection(model, splits, cfg, label, seconds_per_step, steps_per_epoch,
                                                cfg.epochs - epoch + 1)
                progress.say(message)
                refuse_absurd(message, projected)
                tick += time.perf_counter() - paused
            bar.step(loss)
            step += 1
            result.images_seen += len(index)
            running += loss.detach()
            running_n += 1
            if step % log_every == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                result.train_seconds += time.perf_counter() - tick
                val, _ = evaluate(model, val_split, cfg.eval_batch_size)
                row = {"step": step, "epoch": epoch, "train_loss": float(running) / running_n,
                       "val_auc": val["auc"], "val_acc": val["acc"]}
                result.curve.append(row)
                record({"train_loss": row["train_loss"], "val_auc": val["auc"], "val_acc": val["acc"]}, step)
                running, running_n = 0.0, 0
                tick = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
        result.train_seconds += time.perf_counter() - tick
        bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val, _ = evaluate(model, val_split, cfg.eval_batch_size)
        if world.is_main:
            progress.epoch_line(epoch, cfg.epochs, time.perf_counter() - epoch_start, prefix=label,
                                train_loss=bar.mean_loss, val_auc=val["auc"], val_acc=val["acc"], lr=lr)
            if math.isnan(val[cfg.select_by]):
                print(f"epoch {epoch}: validation {cfg.select_by} is NaN (a class missing from the validation "
                      "split?); counted as the worst score for choosing the best epoch")
        # lr: the one this epoch's steps trained with (read before scheduler.step), at its last step
        record({"epoch_val_auc": val["auc"], "epoch_val_acc": val["acc"], "lr": lr}, step)
        if _better(val, result.best_val, cfg.select_by):
            result.best_val, result.best_epoch = val, epoch
            result.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if epoch == cfg.epochs and running_n:   # end the curve at the last step (before the last
            # checkpoint, so a run resumed from it writes the same full curve)
            result.curve.append({"step": step, "epoch": epoch, "train_loss": float(running) / running_n,
                                 "val_auc": val["auc"], "val_acc": val["acc"]})
            record({"train_loss": result.curve[-1]["train_loss"], "val_auc": val["auc"], "val_acc": val["acc"]},
                   step)   # MLflow's curve ends where the CSV's does
        if checkpoint is not None and world.is_main:
            _save_checkpoint(checkpoint, {
                "fingerprint": key, "config": config, "epoch": epoch, "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(), "best_state": result.best_state,
                "best_epoch": result.best_epoch, "best_val": result.best_val, "curve": result.curve,
                "train_seconds": result.train_seconds, "images_seen": result.images_seen, "logged": logged})
    if world.is_main and math.isnan(result.best_val.get(cfg.select_by, 0.0)):
        print(f"no epoch had a finite validation {cfg.select_by}: kept the last epoch's weights "
              f"(epoch {result.best_epoch})")
    model.load_state_dict(result.best_state)
    return result


def curve_interval(log_every: int, steps_per_epoch: int) -> int:
    """Steps between curve points: `log_every`, but at least 4 points per epoch (every step of an
    epoch shorter than 4), so no curve is a single dot when an epoch is shorter than `log_every`."""
    return max(1, min(log_every, steps_per_epoch // 4))


def _save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a checkpoint is either the previous epoch's or this one's, never half written."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
