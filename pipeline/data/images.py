"""Image sets in the MedMNIST layout: any 2-D MedMNIST set (download or mirror), the user's own
npz (`source: file`), or a synthetic stand-in shaped like the named set; one loader validates all.

The MedMNIST layout: `{train,val,test}_images` uint8, (N, S, S) grayscale or (N, S, S, 3) RGB, and
`{train,val,test}_labels` integers, (N, 1) for multi-class/binary/ordinal sets or (N, L) 0/1 for
multi-label sets. Files are read with numpy directly (medmnist's dataset class asserts the official
sample counts). A file this project writes (synthetic, or a user's file copied into data/raw)
carries `source`, `name` and `task` entries; a MedMNIST file is kept byte for byte as downloaded
(its MD5 is checked), and its name and task come from its file name and the `medmnist` table.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.fetch import fetch
from pipeline.errors import DataError
from pipeline.outputs import atomic_path
from pipeline.models import registry
from pipeline.params import MEDMNIST_TASKS

SPLITS = ("train", "val", "test")
MIN_SIZE = 8          # px; the models need more (registry min_size) unless cnn upsample_to enlarges
MAX_CLASSES = 1000    # a label above this is a mistake (e.g. raw ids), not a 100000-way head
MULTI_LABEL = "multi-label, binary-class"
BINARY = "binary-class"


def medmnist_flags() -> list[str]:
    """The 2-D MedMNIST flags (the 3-D sets are volumes, not images)."""
    from medmnist import INFO

    return [flag for flag in INFO if not flag.endswith("3d")]


def medmnist_info(name: str) -> dict:
    """The `medmnist` package's table entry for a 2-D flag, or a clear error."""
    from medmnist import INFO

    if name not in medmnist_flags():
        raise DataError(f"data.images.name {name!r} is not a 2-D MedMNIST set; choose one of: "
                        f"{', '.join(medmnist_flags())} (or use `data.images.source: file` for your own npz)")
    return INFO[name]


def way_out(name: str, size: int) -> str:
    return (f"set DATA_MIRROR to a folder holding {medmnist_filename(name, size)}, or use the synthetic set: "
            "`dvc exp run -S data.images.source=synthetic`")


def medmnist_filename(name: str, size: int) -> str:
    """MedMNIST's own file name (the mirror uses the same): `chestmnist.npz` at 28 px, else `chestmnist_64.npz`."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def fetch_medmnist(dest: Path, name: str, size: int, mirror: Path | None) -> str:
    """The real MedMNIST set `name` at `size`, from the mirror or MedMNIST's Zenodo record, MD5-checked
    against the `medmnist` package's own table."""
    info = medmnist_info(name)
    if size not in (28, 64, 128, 224):
        raise DataError(f"MedMNIST has no {size} px files; data.images.size must be 28, 64, 128 or 224")
    flag = "" if size == 28 else f"_{size}"
    staged = dest.with_name(medmnist_filename(name, size))
    origin = fetch(staged, info[f"url{flag}"], info[f"MD5{flag}"], "md5", mirror, way_out(name, size))
    if staged != dest:
        staged.replace(dest)
    return origin


def synthesize(size: int, counts: dict[str, int], seed: int, name: str = "pathmnist") -> dict[str, np.ndarray]:
    """A set shaped like MedMNIST's `name` (its channels, number of labels and task) that a CNN can learn.

    Single-label sets: each class has its own colour (grey level) and stripe orientation/frequency,
    with per-image phase, brightness and pixel noise. Multi-label sets: each label has its own stripe
    texture, and an image shows the sum of the textures of its positive labels (about 30% each).
    """
    info = medmnist_info(name)
    task, channels, n_labels = info["task"], info["n_channels"], len(info["label"])
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    palette = rng.uniform(60, 200, size=(n_labels, channels)).astype(np.float32)
    angles = np.linspace(0, np.pi, n_labels, endpoint=False)
    freqs = 2.0 + (np.arange(n_labels) % 3) * 2.0
    arrays = {"source": np.array("synthetic"), "name": np.array(name), "task": np.array(task)}
    for split in SPLITS:
        n = counts[split]
        if task == MULTI_LABEL:
            labels = (rng.random((n, n_labels)) < 0.3).astype(np.uint8)
            phase = rng.uniform(0, 2 * np.pi, size=(n, n_labels, 1, 1)).astype(np.float32)
            texture = np.zeros((n, size, size), np.float32)
            for label in range(n_labels):   # one label at a time: (n, L, S, S) floats would not fit at 224 px
                a, f = angles[label], freqs[label]
                stripes = np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)) + phase[:, label])
                texture += labels[:, label, None, None] * stripes
            brightness = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
            images = palette.mean(axis=0) * brightness + 30 * texture[..., None]
        else:
            classes = np.arange(n) % n_labels
            rng.shuffle(classes)
            phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
            a, f = angles[classes][:, None, None], freqs[classes][:, None, None]
            stripes = np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)) + phase)  # (n, H, W)
            brightness = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
            images = palette[classes][:, None, None, :] * brightness + 40 * stripes[..., None]
            labels = classes.astype(np.uint8)[:, None]
        images += rng.normal(0, 20, size=images.shape).astype(np.float32)
        images = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_images"] = images[..., 0] if channels == 1 else images   # MedMNIST: grayscale is (N, S, S)
        arrays[f"{split}_labels"] = labels
    return arrays


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".npz") as tmp:   # np.savez insists on the .npz suffix
        np.savez(tmp, **arrays)


