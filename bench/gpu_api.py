"""The torch/torchvision names the project calls, for the device's older versions (torch 2.11,
torchvision 0.26; the project pins newer ones).

`used()` reads pipeline/, stages/ and bench/ (the AST, through each file's import aliases) and
returns every dotted name under torch or torchvision they reference (torch.nn.functional.
cross_entropy, torchvision.models.resnet18, ...). bench/torch_api.txt is the audited list: each
name there was checked against the device's versions (the check's `api` step resolves them all
there; tests/test_gpu_check.py keeps the list equal to what the code uses, so a new call must be
added, and checked, before it lands). Names reached through objects (tensor.pin_memory(),
model.to(...)) and keyword arguments are not covered: the GPU check's steps exercise those.

    python -m bench.gpu_api          # print the names the code uses now (to refresh the list)
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "bench" / "torch_api.txt"
TOPS = ("torch", "torchvision")


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def names_in(source: str) -> set[str]:
    tree = ast.parse(source)
    aliases = {}   # local name -> full dotted name
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in TOPS:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                    found.add(a.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in TOPS:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                found.add(f"{node.module}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted and dotted.split(".")[0] in aliases:
                head, *rest = dotted.split(".")
                found.add(".".join([aliases[head], *rest]))
    return found


def used(root: Path = ROOT) -> set[str]:
    names = set()
    for folder in ("pipeline", "stages", "bench"):
        for path in sorted((root / folder).rglob("*.py")):
            names |= names_in(path.read_text())
    # keep only the longest chains: torch.nn.functional.pad implies torch.nn.functional
    return {n for n in names if not any(m.startswith(n + ".") for m in names)}


def listed(path: Path = LIST) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def resolves(name: str) -> bool:
    """Whether `name` exists in the installed torch/torchvision (a module, or attributes of one)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def missing(names) -> list[str]:
    return [n for n in names if not resolves(n)]


if __name__ == "__main__":
    for name in sorted(used()):
        print(name)
