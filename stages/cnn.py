"""Stage for every CNN experiment (resnet18, densenet121, finetune, ablation@<name>): train with
the shared loop, keep the best-validation model, evaluate it once on the test split.

With `cnn.devices` > 1 the stage runs itself under torchrun, one process per device (DVC's `cmd`
stays the same); rank 0 alone logs to MLflow and writes the outputs."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline import devices, figures, params as P, results as R
from pipeline.data import fetch, images
from pipeline.errors import StageError
from pipeline.models import cnn
from pipeline.outputs import atomic_path, write_csv
from pipeline.paths import images_npz, main_repo_root
from pipeline.runtime import run_stage, seed_everything
from pipeline.tracking import Tracker
from pipeline.train import cnn_loop, distributed, tasks

# Besides the loop and augmentations: the code a checkpoint's training depends on.
CODE_FILES = (__file__, cnn.__file__, images.__file__, tasks.__file__, distributed.__file__)


def checkpoint_dir(name: str) -> Path:
    """Epoch checkpoints: outside DVC's view (a DVC output would stop the run-cache from restoring
    the stage), git-ignored, and in the user's repository also for `dvc exp run --temp/--queue`,
    whose temporary copies are deleted with whatever they hold."""
    return main_repo_root() / ".dvc" / "tmp" / "checkpoints" / name


def resume_requested() -> bool:
    """PIPELINE_RESUME=1: continue from this run's epoch checkpoint. An environment variable, not a
    param, so asking for it neither makes a stage stale nor changes the run-cache's key."""
    value = os.environ.get("PIPELINE_RESUME", "").strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise StageError(f"PIPELINE_RESUME={value!r}: set it to 1 to resume from the epoch checkpoint, or unset it")
    return value in ("1", "true", "yes")


def check_devices(devices: int) -> None:
    """`cnn.devices` processes must fit the machine: one per GPU, or one per CPU core without CUDA."""
    available, kind = (torch.cuda.device_count(), "GPU(s)") if torch.cuda.is_available() \
        else (os.cpu_count() or 1, "CPU core(s)")
    if devices > available:
        raise StageError(f"cnn devices={devices} but this machine has {available} {kind}; "
                         f"set `-S cnn.defaults.devices={available}` (or fewer)")


def main(argv):
    (name,) = argv
    params = P.load()
    cfg = params.cnn_experiment(name)
    resume_requested()   # a bad value fails here, before torchrun starts
    if cfg.devices > 1 and not distributed.under_torchrun():
        check_devices(cfg.devices)
        command = distributed.torchrun_command(cfg.devices, "stages.cnn", argv)
        print(f"{name}: training on {cfg.devices} processes: {' '.join(command[1:])}", flush=True)
        os.execv(command[0], command)   # torchrun takes this process over (and its signals)
    world, device = distributed.init()
    with cnn_loop.out_of_memory_advice(cfg):   # anywhere: moving the splits, training, testing
        run(name, params, cfg, world, device or devices.resolve_device(params.base.device))
    distributed.teardown(world)


