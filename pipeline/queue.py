"""Wait for DVC's experiment queue: `python -m pipeline.queue wait [--timeout SECONDS]`.

`dvc exp show` right after `dvc queue start` can fail ("directory '.dvc/tmp/exps/tmpXXXX/.dvc'
does not exist") while a worker sets up its copy. This polls `dvc queue status` until nothing
is Queued or Running and every temporary copy is gone. Exit 0: all done and none failed;
1: some failed (names them, with the command that shows their logs, and says when DVC's
run-cache race failed them); 2: the deadline passed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# DVC 3.67's StageCache._load lists a run-cache entry's directory and joins its newest file name;
# while another worker is saving that entry (or after one was killed doing so) the directory is
# empty and the stage fails with this, before its command runs.
RUN_CACHE_RACE = "join() argument must be str, bytes, or os.PathLike object, not 'NoneType'"
STATUS = re.compile(r"^(?P<task>\S+)\s+(?P<name>\S+)\s+.*?\s(?P<status>Queued|Running|Success|Failed)\s*$", re.M)


def _dvc() -> list[str]:
    return [sys.executable, "-m", "dvc"]


def queue_status(repo: Path) -> list[dict]:
    out = subprocess.run([*_dvc(), "queue", "status"], cwd=repo, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"`dvc queue status` failed: {out.stderr.strip() or out.stdout.strip()}")
    return [m.groupdict() for m in STATUS.finditer(out.stdout)]


def queue_logs(repo: Path, name: str) -> str:
    out = subprocess.run([*_dvc(), "queue", "logs", name], cwd=repo, capture_output=True, text=True, timeout=300)
    return out.stdout + out.stderr


def wait(repo: Path, timeout: float, poll: float = 3.0) -> list[dict]:
    """The queue's entries once none is Queued or Running and no temporary copy is left."""
    deadline = time.monotonic() + timeout
    while True:
        entries = queue_status(repo)
        busy = [e for e in entries if e["status"] in ("Queued", "Running")]
        copies = sorted(p.name for p in (repo / ".dvc/tmp/exps").glob("tmp*") if p.is_dir())
        if not busy and not copies:
            return entries
        if time.monotonic() > deadline:
            what = ", ".join(f"{e['name']} ({e['status']})" for e in busy) or f"temporary copies {copies}"
            raise TimeoutError(f"the queue is still busy after {timeout:.0f} s: {what}. Wait longer "
                               "(--timeout), look with `dvc queue status` / `dvc queue logs <name>`, or stop it "
                               "with `dvc queue kill <name>`.")
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.queue", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["wait"])
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("QUEUE_TIMEOUT", 24 * 3600)),
                        help="seconds before giving up (default: $QUEUE_TIMEOUT or 24 h)")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="the DVC repository (default: here)")
    args = parser.parse_args(argv)
    try:
        entries = wait(args.repo, args.timeout)
    except (TimeoutError, RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = [e["name"] for e in entries if e["status"] == "Failed"]
    if failed:
        print(f"error: {len(failed)} queued experiment(s) failed: {', '.join(failed)}; see "
              f"`dvc queue logs {failed[0]}`", file=sys.stderr)
        raced = [name for name in failed if RUN_CACHE_RACE in queue_logs(args.repo, name)]
        if raced:
            print(f"{', '.join(raced)} failed in DVC's run-cache, not in a stage: two workers started the same "
                  "stage at once (or a killed worker left an empty entry). Remove empty entries with `find "
                  ".dvc/cache/runs -type d -empty -delete`, then queue those experiments again; on a fresh clone, "
                  "`dvc repro download_ett download_images` before `dvc queue start -j N` avoids it.",
                  file=sys.stderr)
        return 1
    print(f"queue done: {sum(e['status'] == 'Success' for e in entries)} succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
