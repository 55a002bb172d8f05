"""The projected wall time of every stage `dvc repro` would run on this machine with the current
params, without running them (`make estimate`).

    python -m bench.estimate            # from the repository root
    python -m bench.estimate --steps 2  # fewer timed steps: quicker, rougher
    python -m bench.estimate cnn@resnet18 mlp@default   # as `dvc repro <targets>` would run

Which stages: those `dvc status` reports changed, plus everything downstream of them (DVC's own
API and graph). How long:
  - CNN stages (cnn@*, ablation@*): a few real training steps and one evaluation batch of the
    stage's model, image size, batch size and augmentations on this device, timed by the
    benchmark's `time_training` (bench/cnn_throughput.py), projected over the stage's epochs,
    steps, validation passes and test pass (`pipeline.progress.cnn_projection`). Configurations
    that match are measured once.
  - MLP stages (mlp@*): the median of 20+ steps of the numpy MLP (forward, MSE gradient,
    backward) timed on a random batch of the stage's shapes, times the steps of every epoch, plus the per-epoch
    validation and test forward passes; an upper bound, since early stopping can end it sooner.
  - The other stages (downloads, backprop, features, report): not measured; fixed figures below,
    from runs on a 2-core CPU.
Every stage also pays STAGE_OVERHEAD_S (Python and torch start-up, MLflow logging, figures).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from bench import cnn_throughput
from pipeline import devices, params as P, progress
from pipeline.models import mlp_forecaster
from pipeline.paths import ett_csv
from pipeline.train.forecaster import norm_candidates

STAGE_OVERHEAD_S = 15.0   # measured: mlp@default stage 48 s wall, 33 s of it training (2-core CPU)
# Not measured (seconds on a 2-core CPU): small, or bound by the network.
FIXED_S = {"download_ett": 2.0, "backprop": 15.0, "features": 5.0, "report": 15.0}
ETT_CHANNELS = 7
# The naive baselines of an MLP stage (closed-form least squares on ETTh1's 57k train rows, then
# the test and validation forecasts): measured 5.5 s of CPU on the 2-core machine.
MLP_BASELINES_S = 6.0
# residual: linear: each fit solves its per-channel ridge base (ETTh1: 7 channels x 6 strengths).
MLP_RIDGE_BASE_S = 2.0


def stale_stages(root: Path, targets: list[str] | None = None) -> list[str]:
    """Stages `dvc repro [targets]` would run, in dvc.yaml order: changed ones and everything
    downstream of them (within the targets and what they depend on)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        changed = set(repo.status())
        graph = repo.index.graph            # edges point from a stage to the stages it depends on
        by_name = {stage.addressing: stage for stage in graph}
        stale = set(changed)
        for name in changed:
            stale |= {s.addressing for s in nx.ancestors(graph, by_name[name])}
        if targets:
            unknown = [t for t in targets if t not in by_name]
            if unknown:
                raise SystemExit(f"no stage {', '.join(unknown)}; stages: {', '.join(by_name)}")
            wanted = set(targets)
            for name in targets:
                wanted |= {s.addressing for s in nx.descendants(graph, by_name[name])}
            stale &= wanted
        return [name for name in by_name if name in stale]


def override_key(raw: dict, section: str, name: str, key: str) -> str:
    """The params key that sets `key` for this entry: its own override if it has one, else the default."""
    for group, entries in raw[section].items():
        if group != "defaults" and key in ((entries or {}).get(name) or {}):
            return f"{section}.{group}.{name}.{key}"
    return f"{section}.defaults.{key}"


def image_counts(params) -> dict[str, int]:
    images = params.data.images
    if images.source == "synthetic":
        return {"train": images.synthetic_train, "val": images.synthetic_val, "test": images.synthetic_test}
    if images.source == "file" and images.path and Path(images.path).exists():
        npz = np.load(images.path)
        return {s: len(npz[f"{s}_labels"]) for s in ("train", "val", "test")}
    from medmnist import INFO

    return dict(INFO[images.name]["n_samples"])


def time_cnn(cfg, size: int, device, n_steps: int, cache: dict) -> dict:
    key = (cfg.model, size, cfg.batch_size, tuple(sorted(cfg.augment)), cfg.rotation_degrees, cfg.eval_batch_size)
    if key not in cache:
        split = cnn_throughput.synthetic_split(max(cfg.batch_size, 64), size, device)
        cache[key] = cnn_throughput.time_training(cfg.model, split, device, cfg.batch_size, cfg.augment,
                                                  cfg.rotation_degrees, n_warmup=1, n_steps=n_steps,
                                                  eval_batch=min(cfg.eval_batch_size, 256))
    return cache[key]


def cnn_estimate(stage: str, params, raw: dict, device, n_steps: int, cache: dict) -> tuple[float, str]:
    section, name = "cnn", stage.split("@", 1)[1]
    cfg = params.cnn_experiment(name)
    size = max(params.data.images.size, cfg.upsample_to)
    counts = image_counts(params)
    measured = time_cnn(cfg, size, device, n_steps, cache)
    steps = -(-counts["train"] // cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    total, per_epoch, detail = progress.cnn_projection(measured["step_seconds"], measured["eval_seconds_per_image"],
                                                       steps, cfg.epochs, cfg.log_every, counts["val"], counts["test"])
    message = progress.projection_message(
        stage, device.type, total + STAGE_OVERHEAD_S, detail, on_cpu=device.type == "cpu",
        seconds_per_epoch=per_epoch, steps_per_epoch=steps, epochs=cfg.epochs, size=size,
        epochs_key=override_key(raw, section, name, "epochs"),
        steps_key=override_key(raw, section, name, "max_steps_per_epoch"))
    return total + STAGE_OVERHEAD_S, message


