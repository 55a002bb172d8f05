"""The wheels the GPU check carries, and what travels to the device (`make wheels`).

The GPU machine (CPython 3.12, torch 2.11, torchvision 0.26, numpy, pandas, scikit-learn,
matplotlib, pyyaml, pytest, tqdm, psutil) lacks what the check's steps import: pydantic and ruamel.yaml
(the params) and medmnist (its `info` and `evaluator` modules, for the metrics). pydantic comes with
its dependency closure from this venv; medmnist alone (install --no-deps: the modules the
project imports need only numpy, pandas and scikit-learn, and its scikit-image/fire extras would
weigh more than everything else). No step needs mlflow or dvc (the projection reads dvc.yaml as
YAML), and mlflow's closure alone is over the 64 MiB a call may carry, so neither travels.

    python -m bench.gpu_wheels                # the pinned list (name==version), for pip download
    python -m bench.gpu_wheels --size .whl    # wheels + working tree; exit 2 above 60 MiB
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

WITH_DEPS = ["pydantic", "ruamel.yaml"]
NO_DEPS = ["medmnist"]
ON_GPU_MACHINE = {"torch", "torchvision", "scikit-learn", "pandas", "matplotlib", "numpy", "scipy", "pillow",
                  "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "fsspec",
                  "setuptools", "python-dateutil", "pytz", "tzdata", "six", "joblib", "threadpoolctl",
                  "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "packaging", "pyyaml", "pytest",
                  "pytest-timeout", "tqdm", "psutil", "nvidia-ml-py"}
LIMIT_MIB = 60
ROOT = Path(__file__).resolve().parent.parent


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: list[str]) -> dict[str, str]:
    """name -> version in this venv of `names` and what they need, less what the GPU machine has.
    typing-extensions travels although torch needs it too: pydantic needs a newer one than torch."""
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


def requirements() -> list[str]:
    pins = {**closure(WITH_DEPS), **{norm(n): metadata.version(n) for n in NO_DEPS}}
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def tree_bytes(root: Path) -> int:
    """What the device tool sends: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return sum((root / f).stat().st_size for f in out.split("\0") if f and (root / f).is_file())


def size_report(root: Path, wheels: Path, limit_mib: float = LIMIT_MIB) -> tuple[bool, str]:
    wheel_bytes = sum(p.stat().st_size for p in wheels.glob("*.whl"))
    tree = tree_bytes(root)
    total = (wheel_bytes + tree) / 2**20
    lines = [f"wheels: {len(list(wheels.glob('*.whl')))} files, {wheel_bytes / 2**20:.1f} MiB",
             f"working tree: {tree / 2**20:.1f} MiB",
             f"travels: {total:.1f} MiB (limit {limit_mib:g} MiB)"]
    ok = total <= limit_mib
    if not ok:
        lines.append(f"error: {total:.1f} MiB would travel, over {limit_mib:g} MiB: carry fewer wheels "
                     f"(bench/gpu_wheels.py) or make the working tree smaller")
    return ok, "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=Path, help="a folder of wheels: print what travels, exit 2 above the limit")
    parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    args = parser.parse_args(argv)
    if args.size is None:
        print("\n".join(requirements()))
        return 0
    ok, report = size_report(ROOT, args.size, args.limit_mib)
    print(report, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 2


if __name__ == "__main__":
    raise SystemExit(main())
