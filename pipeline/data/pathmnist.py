"""Temporary shim (the lead removes it once stages/cnn.py, cnn_loop.py, bench and tests import
pipeline.data.images): the old names, with labels flattened to (N,) for today's loop."""
from dataclasses import replace

from pipeline.data.images import SPLITS, ImageSet, ImageSet as PathMnist, load as _load, synthesize  # noqa: F401


def load(path) -> ImageSet:
    data = _load(path)
    return data if data.multi_label else replace(data, labels={s: y.reshape(-1) for s, y in data.labels.items()})
