"""Where things live. Output paths are relative to the working directory (DVC runs every stage in
the repository root, or in a temporary copy of it for `dvc exp run --temp/--queue`)."""

from __future__ import annotations

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