def run(name: str, params: P.Params, cfg: P.Cnn, world: distributed.World, device: torch.device) -> None:
    spec = params.data.images
    data = images.load(images_npz(spec.name, spec.size))
    seed_everything(params.base.seed)   # before the model: its initial weights come from the seed
    size = cnn.check_image_size(cfg.model, data.size, cfg.upsample_to)
    model = cnn.build(cfg.model, data.n_classes, cfg.pretrained, cfg.weights_file, cfg.weights_sha256,
                      in_channels=data.channels)
    out = R.cnn(name)
    identity = data_identity(data, images_npz(spec.name, spec.size)) if world.is_main else {}
    source = f"{data.title} {data.size}px ({data.source})"   # for people: the MLflow UI, logs
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tracker = Tracker("cnn", name, data_source=source,
                      extra_tags={"device": device_name, "dataset": data.title, "task": data.task,
                                  "processes": str(world.size), **R.data_tags(identity)}) if world.is_main else None

    with tracker or nullcontext():
        if tracker:
            tracker.params({"experiment": name, "seed": params.base.seed, "dataset": data.name,
                            "image_size": data.size, "model_input_size": size, "task": data.task,
                            "n_train": len(data.labels["train"]), **asdict(cfg)})
            tracker.dataset(f"{data.name}_{data.size}", str(images_npz(spec.name, spec.size).resolve()),
                            data.source, {s: len(data.labels[s]) for s in images.SPLITS})
        splits = cnn_loop.to_device(data, device, size=size if size != data.size else 0)
        result = cnn_loop.train(model, splits, cfg, params.base.seed,
                                tracker.metrics if tracker else (lambda metrics, step: None),
                                checkpoint_dir=checkpoint_dir(name), data_source=data.source,
                                code_files=CODE_FILES, world=world, resume=resume_requested(),
                                label=f"{'ablation' if name in params.cnn.ablations else 'cnn'}@{name}")
        if not world.is_main:
            return
        if result.resumed_from:
            tracker.tag("resumed_from", result.resumed_from)   # the history before it was re-logged by the loop
        test, scores = cnn_loop.evaluate(model, splits["test"], cfg.eval_batch_size)
        metrics = {"test_auc": test["auc"], "test_acc": test["acc"]}   # the headline file takes the AUC
        details = {"best_val_auc": result.best_val["auc"], "best_val_acc": result.best_val["acc"],
                   "best_epoch": result.best_epoch}
        notes = nan_notes({**metrics, **details}, cfg.select_by)
        details = finite({**metrics, **details})
        if notes:
            details["notes"] = notes
            print("\n".join(notes))
        timing = {"train_seconds": round(result.train_seconds, 2),
                  "images_per_second": round(result.images_seen / max(result.train_seconds, 1e-9), 1)}
        tracker.metrics({**details, **timing})

        summary = tasks.prediction_summary(data.labels["test"], scores, data.task, data.n_classes)
        confusion_png = out.figures / "confusion.png"
        if summary["kind"] == "confusion":
            pairs = summary["pairs"]
            fig_path = figures.confusion(summary["matrix"], f"{name}: {data.title} test confusion matrix", confusion_png)
        else:   # multi-label: one 2x2 block per label ("<label>:<0|1>") in the plot, the per-label table
            pairs = _per_label_pairs(data.labels["test"], tasks.predictions(scores, data.task))
            details["per_label"] = summary["rows"]
            fig_path = figures.per_label(summary["rows"], f"{name}: {data.title} per-label test outcomes", confusion_png)
        tracker.artifact(fig_path, "figures")
        model_path = out.model
        if world.size > 1:   # the plain torchvision model, without DDP's synchronised BatchNorm
            plain = cnn.build(cfg.model, data.n_classes, in_channels=data.channels)
            plain.load_state_dict(model.state_dict())
            model = plain
        model = model.cpu().to(memory_format=torch.contiguous_format).eval()
        with atomic_path(model_path, suffix=".pt") as tmp:
            torch.save(model.state_dict(), tmp)
        example = data.images["test"][:2].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
        if size != data.size:
            example = cnn.resize_batch(torch.from_numpy(example), size).numpy()
        tracker.torch_model(model, example)

    write_csv(out.curves["curves"], result.curve)
    write_csv(out.curves["confusion"], pairs)
    R.write_results(out, details, timing, {**tracker.run_info(), "device": device_name}, identity)
    if result.checkpoint is not None:   # finished: nothing to resume, and no stale state for later code
        result.checkpoint.unlink(missing_ok=True)
    print(f"{name}: test AUC {test['auc']:.4f} ACC {test['acc']:.4f} (best epoch {result.best_epoch}, "
          f"{timing['images_per_second']:.0f} images/s on {device_name}, data {source})")


def data_identity(data: images.ImageSet, path: Path) -> dict:
    """The data as fields (the report reads them as data, never parses a display string)."""
    return {"name": data.name, "title": data.title, "source": data.source, "size": data.size, "task": data.task,
            "channels": data.channels, "sha256": fetch.file_digest(path)}


def finite(values: dict) -> dict:
    """NaN/inf -> None: JSON has no NaN, and DVC and the report read these files as standard JSON."""
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in values.items()}


def nan_notes(values: dict, select_by: str) -> list[str]:
    """One line per undefined score, saying why it is null and what the selection did."""
    notes = []
    for key, value in values.items():
        if isinstance(value, float) and not np.isfinite(value):
            split = "test" if key.startswith("test") else "validation"
            notes.append(f"{key} is null: undefined on the {split} split (a class missing from it?)")
    if not np.isfinite(values.get(f"best_val_{select_by}", 0.0)):
        notes.append(f"no epoch had a finite validation {select_by}: the last epoch's weights were kept")
    return notes


def _per_label_pairs(labels: np.ndarray, predicted: np.ndarray) -> list[dict]:
    """Multi-label outcomes as confusion-plot rows: label k's TN/FP/FN/TP form a 2x2 block."""
    return [{"actual": f"{k}:{int(a)}", "predicted": f"{k}:{int(p)}"}
            for row_a, row_p in zip(labels, predicted) for k, (a, p) in enumerate(zip(row_a, row_p))]


if __name__ == "__main__":
    run_stage(main)
