"""PathMNIST arrays: the real MedMNIST file (download or mirror), a synthetic stand-in, validation.

Files are read with numpy directly (medmnist's dataset class asserts the official sample counts,
which the synthetic set does not have). A synthetic file carries `source = "synthetic"`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.fetch import fetch
from pipeline.errors import DataError

SPLITS = ("train", "val", "test")
N_CLASSES = 9
WAY_OUT = ("set DATA_MIRROR to a folder holding the medmnist file, or use the synthetic set: "
           "`dvc exp run -S data.images.source=synthetic`")


def medmnist_filename(size: int) -> str:
    return "pathmnist.npz" if size == 28 else f"pathmnist_{size}.npz"


def fetch_medmnist(dest: Path, size: int, mirror: Path | None) -> str:
    """The real PathMNIST at `size`, from the mirror or MedMNIST's Zenodo record, MD5-checked
    against the `medmnist` package's own table."""
    from medmnist import INFO

    info = INFO["pathmnist"]
    flag = "" if size == 28 else f"_{size}"
    staged = dest.with_name(medmnist_filename(size))
    origin = fetch(staged, info[f"url{flag}"], info[f"MD5{flag}"], "md5", mirror, WAY_OUT)
    if staged != dest:
        staged.replace(dest)
    return origin


def synthesize(size: int, counts: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """A PathMNIST-shaped set that a CNN can learn: each class has its own colour and stripe
    orientation/frequency, with per-image phase, brightness and pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    palette = rng.uniform(60, 200, size=(N_CLASSES, 3)).astype(np.float32)
    angles = np.linspace(0, np.pi, N_CLASSES, endpoint=False)
    freqs = 2.0 + (np.arange(N_CLASSES) % 3) * 2.0
    arrays = {"source": np.array("synthetic")}
    for split in SPLITS:
        n = counts[split]
        labels = np.arange(n) % N_CLASSES
        rng.shuffle(labels)
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
        a, f = angles[labels][:, None, None], freqs[labels][:, None, None]
        stripes = np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)) + phase)  # (n, H, W)
        brightness = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
        images = palette[labels][:, None, None, :] * brightness + 40 * stripes[..., None]
        images += rng.normal(0, 20, size=images.shape).astype(np.float32)
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)[:, None]
    return arrays


@dataclass
class PathMnist:
    images: dict[str, np.ndarray]   # split -> (N, H, W, 3) uint8
    labels: dict[str, np.ndarray]   # split -> (N,) int64
    n_classes: int
    size: int
    source: str                     # "medmnist" or "synthetic"


def load(path: Path) -> PathMnist:
    """Read and validate a PathMNIST npz (real or synthetic)."""
    if not path.exists():
        raise DataError(f"{path} not found: run `dvc repro download_pathmnist` first")
    try:
        npz = np.load(path)
        keys = set(npz.files)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable npz ({error}). Delete it and re-run "
                        "`dvc repro download_pathmnist`.") from None
    expected = {f"{s}_{k}" for s in SPLITS for k in ("images", "labels")}
    if not expected <= keys:
        raise DataError(f"{path}: missing keys {sorted(expected - keys)} (has {sorted(keys)}); "
                        "expected MedMNIST's train/val/test _images/_labels")
    images, labels = {}, {}
    for split in SPLITS:
        x, y = npz[f"{split}_images"], npz[f"{split}_labels"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3 or x.shape[1] != x.shape[2]:
            raise DataError(f"{path}: {split}_images has shape {x.shape} and dtype {x.dtype}; "
                            "expected (N, S, S, 3) uint8 RGB images")
        if len(y) != len(x):
            raise DataError(f"{path}: {split} has {len(x)} images but {len(y)} labels")
        images[split], labels[split] = x, y.reshape(-1).astype(np.int64)
    sizes = {x.shape[1] for x in images.values()}
    if len(sizes) != 1:
        raise DataError(f"{path}: splits have different image sizes {sorted(sizes)}")
    n_classes = int(max(y.max() for y in labels.values())) + 1
    source = str(npz["source"]) if "source" in keys else "medmnist"
    return PathMnist(images, labels, n_classes, sizes.pop(), source)
