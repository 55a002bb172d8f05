"""Records of the inputs DVC cannot see: files outside the repository (the mirror's CSV, the user's
npz, fine-tuning weights) and environment variables ($DATA_MIRROR, $FINETUNE_WEIGHTS).

Each record names the file a reader will read and its sha256, so a changed byte changes the record,
and DVC re-runs exactly the stages that depend on that record (and never restores a run-cache entry
made from the old bytes). Records hold no time stamps and no paths of the temporary copy a queued
run works in: unchanged inputs give byte-identical records.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.fetch import file_digest, mirror_dir
from pipeline.models import cnn
from pipeline.paths import user_path, weights_path


def _file(path: Path) -> dict:
    return {"file": str(path), "sha256": file_digest(path) if path.is_file() else "missing"}


def ett_record(params) -> dict:
    """The CSV download_ett will take: the mirror's file, else the (pinned or unpinned) download."""
    ett = params.data.ett
    mirror = mirror_dir(params.data.mirror_dir)
    if mirror is not None and (mirror / f"{ett.name}.csv").exists():
        return {"mirror": _file(mirror / f"{ett.name}.csv")}
    return {"download": ett.url.format(name=ett.name), "pin": ett.pins.get(ett.name, "")}


def images_record(params) -> dict:
    """The user's npz for source=file; MedMNIST files are MD5-pinned and synthetic sets are params."""
    images = params.data.images
    if images.source == "file":
        return {"source": "file", **_file(user_path(images.path))}
    return {"source": images.source}


def weights_record(params, experiment: str) -> dict:
    """The ImageNet weights the CNN run `experiment` loads: its file, or the torch hub cache's."""
    cfg = params.cnn_experiment(experiment)
    if not cfg.pretrained:
        return {"pretrained": False}
    path = weights_path(cfg.weights_file)
    if path is not None:
        return {"pretrained": True, **_file(path)}
    return {"pretrained": True, "hub": True, **_file(cnn.hub_file(cfg.model))}