@dataclass
class ImageSet:
    images: dict[str, np.ndarray]   # split -> (N, S, S, C) uint8, C = 1 or 3
    labels: dict[str, np.ndarray]   # split -> int64 as MedMNIST stores them: (N, 1), or (N, L) 0/1 for multi-label
    n_classes: int                  # outputs of the network: classes, or labels for multi-label
    size: int
    source: str                     # "medmnist", "file" or "synthetic"
    name: str = "pathmnist"         # a MedMNIST flag or the user's own name
    task: str = "multi-class"       # a MedMNIST task string

    @property
    def channels(self) -> int:
        return next(iter(self.images.values())).shape[3]

    @property
    def title(self) -> str:
        """The name for headings, tags and figures: MedMNIST's own spelling (ChestMNIST), else the name."""
        from medmnist import INFO

        return INFO[self.name]["python_class"] if self.name in INFO else self.name

    @property
    def multi_label(self) -> bool:
        return self.task == MULTI_LABEL


def check_task(task: str, key: str = "data.images.task") -> str:
    if task not in MEDMNIST_TASKS:
        raise DataError(f"{key} {task!r} is not a MedMNIST task; choose one of: "
                        + ", ".join(repr(t) for t in MEDMNIST_TASKS))
    return task


def _name_from_path(path: Path) -> str:
    """`chestmnist_64.npz` -> chestmnist (the file names data/raw uses)."""
    match = re.fullmatch(r"(.+?)(?:_\d+)?", path.stem)
    return match.group(1) if match else path.stem


def default_task(name: str) -> str:
    """A MedMNIST flag's own task; anything else is multi-class unless `data.images.task` says otherwise."""
    from medmnist import INFO

    return INFO[name]["task"] if name in INFO else "multi-class"


