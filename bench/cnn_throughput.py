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

from pipeline import params as P
from pipeline.models import cnn
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


def bench_model(name, images: np.ndarray, labels: np.ndarray, device, batch, n_warmup, n_steps) -> dict:
    split = cnn_loop.DeviceSplit(torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device), labels)
    generator = torch.Generator(device=device).manual_seed(0)
    n = len(labels)

    model, opt = fresh(name, device)
    def ours():
        index = torch.randint(0, n, (batch,), device=device, generator=generator)
        x = augment.apply(split.batch(index), ["rotation", "hflip"], 15.0, generator)
        cnn_loop.train_step(model, opt, x, split.labels[index])
    results = {"ours": timed(ours, n_warmup, n_steps, batch, device)}

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

    model.eval()
    eval_batch = 1024 if device.type == "cuda" else 256
    x_eval = split.batch(torch.arange(min(eval_batch, n), device=device))
    def infer():
        with torch.no_grad(), cnn_loop._autocast(device):
            model(x_eval)
    results["eval"] = timed(infer, 2, max(3, n_steps // 5), len(x_eval), device)
    return results


def projected_seconds(cfg: Cnn, train_ips: float, eval_ips: float) -> float:
    """Training images / throughput + every validation pass (every log_every steps and per epoch) + test."""
    steps = -(-REAL_COUNTS["train"] // cfg.batch_size)
    val_passes = steps // cfg.log_every + 1
    per_epoch = REAL_COUNTS["train"] / train_ips + val_passes * REAL_COUNTS["val"] / eval_ips
    return cfg.epochs * per_epoch + REAL_COUNTS["test"] / eval_ips


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size train split (89,996 images)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--models", default="resnet18,densenet121")
    args = parser.parse_args()

    device = cnn_loop.resolve_device("auto")
    params = P.load()
    batch = params.cnn_experiment("resnet18").batch_size
    n = REAL_COUNTS["train"] if args.full else 2048
    steps = args.steps or (100 if device.type == "cuda" else 8)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, 9, size=n).astype(np.int64)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {n} train images of {args.size}px; batch {batch}; "
          f"{steps} timed steps per measurement")
    print(f"{'model':<12} {'ours img/s':>11} {'ceiling':>9} {'original':>9} {'ours/ceiling':>13} "
          f"{'ours/original':>14} {'eval img/s':>11}")
    measured = {}
    for model_name in args.models.split(","):
        r = bench_model(model_name, images, labels, device, batch, n_warmup=2 if device.type == "cpu" else 10,
                        n_steps=steps)
        measured[model_name] = r
        print(f"{model_name:<12} {r['ours']:>11.1f} {r['ceiling']:>9.1f} {r['original']:>9.1f} "
              f"{r['ours'] / r['ceiling']:>13.3f} {r['ours'] / r['original']:>14.2f} {r['eval']:>11.1f}", flush=True)

    print(f"\nprojected wall time per CNN stage on this device (real PathMNIST sizes, default params, "
          f"{args.size}px):")
    for stage in params.cnn_experiments():
        cfg = params.cnn_experiment(stage)
        if cfg.model in measured:
            seconds = projected_seconds(cfg, measured[cfg.model]["ours"], measured[cfg.model]["eval"])
            print(f"  {stage:<16} {cfg.model:<12} {cfg.epochs:>3} epochs  {seconds / 60:8.1f} min")


if __name__ == "__main__":
    main()
