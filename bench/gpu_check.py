"""The prepared GPU check: the steps of `bench.gpu_steps` one after another, each under its own
time limit, inside one overall budget, results in one JSON file (bench/results/gpu_check-<gpu>.json,
and $OUT/gpu_check.json when OUT is set, so the device tool brings it back).

    bash bench/gpu_check.sh             # the entry: installs carried wheels, then runs this
    bash bench/gpu_check.sh --dry-run   # every step at toy size on the CPU, gloo for DDP

The file's "numbers" flattens every step's numeric results to dotted keys (throughput.resnet18.
ours_images_per_s, ...), plus peak_gpu_memory_gib (the largest of the steps' peaks) and
wall_seconds. Exit status 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480   # the whole check, install included, on one H200 (issue 19: 8 minutes)

# Seconds each step may take on the GPU; the dry run, on a shared 2-core CPU, gets DRY_SLOWDOWN times
# these and the budget.
LIMITS = {"api": 60, "throughput": 120, "epoch": 180, "bf16": 60, "determinism": 120, "ddp": 150,
          "pinned": 90, "projection": 120, "gpu_tests": 150}
DRY_SLOWDOWN = 4

REAL = {"dry_run": False, "size": 64, "batch": 64, "warmup": 10, "steps": 100, "throughput_train": 89_996,
        "epoch_counts": {"train": 89_996, "val": 10_004, "test": 7_180},
        "det_counts": {"train": 4096, "val": 1024, "test": 1024}, "det_epochs": 1, "det_log_every": 100,
        "compare_batch": 256, "pinned_counts": {"train": 32_768, "val": 1024, "test": 1024},
        "projection_steps": 20, "ddp": [["nccl", 2], ["gloo", 2], ["nccl", 1]], "ddp_timeout": 45}
DRY = {"dry_run": True, "size": 32, "batch": 8, "warmup": 1, "steps": 1, "throughput_train": 64,
       "epoch_counts": {"train": 16, "val": 18, "test": 18},
       "det_counts": {"train": 16, "val": 16, "test": 16}, "det_epochs": 1, "det_log_every": 100,
       "compare_batch": 4, "pinned_counts": {"train": 16, "val": 18, "test": 18},
       "projection_steps": 1, "ddp": [["gloo", 2]], "ddp_timeout": 500}


class StepTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise StepTimeout()


def run_step(name: str, sizes: dict, device, limit: float) -> dict:
    """One step in this process under its own time limit (SIGALRM: the steps' loops return to
    Python every batch; DDP's ranks are processes of their own with their own timeout)."""
    import torch

    from bench import gpu_steps

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    start = time.perf_counter()
    record = {"limit_s": round(limit)}
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        record["result"] = gpu_steps.STEPS[name](sizes, device)
        record["passed"] = True
    except StepTimeout:
        record.update(passed=False, error=f"timed out after {limit:.0f} s")
    except Exception as error:   # recorded, and the next step runs
        record.update(passed=False, error=traceback.format_exc()[-3000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if device.type == "cuda":
        record.setdefault("result", {})["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def numbers(tree, prefix: str = "") -> dict[str, float]:
    """Every finite int/float leaf, keyed by its dotted path."""
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(numbers(value, f"{prefix}{key}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(tree):
        out[prefix[:-1]] = tree
    return out


def write(steps: dict, meta: dict, start: float, dry_run: bool) -> tuple[dict, list[Path]]:
    """The results file, rewritten after every step (a kill from outside keeps what was measured)."""
    flat = {f"{name}.{key}": value for name, step in steps.items() for key, value in
            numbers(step.get("result", {})).items()}
    peaks = [value for key, value in flat.items() if key.endswith(".peak_gpu_memory_gib")]
    flat["peak_gpu_memory_gib"] = max(peaks, default=0.0)   # 0.0: no CUDA (dry run)
    flat["wall_seconds"] = round(time.perf_counter() - start, 1)
    result = {**meta, "all_passed": all(s["passed"] for s in steps.values()), "numbers": flat, "steps": steps}
    slug = re.sub(r"[^a-z0-9]+", "-", meta["gpu"].lower()).strip("-") + ("-dry-run" if dry_run else "")
    paths = [ROOT / "bench" / "results" / f"gpu_check-{slug}.json"]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / "gpu_check.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    return result, paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, gloo for DDP")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for every step together")
    parser.add_argument("--only", default="", help="comma-separated steps (default: all)")
    parser.add_argument("--ddp-rank", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.ddp_rank:
        from bench import gpu_steps

        rank, world, backend, device, port, batch, size = args.ddp_rank
        gpu_steps.ddp_rank(int(rank), int(world), backend, device, int(port), int(batch), int(size))
        return 0

    import torch

    start = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; run `bash bench/gpu_check.sh --dry-run` for the CPU version", file=sys.stderr)
        return 2
    sizes, device = (DRY, "cpu") if args.dry_run else (REAL, "cuda")
    slowdown = DRY_SLOWDOWN if args.dry_run else 1
    names = args.only.split(",") if args.only else list(LIMITS)
    unknown = sorted(set(names) - set(LIMITS))
    if unknown:
        print(f"error: no step {', '.join(unknown)}; steps: {', '.join(LIMITS)}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"GPU check on {gpu}: torch {torch.__version__}, python {platform.python_version()}, "
          f"budget {args.budget:.0f} s", flush=True)
    meta = {"gpu": gpu, "dry_run": args.dry_run, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "sizes": sizes}
    steps = {}
    for name in names:
        left = slowdown * args.budget - (time.perf_counter() - start)
        if left < 5:
            steps[name] = {"passed": False, "error": "the check's time budget was spent"}
        else:
            steps[name] = run_step(name, sizes, torch.device(device), min(slowdown * LIMITS[name], left))
        step = steps[name]
        print(f"== {name}: {'passed' if step['passed'] else 'FAILED: ' + step['error'][-1500:]} "
              f"({step.get('seconds', 0)} s of {step.get('limit_s', 0)} s)", flush=True)
        result, paths = write(steps, meta, start, args.dry_run)
    print(f"wrote {', '.join(map(str, paths))}: all_passed={result['all_passed']}, "
          f"wall {result['numbers']['wall_seconds']} s")
    return 0 if result["all_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
