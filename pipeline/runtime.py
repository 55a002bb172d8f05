"""What every stage does first: clear errors instead of tracebacks for bad input, seeding, device."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import DISK_FULL, DataError, StageError, disk_full_message, redact
from pipeline.params import ParamsError, load_yaml


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_stage(main: Callable[[list[str]], None]) -> None:
    """Run a stage's main(argv); bad params or data end with one message and exit code 2.

    SIGINT and SIGTERM both raise KeyboardInterrupt for the whole stage, so every `finally`
    runs (temporary files removed, the MLflow run marked KILLED) and the exit code is 130. SIGINT
    is set explicitly: a process started from a shell that ignores it (`trap "" INT`, a
    background job) inherits SIG_IGN, and Python then installs no handler of its own.
    """
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        params = Path.cwd() / "params.yaml"
        _check_exp_params(params)
        watch_params(params)
        main(sys.argv[1:])
        check_params()
    except (ParamsError, DataError, StageError) as error:
        _fail(str(error))
    except FloatingPointError as error:   # a safety net: the trainers convert divergence where it happens
        _fail(f"training diverged ({error}): the loss or weights became inf/NaN. Lower the learning rate "
              "(or check the data for extreme values) and re-run the stage.")
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        _fail(disk_full_message(error))
    except KeyboardInterrupt:
        print("interrupted: no outputs were accepted; re-run the stage to start again", file=sys.stderr)
        sys.exit(130)


# params.yaml as the running stage read it (set by `run_stage`); no output is
# accepted once it changed: another `dvc exp run` in the same workspace rewrote it under us.
_watched: tuple[Path, bytes] | None = None

QUEUE_ADVICE = ("Two `dvc exp run` at once in one workspace overwrite each other's params.yaml (DVC "
                "does not lock it); queue them instead: `dvc exp run --queue -S ...` for each, then "
                "`dvc queue start` and `python -m pipeline.queue wait`.")


def watch_params(path: Path) -> None:
    global _watched
    _watched = (path, path.read_bytes()) if path.is_file() else None


def check_params() -> None:
    """Refuse to go on when params.yaml is no longer the file this stage read."""
    if _watched is None:
        return
    path, before = _watched
    try:
        now = path.read_bytes()
    except OSError:
        now = b""
    if now != before:
        raise StageError(f"{path.name} changed while this stage ran, so its results would be recorded "
                         f"under params it did not use; nothing was kept. {QUEUE_ADVICE}")


def _check_exp_params(path: Path) -> None:
    """In a `dvc exp run`, params.yaml must be what that experiment asked for.

    DVC keeps the experiment's own commit (its -S values applied) in refs/exps/exec/EXEC_MERGE while
    it runs in the workspace; a second `dvc exp run` started meanwhile rewrites params.yaml, and
    this run would train the other one's params under its own name.
    """
    if not os.environ.get("DVC_EXP_NAME") or not path.is_file():
        return
    try:
        asked = subprocess.run(["git", "show", "refs/exps/exec/EXEC_MERGE:./params.yaml"], cwd=path.parent,
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return
    if asked.returncode != 0:   # not a workspace run (a queued copy), or an older DVC
        return
    wanted, found = load_yaml(asked.stdout), load_yaml(path.read_text())
    if wanted != found:
        keys = ", ".join(sorted(_differences(wanted, found))) or "its contents"
        raise StageError(f"params.yaml is not what experiment '{os.environ['DVC_EXP_NAME']}' asked for "
                         f"({keys} differ): another `dvc exp run` rewrote it. {QUEUE_ADVICE}")


def _differences(a, b, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return {d for k in set(a) | set(b) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")}
    return set() if a == b else {prefix.rstrip(".")}


def _fail(message: str) -> None:
    print(f"error: {redact(message)}", file=sys.stderr)
    sys.exit(2)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and (when installed) torch together."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)