def load(path: Path, name: str | None = None, task: str | None = None, source: str | None = None) -> ImageSet:
    """Read and validate an npz in the MedMNIST layout (MedMNIST's own, synthetic, or the user's).

    The name and task are, in order: the arguments, the file's own `name`/`task` entries, the file
    name and the `medmnist` table (a name that is not a MedMNIST flag is multi-class).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} not found: run `dvc repro download_images` first (it fetches or "
                        "copies the image set named by data.images)")
    remake = ("save it with numpy.savez(path, train_images=..., train_labels=..., ...) "
              "(or delete it and re-run `dvc repro download_images`)")
    if not zipfile.is_zipfile(path):   # a .npy renamed .npz, a text file, a truncated download
        raise DataError(f"{path}: not an npz archive (an .npz is a zip of .npy arrays; this file is not a zip: "
                        f"a renamed .npy, a text file or a cut-off copy?); {remake}")
    try:
        npz = np.load(path)   # allow_pickle=False: object arrays (pickled Python objects) are never loaded
        keys = set(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable npz ({error}); {remake}") from None
    expected = {f"{s}_{k}" for s in SPLITS for k in ("images", "labels")}
    if not expected <= keys:
        raise DataError(f"{path}: missing keys {sorted(expected - keys)} (has {sorted(keys)}); "
                        "expected MedMNIST's train_images, train_labels, val_images, val_labels, "
                        "test_images, test_labels")
    name = name or (str(npz["name"]) if "name" in keys else _name_from_path(path))
    task = check_task(task or (str(npz["task"]) if "task" in keys else default_task(name)))
    source = source or (str(npz["source"]) if "source" in keys else "medmnist")
    images, labels = {}, {}
    for split in SPLITS:
        try:
            x, y = npz[f"{split}_images"], npz[f"{split}_labels"]
        except ValueError:   # numpy: "Object arrays cannot be loaded when allow_pickle=False"
            raise DataError(f"{path}: {split}_images or {split}_labels is an object array (pickled Python "
                            "objects, which are never loaded); store plain arrays: uint8 images and integer "
                            f"labels, e.g. numpy.asarray(images, dtype=numpy.uint8); {remake}") from None
        if x.ndim == 3:   # MedMNIST stores grayscale sets without a channel axis
            x = x[..., None]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3) or x.shape[1] != x.shape[2]:
            raise DataError(f"{path}: {split}_images has shape {x.shape} and dtype {x.dtype}; expected "
                            "uint8 square images, (N, S, S) grayscale or (N, S, S, 3) RGB")
        if len(x) == 0:
            raise DataError(f"{path}: the {split} split is empty")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: {split}_labels has dtype {y.dtype}; expected integer labels")
        if y.ndim == 1:   # accept (N,) for single-label sets; MedMNIST's own layout is (N, 1)
            y = y[:, None]
        if y.ndim != 2 or len(y) != len(x):
            raise DataError(f"{path}: {split} has {len(x)} images but labels of shape {y.shape}; expected "
                            f"({len(x)}, 1), or ({len(x)}, L) for a multi-label set")
        if task == MULTI_LABEL and not np.isin(y, (0, 1)).all():
            raise DataError(f"{path}: {split}_labels of a multi-label set must be 0 or 1 per label")
        if task != MULTI_LABEL and y.shape[1] != 1:
            raise DataError(f"{path}: {split}_labels has shape {y.shape}, i.e. {y.shape[1]} labels per image, "
                            f"but the task is {task!r}; set data.images.task: {MULTI_LABEL!r} for a "
                            "multi-label set")
        if y.min() < 0:
            raise DataError(f"{path}: {split}_labels has negative values; classes are numbered 0, 1, ...")
        if y.max() >= MAX_CLASSES:
            raise DataError(f"{path}: {split}_labels has the value {int(y.max())}; classes are numbered 0, 1, ... "
                            f"below {MAX_CLASSES} (renumber raw ids to 0..K-1)")

        images[split], labels[split] = x, y.astype(np.int64)
    shapes = {x.shape[1:] for x in images.values()}
    if len(shapes) != 1:
        raise DataError(f"{path}: the splits have different image shapes {sorted(shapes)}")
    widths = {y.shape[1] for y in labels.values()}
    if len(widths) != 1:
        raise DataError(f"{path}: the splits have different numbers of labels {sorted(widths)}")
    n_classes = _n_classes(path, name, task, labels, source)
    return ImageSet(images, labels, n_classes, shapes.pop()[0], source, name, task)


def check_size(path: Path, size: int) -> None:
    """The smallest images the pipeline takes (the same floor as data.images.size), with the models' needs."""
    if size < MIN_SIZE:
        needs = " and ".join(f"{name} needs {spec.min_size}" for name, spec in registry.MODELS.items())
        raise DataError(f"{path}: the images are {size} px; the minimum is {MIN_SIZE} px (data.images.size >= "
                        f"{MIN_SIZE}; {needs} unless cnn.defaults.upsample_to enlarges them); resize the images")


def _n_classes(path: Path, name: str, task: str, labels: dict[str, np.ndarray], source: str = "medmnist") -> int:
    """Outputs of the network: the `medmnist` table's count for a MedMNIST flag, else from the labels."""
    from medmnist import INFO

    width = next(iter(labels.values())).shape[1]
    top = int(max(y.max() for y in labels.values()))
    if task == MULTI_LABEL:
        n = width
    elif task == BINARY:
        if top > 1:
            raise DataError(f"{path}: a binary-class set has labels 0 and 1, found {top}")
        n = 2   # MedMNIST's binary sets have 2 classes, trained with a 2-way softmax
    else:
        n = top + 1
    if name in INFO:
        expected = len(INFO[name]["label"])
        kind = "labels" if task == MULTI_LABEL else "classes"
        if source == "file" and n != expected:   # the default name (pathmnist) on a user's file: never 9-way
            raise DataError(f"{path}: the file has {n} {kind} but data.images.name is {name!r}, whose medmnist "
                            f"table entry has {expected}; give your set its own name "
                            "(-S data.images.name=my_images), its classes then come from the file")
        if n > expected or (task == MULTI_LABEL and n != expected):
            raise DataError(f"{path}: {name} has {expected} {kind} "
                            f"in the medmnist table, the file has {n}; is data.images.name right?")
        n = expected
    if n < 2:
        raise DataError(f"{path}: every label is {top}; a classifier needs at least 2 classes")
    return n
