"""Print the pinned wheels the offline GPU check needs: the closure of its extra packages in this
venv, less what a GPU machine with PyTorch, torchvision, scikit-learn, pandas and matplotlib has.

    make wheels      # pip download --no-deps of this list into .whl/ (git-ignored)
"""

from __future__ import annotations

import re
from importlib import metadata

NEEDED = ["medmnist", "mlflow", "pydantic", "pyyaml", "pytest", "pytest-timeout", "tqdm"]
ON_GPU_MACHINE = {"torch", "torchvision", "scikit-learn", "pandas", "matplotlib", "numpy", "scipy", "pillow",
                  "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "fsspec",
                  "typing-extensions", "setuptools", "python-dateutil", "pytz", "tzdata", "six", "joblib",
                  "threadpoolctl", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "packaging"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: list[str]) -> dict[str, str]:
    found, todo = {}, [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found or name in ON_GPU_MACHINE or name.startswith("nvidia-"):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue   # an optional dependency this venv does not have
        found[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(norm(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]))
    return found


if __name__ == "__main__":
    for name, version in sorted(closure(NEEDED).items()):
        print(f"{name}=={version}")
