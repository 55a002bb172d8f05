"""The device lease: concurrent processes get distinct devices from the pool, none shared, and a
process that dies gives its device back (simulated on CPU with PIPELINE_DEVICE_POOL=cpu:0,...)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, wait_for
from pipeline import devices
from pipeline.errors import StageError

# Takes a device, records it, then holds it until every process of the batch has recorded one.
HOLDER = """
import sys, time
from pathlib import Path
from pipeline.devices import resolve_device
out, n = Path(sys.argv[1]), int(sys.argv[2])
device = resolve_device("auto")
(out / f"{device}.{__import__('os').getpid()}").write_text(str(device))
deadline = time.monotonic() + 120
while len(list(out.iterdir())) < n and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0)
"""


def start(out: Path, n: int, pool: str, locks: Path, hold: float = 0) -> subprocess.Popen:
    env = {**os.environ, "PIPELINE_DEVICE_POOL": pool, "PIPELINE_DEVICE_LOCKS": str(locks)}
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(n), str(hold)], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)


def test_concurrent_processes_get_distinct_devices(tmp_path):
    n = 3
    out, locks = tmp_path / "out", tmp_path / "locks"
    out.mkdir()
    procs = [start(out, n, ",".join(f"cpu:{i}" for i in range(n)), locks) for _ in range(n)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, errs
    given = sorted(f.read_text() for f in out.iterdir())
    assert given == [f"cpu:{i}" for i in range(n)], given   # all held at once: N devices, none shared


def test_dead_process_releases_its_device(tmp_path):
    out, locks = tmp_path / "out", tmp_path / "locks"
    out.mkdir()
    holder = start(out, 1, "cpu:0", locks, hold=300)
    wait_for(lambda: list(out.iterdir()), 300, "the holder taking its device", process=holder, every=0.05)
    waiter = start(out, 2, "cpu:0", locks)
    # The first line that mentions the lease ("" if the waiter ended without one).
    line = next((text for text in iter(waiter.stderr.readline, "") if "device lease" in text), "")
    assert "all 1 devices" in line and "waiting" in line, line   # the only device is taken
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    waiter.wait(timeout=120)
    assert waiter.returncode == 0, waiter.stderr.read()
    assert sorted(f.read_text() for f in out.iterdir()) == ["cpu:0", "cpu:0"]


def test_single_device_and_explicit_names_take_no_lease(tmp_path, monkeypatch):
    monkeypatch.delenv(devices.POOL_ENV, raising=False)
    monkeypatch.setenv(devices.LOCKS_ENV, str(tmp_path / "locks"))
    assert devices.resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.device_count() < 2:
        expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        assert devices.resolve_device("auto") == expected
        assert not (tmp_path / "locks").exists()
    monkeypatch.setenv(devices.POOL_ENV, "cpu:0,cpu:1")
    assert devices.resolve_device("cpu:1") == torch.device("cpu:1")   # explicit: no lease
    assert not (tmp_path / "locks").exists()


@pytest.mark.parametrize("pool", ["cuda:0,cuda:0", "cuda", "gpu:0"])
def test_bad_pool_is_a_clear_error(monkeypatch, pool):
    monkeypatch.setenv(devices.POOL_ENV, pool)
    with pytest.raises(StageError, match=devices.POOL_ENV):
        devices.resolve_device("auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(StageError, match="no CUDA device"):
        devices.resolve_device("cuda")


LEASE_STAGE = """
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, os.environ["PIPELINE_SRC"])
from pipeline.devices import resolve_device
device = resolve_device("auto")
seen = Path(os.environ["LEASE_SEEN"])
(seen / f"{device}.{os.getpid()}").write_text(str(device))
deadline = time.monotonic() + 300
while len(list(seen.iterdir())) < 2 and time.monotonic() < deadline:   # both hold a device at once
    time.sleep(0.1)
Path("device.json").write_text(json.dumps({"device": str(device)}))
"""


def test_dvc_queue_gives_each_worker_its_own_device(tmp_path):
    """`dvc queue start -j 2` with a 2-device pool: the two queued experiments run at once on two devices."""
    from conftest import dvc, run, tiny_dvc_repo

    seen = tmp_path / "seen"
    seen.mkdir()
    repo = tiny_dvc_repo(tmp_path / "repo", {
        "lease.py": LEASE_STAGE, "params.yaml": "seed: 0\n",
        "dvc.yaml": "stages:\n  lease:\n    cmd: python lease.py\n    deps: [lease.py]\n"
                    "    params: [seed]\n    metrics:\n      - device.json:\n          cache: false\n"})
    pool = {"PIPELINE_DEVICE_POOL": "cpu:0,cpu:1", "PIPELINE_DEVICE_LOCKS": str(tmp_path / "locks"),
            "PIPELINE_SRC": str(REPO), "LEASE_SEEN": str(seen)}
    for seed in (1, 2):
        dvc(repo, "exp", "run", "--queue", "-n", f"seed{seed}", "-S", f"seed={seed}", **pool)
    dvc(repo, "queue", "start", "-j", "2", **pool)
    run([sys.executable, "-m", "pipeline.queue", "wait", "--timeout", "600", "--repo", str(repo)], REPO, check=False, **pool)
    status = dvc(repo, "queue", "status", **pool).stdout
    dvc(repo, "queue", "stop", "--kill", check=False, **pool)
    assert status.count("Success") == 2, status + dvc(repo, "queue", "logs", "seed1", check=False).stdout
    assert sorted(f.read_text() for f in seen.iterdir()) == ["cpu:0", "cpu:1"]
    shown = dvc(repo, "exp", "show", "--json", **pool).stdout
    assert '"cpu:0"' in shown and '"cpu:1"' in shown, shown[:3000]
