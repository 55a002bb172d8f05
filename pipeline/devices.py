"""Which device a stage trains on, with one experiment per GPU when a queue runs several at once.

`dvc queue start -j N` gives every worker the same environment, so without help all N
experiments land on the same GPU. When several devices are available, `resolve_device("auto")`
(or "cuda") takes an exclusive lease on one of them: an `flock` on `<lock folder>/<device>.lock`,
held for the rest of the process and released by the kernel when the process exits, however it
exits. With N GPUs and `-j N`, every GPU runs one experiment; an extra worker waits for a free one.

- the pool: `PIPELINE_DEVICE_POOL` (comma-separated torch devices, e.g. "cuda:0,cuda:2"; also
  "cpu:0,cpu:1" to try the mechanism without GPUs), else every visible CUDA device when there
  are two or more; a single device or an explicit name such as "cuda:1" takes no lease;
- the lock folder: `PIPELINE_DEVICE_LOCKS`, else `<temp dir>/pipeline-device-locks` (shared by
  every process of the machine).
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.errors import StageError

POOL_ENV = "PIPELINE_DEVICE_POOL"
LOCKS_ENV = "PIPELINE_DEVICE_LOCKS"

_lease: tuple[torch.device, object] | None = None   # (device, open lock file) for this process's lifetime


def lock_folder() -> Path:
    return Path(os.environ.get(LOCKS_ENV) or Path(tempfile.gettempdir()) / "pipeline-device-locks")


def device_pool() -> list[torch.device]:
    """The devices to share out, or [] when there is nothing to share."""
    listed = os.environ.get(POOL_ENV, "").strip()
    if listed:
        try:
            pool = [torch.device(name.strip()) for name in listed.split(",") if name.strip()]
        except RuntimeError as error:
            raise StageError(f"{POOL_ENV}={listed!r} is not a comma-separated list of torch devices "
                             f"(e.g. cuda:0,cuda:1): {error}") from None
        if any(d.index is None for d in pool) or len(set(pool)) != len(pool):
            raise StageError(f"{POOL_ENV}={listed!r}: give each device once, with its index (cuda:0,cuda:1)")
        return pool
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return []


def lease(pool: list[torch.device], poll_s: float = 0.5) -> torch.device:
    """Take the first free device of the pool (waiting while all are taken) and keep it until exit."""
    global _lease
    if _lease is not None:
        return _lease[0]
    folder = lock_folder()
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for device in pool:
            handle = open(folder / f"{device.type}{device.index}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")   # who holds it, for people looking at the folder
            handle.flush()
            _lease = (device, handle)
            print(f"device lease: {device} (lock {handle.name})", file=sys.stderr)
            return device
        if not waited:
            print(f"device lease: all {len(pool)} devices in {folder} are taken; waiting for one to free up",
                  file=sys.stderr)
            waited = True
        time.sleep(poll_s)


def resolve_device(name: str) -> torch.device:
    """base.device ("auto" | "cpu" | "cuda" | "cuda:N" ...) -> the torch device this process uses."""
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("base.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name in ("auto", "cuda"):
        pool = device_pool()
        if name == "cuda":
            pool = [d for d in pool if d.type == "cuda"]
        if pool:
            device = lease(pool)
            if device.type == "cuda":
                torch.cuda.set_device(device)   # so that a bare "cuda" elsewhere means the leased GPU
            return device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
