"""The one writer for every output file (metrics, curves, models, checkpoints, figures, data).

Each file is written to a temporary file in the same folder, flushed to disk, then moved into
place with `os.replace`; the temporary file is removed in `finally`. A reader (DVC, the next
stage, a resumed run) sees the previous file or the new one, never half of one, and an
interruption leaves no `tmp*.tmp` behind. A full disk (ENOSPC, EFBIG, EDQUOT) becomes one
StageError naming the file (exit 2 through `pipeline.runtime.run_stage`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.errors import DISK_FULL, StageError, disk_full_message
from pipeline.runtime import check_params


_UMASK = os.umask(0)
os.umask(_UMASK)

@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    `suffix` lets writers that insist on an extension (np.savez adds ".npz") keep theirs; the
    temporary name always starts with "tmp" and ends with ".tmp" or the given suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:   # created inside `try`, so an interruption right after creation still removes it
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"tmp.{path.name}.", suffix=suffix)
        tmp = Path(name)
        os.close(fd)
        yield tmp
        check_params()   # no results for params the stage did not read
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp makes 0600; outputs get the usual permissions unless `mode` says (secrets: 0o600)
        os.chmod(tmp, 0o666 & ~_UMASK if mode is None else mode)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        raise StageError(disk_full_message(error, str(path))) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash right after it keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_text(text, encoding="utf-8")


def copy_file(src: str | Path, path: str | Path) -> None:
    """A copy of `src` (a figure the report shows), written like every other output."""
    with atomic_path(path, suffix=Path(src).suffix or ".tmp") as tmp:
        shutil.copyfile(src, tmp)


def write_npz(path: str | Path, **arrays) -> None:
    """A numpy archive (np.savez insists on the .npz suffix, which the temporary name keeps)."""
    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def fresh_dir(path: str | Path) -> Path:
    """An empty folder at `path` (a stage output rebuilt whole: nothing stale survives in it)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_json(path: str | Path, data: dict, mode: int | None = None) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n", mode)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """A DVC plot file: one row per step/epoch, one column per series."""
    if not rows:
        raise ValueError(f"no rows for {path}")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())
