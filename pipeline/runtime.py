"""What every stage does first: clear errors instead of tracebacks for bad input, seeding, device."""

from __future__ import annotations

import random
import signal
import sys
from typing import Callable

import numpy as np

from pipeline.errors import DISK_FULL, DataError, StageError, disk_full_message, redact
from pipeline.params import ParamsError


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
        main(sys.argv[1:])
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
