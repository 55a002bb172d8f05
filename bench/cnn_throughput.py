"""CNN training throughput, side by side on one device (a benchmark, not a test).

For each model it times, on the same device and batch size:
  ours      - this project's training step: index the uint8 split on the device, normalise,
              augment (rotation + flip, batched), forward + backward + Adam (bf16 autocast on CUDA,
              channels_last);
  ceiling   - the bare forward + backward + Adam step on a float batch already on the device;
  original  - the assignment's style: torch DataLoader over a Dataset that makes a PIL image of
              each sample and applies torchvision transforms (rotation, flip, ToTensor, Normalize),
              then copies the batch to the device; fp32.
and prints images/s, the ratios, and the projected wall time of every CNN stage at the default
params. Random uint8 images stand in for PathMNIST (throughput does not depend on content).

    python -m bench.cnn_throughput            # small split, quick (CPU)
    python -m bench.cnn_throughput --full     # 89,996 x 64 x 64 train split (CUDA machine)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from pipeline import devices, params as P, progress
from pipeline.models import cnn, registry
from pipeline.params import Cnn
from pipeline.train import augment, cnn_loop

REAL_COUNTS = {"train": 89_996, "val": 10_004, "test": 7_180}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, n_warmup: int, n_steps: int, batch: int, device) -> float:
    for _ in range(n_warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    sync(device)
    return n_steps * batch / (time.perf_counter() - start)


def fresh(name: str, device, channels_last=True):
    torch.manual_seed(0)
    model = cnn.build(name, 9).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train(), torch.optim.Adam(model.parameters(), lr=1e-3)


def synthetic_split(n: int, size: int, device, n_classes: int = 9, seed: int = 0) -> cnn_loop.DeviceSplit:
    """Random uint8 images on the device (throughput does not depend on content)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, n_classes, size=n).astype(np.int64)
    return cnn_loop.DeviceSplit(torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device), labels)


def time_training(model_name: str, split: cnn_loop.DeviceSplit, device, batch: int, augmentations, degrees: float,
                  n_warmup: int, n_steps: int, eval_batch: int) -> dict:
    """The one measurement of this project's training step on this device (the benchmark and
    `bench.estimate` both use it): index the uint8 split, normalise, augment, forward + backward +
    Adam as `cnn_loop.train` does, then one evaluation batch as `cnn_loop.predict` does.
    Returns seconds per training step and evaluation seconds per image."""
    generator = torch.Generator(device=device).manual_seed(0)
    n = len(split.labels)
    model, opt = fresh(model_name, device)

    def step():
        index = torch.randint(0, n, (batch,), device=device, generator=generator)
        x = augment.apply(split.batch(index), list(augmentations), degrees, generator)
        cnn_loop.train_step(model, opt, x, split.labels[index])
    step_seconds = batch / timed(step, n_warmup, n_steps, batch, device)

    k = min(eval_batch, n)
    head = cnn_loop.DeviceSplit(split.images[:k], split.labels[:k], split.labels_np[:k])
    eval_ips = timed(lambda: cnn_loop.predict(model, head, k), 1, max(1, n_steps // 5), k, device)
    return {"step_seconds": step_seconds, "eval_seconds_per_image": 1 / eval_ips}


def bench_model(name, split: cnn_loop.DeviceSplit, device, batch, n_warmup, n_steps) -> dict:
    n = len(split.labels)
    images, labels = split.images.cpu().numpy(), split.labels_np
    ours = time_training(name, split, device, batch, ["rotation", "hflip"], 15.0, n_warmup, n_steps,
                         eval_batch=1024 if device.type == "cuda" else 256)
    results = {"ours": batch / ours["step_seconds"], "eval": 1 / ours["eval_seconds_per_image"]}

    model, opt = fresh(name, device)
    x_fixed = split.batch(torch.arange(batch, device=device)).contiguous(memory_format=torch.channels_last)
    y_fixed = split.labels[:batch]
    results["ceiling"] = timed(lambda: cnn_loop.train_step(model, opt, x_fixed, y_fixed), n_warmup, n_steps, batch, device)

    class PilDataset(torch.utils.data.Dataset):
        transform = T.Compose([T.RandomRotation(15), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize([0.5] * 3, [0.5] * 3)])

        def __len__(self):
            return n

        def __getitem__(self, i):
            return self.transform(Image.fromarray(images[i])), int(labels[i])

    loader = iter(torch.utils.data.DataLoader(PilDataset(), batch_size=batch, shuffle=True, num_workers=0,
                                              drop_last=True))
    model, opt = fresh(name, device, channels_last=False)
    loss_fn = torch.nn.CrossEntropyLoss()

    def original():
        x, y = next(loader)
        x, y = x.to(device), y.to(device)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    results["original"] = timed(original, n_warmup, n_steps, batch, device)

    return results


def projected_seconds(cfg: Cnn, measured: dict, counts: dict = REAL_COUNTS) -> float:
    """The stage's projected wall time (`progress.cnn_projection`: steps, validation passes, test)."""
    steps = -(-counts["train"] // cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    total, _, _ = progress.cnn_projection(measured["step_seconds"], measured["eval_seconds_per_image"], steps,
                                          cfg.epochs, cfg.log_every, counts["val"], counts["test"])
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size train split (89,996 images)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--models", default=",".join(registry.MODELS), help="comma-separated (default: every registered CNN)")
    args = parser.parse_args()

    device = devices.resolve_device("auto")
    params = P.load()
    batch = params.cnn_experiment("resnet18").batch_size
    n = REAL_COUNTS["train"] if args.full else 2048
    steps = args.steps or (100 if device.type == "cuda" else 8)
    split = synthetic_split(n, args.size, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {n} train images of {args.size}px; batch {batch}; "
          f"{steps} timed steps per measurement")
    print(f"{'model':<12} {'ours img/s':>11} {'ceiling':>9} {'original':>9} {'ours/ceiling':>13} "
          f"{'ours/original':>14} {'eval img/s':>11}")
    measured = {}
    for model_name in args.models.split(","):
        r = bench_model(model_name, split, device, batch, n_warmup=2 if device.type == "cpu" else 10,
                        n_steps=steps)
        measured[model_name] = r
        print(f"{model_name:<12} {r['ours']:>11.1f} {r['ceiling']:>9.1f} {r['original']:>9.1f} "
              f"{r['ours'] / r['ceiling']:>13.3f} {r['ours'] / r['original']:>14.2f} {r['eval']:>11.1f}", flush=True)

    print(f"\nprojected wall time per CNN stage on this device (real PathMNIST sizes, default params, "
          f"{args.size}px):")
    for stage in params.cnn_experiments():
        cfg = params.cnn_experiment(stage)
        if cfg.model in measured:
            r = measured[cfg.model]
            seconds = projected_seconds(cfg, {"step_seconds": cfg.batch_size / r["ours"],
                                              "eval_seconds_per_image": 1 / r["eval"]})
            print(f"  {stage:<16} {cfg.model:<12} {cfg.epochs:>3} epochs  {seconds / 60:8.1f} min")


if __name__ == "__main__":
    main()
