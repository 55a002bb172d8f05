"""Stage download_pathmnist: data/raw/pathmnist_<size>.npz from MedMNIST (mirror or download)
or generated (synthetic source, marked as such inside the file)."""

import numpy as np

from pipeline import params as P
from pipeline.data import pathmnist
from pipeline.data.fetch import mirror_dir
from pipeline.errors import DataError
from pipeline.paths import pathmnist_npz
from pipeline.runtime import run_stage


def main(argv):
    cfg = P.load()
    data = cfg.data.images
    dest = pathmnist_npz(data.size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if data.source == "synthetic":
        arrays = pathmnist.synthesize(data.size, {"train": data.synthetic_train, "val": data.synthetic_val,
                                                  "test": data.synthetic_test}, data.synthetic_seed)
        partial = dest.with_name(dest.name + ".partial.npz")   # np.savez insists on the .npz suffix
        try:
            np.savez(partial, **arrays)
            partial.replace(dest)
        finally:
            partial.unlink(missing_ok=True)
        origin = "synthetic (generated)"
    else:
        origin = pathmnist.fetch_medmnist(dest, data.size, mirror_dir(cfg.data.mirror_dir))
    try:
        loaded = pathmnist.load(dest)
    except DataError:
        dest.unlink(missing_ok=True)
        raise
    counts = {split: len(y) for split, y in loaded.labels.items()}
    print(f"{dest}: {counts}, {loaded.size}px, {loaded.n_classes} classes, source {loaded.source} (from {origin})")


if __name__ == "__main__":
    run_stage(main)
