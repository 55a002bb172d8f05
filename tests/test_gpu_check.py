"""The prepared GPU check stays runnable: its dry run on the CPU, its wheels' size limit, and the
torch names the project calls (the GPU machine has older torch/torchvision than the pin)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_api, gpu_steps, gpu_wheels

ROOT = Path(__file__).resolve().parent.parent

# Every number the check must bring back (issue 19), by its key in the results file's "numbers".
# Written out here, not read from bench/gpu_check.py, so a rename there fails this test.
REQUIRED = [
    *[f"throughput.{m}.{k}" for m in ("resnet18", "densenet121")
      for k in ("ours_images_per_s", "ceiling_images_per_s", "original_images_per_s")],
    *[f"epoch.{m}.{k}" for m in ("resnet18", "densenet121") for k in ("seconds", "images_per_s")],
    "epoch.train_images",
    "bf16.resnet18.max_abs_logit_diff", "bf16.densenet121.max_abs_logit_diff",
    "determinism.resnet18.max_metric_diff", "determinism.densenet121.max_metric_diff",
    "ddp.used.ranks", "ddp.used.step_seconds", "ddp.used.max_param_diff_across_ranks",
    "pinned.pinned_host.images_per_s", "pinned.device_resident.images_per_s",
    "projection.repro_seconds", "api.missing", "gpu_tests.pytest_rc",
    "peak_gpu_memory_gib", "wall_seconds",
]


@pytest.mark.timeout(3600)
def test_dry_run_brings_back_every_number(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] and result["all_passed"]
    found = result["numbers"]
    absent = [k for k in REQUIRED if not isinstance(found.get(k), (int, float)) or not math.isfinite(found[k])]
    assert not absent, f"missing or not a number: {absent}"
    assert found["api.missing"] == 0 and found["epoch.train_images"] == result["sizes"]["epoch_counts"]["train"]
    assert found["ddp.used.ranks"] == 2 and found["ddp.used.max_param_diff_across_ranks"] < 1e-6
    assert result["numbers"]["projection.stages"] == len({s.split("@")[0] for s in gpu_steps.stage_names(
        *map(lambda f: __import__("yaml").safe_load((ROOT / f).read_text()), ("dvc.yaml", "params.yaml")))})


def test_the_audited_torch_list_covers_every_torch_name_the_code_calls():
    listed = set(gpu_api.listed())
    unlisted = sorted(gpu_api.used() - listed)
    assert not unlisted, (f"torch names used but not in bench/torch_api.txt: {unlisted}; check that each exists in "
                          f"torch 2.11 / torchvision 0.26, then add it")
    assert gpu_api.missing(sorted(listed)) == []


def test_api_names_follow_import_aliases():
    source = ("import torch\nimport torch.nn.functional as F\nfrom torchvision import transforms as T\n"
              "x = F.pad(torch.cuda.mem_get_info(), T.Compose)\n")
    assert {"torch.nn.functional.pad", "torch.cuda.mem_get_info", "torchvision.transforms.Compose"} <= \
        gpu_api.names_in(source)
    assert not gpu_api.resolves("torch.nn.functional.no_such_function")


def test_stage_names_expand_every_matrix_from_params():
    dvc = {"stages": {"a": {"cmd": "x"}, "cnn": {"matrix": {"name": "${cnn.experiments}"}}, "b": {}}}
    params = {"cnn": {"experiments": {"r18": {}, "d121": {}}}}
    assert gpu_steps.stage_names(dvc, params) == ["a", "cnn@r18", "cnn@d121", "b"]


def test_wheels_are_only_what_the_gpu_machine_lacks():
    names = {line.split("==")[0] for line in gpu_wheels.requirements()}
    assert {"medmnist", "pydantic", "pydantic-core", "annotated-types"} <= names
    assert not names & {"torch", "torchvision", "mlflow", "dvc", "scikit-image", "numpy", "pandas"}


def _git_tree(root: Path, files: dict[str, int]) -> None:
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    for name, size in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * size)


def test_size_counts_wheels_and_the_unignored_tree_and_fails_above_the_limit(tmp_path):
    _git_tree(tmp_path, {"a.py": 300_000, ".gitignore": 10, "ignored/big.bin": 5_000_000,
                         ".whl/w-1-py3-none-any.whl": 700_000})
    (tmp_path / ".gitignore").write_text("ignored/\n.whl/\n")
    assert gpu_wheels.tree_bytes(tmp_path) == 300_000 + len("ignored/\n.whl/\n")
    ok, report = gpu_wheels.size_report(tmp_path, tmp_path / ".whl", limit_mib=1.0)
    assert ok and "travels: 1.0 MiB" in report
    ok, report = gpu_wheels.size_report(tmp_path, tmp_path / ".whl", limit_mib=0.9)
    assert not ok and report.splitlines()[-1].startswith("error: 1.0 MiB would travel, over 0.9 MiB")


def test_wheels_size_command_exits_2_with_one_message(tmp_path):
    (tmp_path / "w-1-py3-none-any.whl").write_bytes(b"x" * 2_000_000)
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_wheels", "--size", str(tmp_path), "--limit-mib", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")


def test_the_check_imports_without_mlflow_or_dvc():
    # neither travels to the GPU machine (gpu_wheels' docstring); None in sys.modules makes an import fail
    code = ("import sys\nfor m in ('mlflow', 'dvc', 'skimage'): sys.modules[m] = None\n"
            "import bench.gpu_check, bench.gpu_steps\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
