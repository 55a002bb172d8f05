"""Stage download_images: data/raw/<name>_<size>.npz,
the set named by data.images, from MedMNIST (mirror or download, MD5-checked), from the user's own
npz (`source: file`, validated and copied in with its name and task), or generated (`synthetic`,
shaped like the named MedMNIST set and marked as such inside the file)."""

import numpy as np

from pipeline import params as P
from pipeline.data import images
from pipeline.data.fetch import mirror_dir
from pipeline.errors import DataError
from pipeline.paths import images_npz, user_path
from pipeline.runtime import run_stage


def copy_user_file(data, dest) -> str:
    """Validate the user's npz, then write it to `dest` with its name, task and source recorded."""
    if not data.path:
        raise DataError("data.images.source is 'file' but data.images.path is empty; set it to your npz "
                        "in the MedMNIST layout (train/val/test _images and _labels)")
    src = user_path(data.path)
    if not src.is_file():
        raise DataError(f"data.images.path {data.path}: no such file {src} (a relative path is read from the "
                        "repository root)")
    task = images.check_task(data.task) if data.task else images.default_task(data.name)
    loaded = images.load(src, name=data.name, task=task, source="file")
    images.check_size(src, loaded.size)
    if loaded.size != data.size:
        raise DataError(f"{data.path} holds {loaded.size} px images but data.images.size is {data.size}; "
                        f"set `data.images.size: {loaded.size}`")
    with np.load(src) as npz:
        arrays = {k: npz[k] for k in npz.files if k.split("_", 1)[0] in images.SPLITS}
    images.save_npz(dest, {**arrays, "source": np.array("file"), "name": np.array(data.name),
                           "task": np.array(task)})
    return f"file {data.path}"


def main(argv):
    cfg = P.load()
    data = cfg.data.images
    dest = images_npz(data.name, data.size)
    if data.source == "synthetic":
        counts = {"train": data.synthetic_train, "val": data.synthetic_val, "test": data.synthetic_test}
        images.save_npz(dest, images.synthesize(data.size, counts, data.synthetic_seed, data.name))
        origin = "synthetic (generated)"
    elif data.source == "file":
        origin = copy_user_file(data, dest)
    else:
        origin = images.fetch_medmnist(dest, data.name, data.size, mirror_dir(cfg.data.mirror_dir))
    try:
        loaded = images.load(dest)
    except DataError:
        dest.unlink(missing_ok=True)
        raise
    counts = {split: len(y) for split, y in loaded.labels.items()}
    print(f"{dest}: {loaded.title}, {counts}, {loaded.size}px, {loaded.channels} channel(s), "
          f"{loaded.n_classes} outputs, task {loaded.task}, source {loaded.source} (from {origin})")


if __name__ == "__main__":
    run_stage(main)
