"""Where things live. Output paths are relative to the working directory (DVC runs every stage in
the repository root, or in a temporary copy of it for `dvc exp run --temp/--queue`)."""

from __future__ import annotations

import os
from pathlib import Path

# The checkout this code runs from (may be a temporary copy under .dvc/tmp/exps/).
REPO_ROOT = Path(__file__).resolve().parent.parent


def main_repo_root(start: Path = REPO_ROOT) -> Path:
    """The user's repository, also when running in a DVC temporary experiment copy.

    `dvc exp run --temp/--queue` runs stages in <repo>/.dvc/tmp/exps/<run>/..., so a store placed
    relative to that copy would vanish with it; the MLflow store lives in the outer repository.
    """
    parts = start.resolve().parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return start.resolve()


DATA_RAW = Path("data/raw")
MODELS = Path("models")
METRICS = Path("metrics")
REPORTS = Path("reports")


def ett_csv(name: str) -> Path:
    return DATA_RAW / f"{name}.csv"


def images_npz(name: str, size: int) -> Path:
    """The image set named by data.images, whatever its source: data/raw/<name>_<size>.npz."""
    return DATA_RAW / f"{name}_{size}.npz"



def user_path(value: str) -> Path:
    """A path the user gave (a param or an environment variable): `~` expanded, and a relative one
    read from the user's repository, also in a queued run's temporary copy (.dvc/tmp/exps/...)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else main_repo_root(REPO_ROOT) / path


def weights_path(param_value: str) -> Path | None:
    """The fine-tuning weights file: $FINETUNE_WEIGHTS if set, else the weights_file param, else none."""
    value = os.environ.get("FINETUNE_WEIGHTS") or param_value
    return user_path(value) if value else None


# Records of the inputs DVC cannot see itself (outside files, environment variables): the `inputs`
# stage rewrites them on every run, and each reader depends on its own record.
INPUTS = DATA_RAW / "inputs"


def input_record(kind: str) -> Path:
    """`ett`, `images` or `weights/<cnn experiment>`: data/raw/inputs/<kind>.json."""
    return INPUTS / f"{kind}.json"