def ett_rows(name: str) -> tuple[int, int]:
    """(rows per month, channels) of an ETT-format file: hourly or 15-minute data, 7 channels
    unless the file is already here to count."""
    channels = ETT_CHANNELS
    if ett_csv(name).exists():
        channels = len(ett_csv(name).open().readline().strip().split(",")) - 1
    return 30 * 24 * (4 if name.startswith("ETTm") else 1), channels


def mlp_estimate(stage: str, params, n_steps: int) -> tuple[float, str]:
    cfg = params.mlp_variant(stage.split("@", 1)[1])
    month, channels = ett_rows(params.data.ett.name)
    windows = {"train": 12 * month - cfg.input_len - cfg.pred_len + 1,
               "eval": 2 * (4 * month - cfg.pred_len + 1)}          # validation + test, every epoch
    rng = np.random.default_rng(0)
    dtype = np.dtype(cfg.dtype)
    weights = mlp_forecaster.init_params(cfg.input_len, cfg.hidden, cfg.pred_len, rng, dtype)
    rows = cfg.batch_size * channels
    x = rng.standard_normal((rows, cfg.input_len)).astype(dtype)
    y = rng.standard_normal((rows, cfg.pred_len)).astype(dtype)
    norm = "none" if cfg.window_norm == "auto" else cfg.window_norm

    def step():
        pred, cache = mlp_forecaster.forward(weights, x, cfg.kernel, norm)
        _, d_pred = mlp_forecaster.mse_grad(pred, y)
        mlp_forecaster.backward(weights, cache, d_pred.astype(dtype, copy=False))
    step()
    durations = []
    for _ in range(max(4 * n_steps, 20)):   # milliseconds each: the median of many resists load spikes
        start = time.perf_counter()
        step()
        durations.append(time.perf_counter() - start)
    step_s = float(np.median(durations))
    start = time.perf_counter()
    mlp_forecaster.predict(weights, np.repeat(x, 8, axis=0), cfg.kernel, norm)
    eval_s_per_row = (time.perf_counter() - start) / (8 * rows)
    steps = -(-windows["train"] // cfg.batch_size)
    eval_per_epoch = windows["eval"] * channels * eval_s_per_row
    # auto tries each normalisation on the first seed (none/last/mean, + revin without the residual),
    # then trains the choice on the other seeds; each residual fit first solves its ridge base
    fits = len(norm_candidates(cfg)) + cfg.seeds - 1
    base_s = MLP_RIDGE_BASE_S if cfg.residual == "linear" else 0.0
    seconds = (fits * (progress.project(step_s, steps, cfg.epochs, eval_per_epoch) + base_s) + MLP_BASELINES_S
               + STAGE_OVERHEAD_S)
    detail = (f"at most {fits} fit(s) x {cfg.epochs} epochs x {steps} steps at {step_s * 1000:.1f} ms/step"
              f" + evaluation {eval_per_epoch:.1f}s/epoch" + (f" + {base_s:.0f}s of ridge base" if base_s else "")
              + f" per fit + {MLP_BASELINES_S:.0f}s of baselines; early stopping can end it sooner (the "
              f"residual one often after `patience` epochs)")
    return seconds, f"projected: {progress.format_seconds(seconds)} for {stage} on cpu ({detail})"


def other_estimate(stage: str, params) -> tuple[float, str]:
    if stage == "download_images":
        images = params.data.images
        if images.source == "synthetic":
            n = image_counts(params)
            seconds = sum(n.values()) * (images.size / 64) ** 2 * 2e-4 + STAGE_OVERHEAD_S
            return seconds, (f"projected: {progress.format_seconds(seconds)} for {stage} (generates "
                             f"{sum(n.values())} synthetic images; not measured)")
        return STAGE_OVERHEAD_S, (f"projected: {progress.format_seconds(STAGE_OVERHEAD_S)} for {stage} from a "
                                  f"mirror; a download of {images.name} {images.size}px depends on the network "
                                  f"(the stage shows its progress)")
    seconds = FIXED_S.get(stage, 0.0) + STAGE_OVERHEAD_S
    return seconds, f"projected: {progress.format_seconds(seconds)} for {stage} (not measured: small)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="stages, as for `dvc repro` (default: all)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default 5)")
    args = parser.parse_args(argv)

    root = Path.cwd()
    params = P.load(root / "params.yaml")
    raw = P.load_yaml((root / "params.yaml").read_text())
    stages = stale_stages(root, args.targets)
    device = devices.resolve_device(params.base.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    if not stages:
        print("dvc repro would run nothing: every stage is up to date")
        return 0
    print(f"{len(stages)} stages `dvc repro` would run here ({where}), with params.yaml as it is now:", flush=True)
    cache, total = {}, 0.0
    for stage in stages:
        if stage.startswith(("cnn@", "ablation@")):
            seconds, message = cnn_estimate(stage, params, raw, device, args.steps, cache)
        elif stage.startswith("mlp@"):
            seconds, message = mlp_estimate(stage, params, args.steps)
        else:
            seconds, message = other_estimate(stage, params)
        total += seconds
        print("  " + message.replace("\n", "\n  "), flush=True)
    print(f"total: {progress.format_seconds(total)} for {len(stages)} stages (one after another, as dvc repro "
          f"runs them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
