#!/usr/bin/env bash
# The prepared GPU check (issue 19): the thin entry to `python -m bench.gpu_check`.
#
#   here (network):   make wheels                       # cp312 wheels of what the GPU machine lacks, into .whl/
#   on the device:    bash bench/gpu_check.sh           # carry .whl; within 8 minutes on one H200, install included
#   anywhere (CPU):   bash bench/gpu_check.sh --dry-run # every step at toy size, gloo for DDP
#
# Results: bench/results/gpu_check-<gpu>.json, and $OUT/gpu_check.json when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
PY=${PYTHON:-python3}
[[ "${1:-}" == "--dry-run" && -x .venv/bin/python ]] && PY=.venv/bin/python

# The packages the steps import that the GPU machine lacks (medmnist, pydantic), from .whl/ only.
if ! "$PY" -c "import medmnist, pydantic" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" > /dev/null; then
        echo "error: medmnist/pydantic are not installed and .whl/ has no wheels: run 'make wheels' on a" \
             "machine with the network and carry .whl here" >&2
        exit 2
    fi
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu_check --budget $((480 - (SECONDS - start))) "$@"
