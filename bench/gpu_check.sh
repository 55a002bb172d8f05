#!/usr/bin/env bash
# The prepared GPU check (issue 11): one script for a single-GPU machine with no network that has
# PyTorch, torchvision, scikit-learn, pandas and matplotlib but not medmnist, mlflow or dvc.
#
#   here (with the network):  make wheels      # pip download of bench/gpu_wheels.py's list into .whl/
#   carry the working tree and .whl/ to the GPU machine, then:
#   there:                    bash bench/gpu_check.sh            # about 5 minutes on an H200
#   anywhere (CPU, small):    bash bench/gpu_check.sh --dry-run  # every step at toy size on the CPU
#
# Steps (each with its own time limit, all recorded even when one fails):
#   1. install the missing packages from .whl/ (pip --no-index; dvc is not needed by any step)
#   2. pytest tests/test_gpu.py
#   3. python -m bench.cnn_throughput --full
#   4. a one-process DDP smoke test with NCCL (a resnet18 step under DistributedDataParallel)
#   5. one real-size synthetic epoch of each CNN (64 px, 89,996 train images) through the loop
# and writes bench/results/gpu_check-<gpu>.json (exit status: 0 only when every step passed).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && $DRY == 1 ]] && PY=.venv/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"

# step NAME LIMIT_S CMD...: run it, keep its status, time and output tail in $WORK/steps/NAME.json
mkdir -p "$WORK/steps"
step() {
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$WORK/$name.log"
    "$PY" - "$name" "$rc" "$((SECONDS - start))" "$WORK/$name.log" "$WORK/steps/$name.json" <<'EOF'
import json, sys
name, rc, seconds, log, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
tail = open(log, errors="replace").read()[-4000:]
json.dump({"step": name, "rc": rc, "passed": rc == 0, "seconds": seconds, "output_tail": tail}, open(out, "w"))
EOF
    echo "== $name: rc=$rc in $((SECONDS - start))s"
}

# 1. Packages: only what is missing, only from the local folder.
if ! "$PY" -c "import medmnist, mlflow, pydantic, yaml, pytest" 2>/dev/null; then
    if [[ ! -f .whl/requirements.txt ]]; then
        echo "error: medmnist/mlflow are not installed and .whl/requirements.txt is missing:" \
             "run 'make wheels' on a machine with the network and carry .whl/ here" >&2
        exit 2
    fi
    step install 300 "$PY" -m pip install -q --no-index --find-links .whl -r .whl/requirements.txt
fi

if [[ $DRY == 1 ]]; then
    DEVICE=cpu; TRAIN=256; EVAL=64; BACKEND=gloo; FULL="--steps 2 --models resnet18"
else
    DEVICE=cuda; TRAIN=89996; EVAL=10004; BACKEND=nccl; FULL="--full"
fi

# 2-3. The GPU tests and the throughput benchmark at full size.
step test_gpu 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
step throughput 300 "$PY" -m bench.cnn_throughput $FULL

# 4. DDP smoke test: one process, NCCL on the GPU (gloo on the CPU for --dry-run).
cat > "$WORK/ddp.py" <<'EOF'
import os, sys, torch, torch.distributed as dist, torchvision
backend, device = sys.argv[1], torch.device(sys.argv[2])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
dist.init_process_group(backend, rank=0, world_size=1)
model = torchvision.models.resnet18(num_classes=9).to(device)
model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 64, 64, device=device)), torch.arange(8, device=device) % 9)
loss.backward(); opt.step()
dist.barrier()
dist.destroy_process_group()
print(f"ddp {backend} on {device}: one step, loss {loss.item():.4f}")
EOF
step ddp_smoke 120 "$PY" "$WORK/ddp.py" "$BACKEND" "$DEVICE:0"

# 5. One synthetic epoch of each CNN at real size through the device-resident loop.
cat > "$WORK/epoch.py" <<'EOF'
import json, sys, time
import numpy as np, torch
from pipeline.data import pathmnist
from pipeline.models import cnn
from pipeline.params import CNN_MODELS, Cnn
from pipeline.train import cnn_loop
device, n_train, n_eval, out = torch.device(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
arrays = pathmnist.synthesize(64, {"train": n_train, "val": n_eval, "test": n_eval}, 2023)
data = pathmnist.PathMnist({s: arrays[f"{s}_images"] for s in pathmnist.SPLITS},
                           {s: arrays[f"{s}_labels"].reshape(-1).astype(np.int64) for s in pathmnist.SPLITS},
                           9, 64, "synthetic")
results = {"synthesize_seconds": round(time.perf_counter() - start, 1), "train_images": n_train, "models": {}}
splits = cnn_loop.to_device(data, device)
for name in CNN_MODELS:
    torch.manual_seed(0)
    cfg = Cnn(model=name, epochs=1, batch_size=64, log_every=10**9, augment=["rotation", "hflip"])
    model = cnn.build(name, 9)
    start = time.perf_counter()
    result = cnn_loop.train(model, splits, cfg, seed=0, log=lambda m, s: None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    test, _ = cnn_loop.evaluate(model, splits["test"], 1024)
    results["models"][name] = {"epoch_seconds": round(seconds, 1), "train_seconds": round(result.train_seconds, 1),
                               "images_per_second": round(n_train / result.train_seconds) if result.train_seconds else None,
                               "val": result.best_val, "test": test}
    print(name, results["models"][name], flush=True)
if device.type == "cuda":
    results["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
json.dump(results, open(out, "w"), indent=1)
EOF
step cnn_epochs 360 "$PY" "$WORK/epoch.py" "$DEVICE" "$TRAIN" "$EVAL" "$WORK/epochs.json"

# One results file, named after the GPU.
"$PY" - "$WORK" "$DRY" <<'EOF'
import json, platform, re, sys
from pathlib import Path
import torch
from pipeline.outputs import write_json
work, dry = Path(sys.argv[1]), sys.argv[2] == "1"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
steps = {p.stem: json.loads(p.read_text()) for p in sorted((work / "steps").glob("*.json"))}
epochs = work / "epochs.json"
result = {"gpu": gpu, "dry_run": dry, "torch": torch.__version__, "cuda": torch.version.cuda,
          "python": platform.python_version(), "all_passed": all(s["passed"] for s in steps.values()),
          "steps": steps, "cnn_epochs": json.loads(epochs.read_text()) if epochs.exists() else None}
slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") + ("-dry-run" if dry else "")
path = Path("bench/results") / f"gpu_check-{slug}.json"
write_json(path, result)
print(f"wrote {path}: all_passed={result['all_passed']}")
sys.exit(0 if result["all_passed"] else 1)
EOF
