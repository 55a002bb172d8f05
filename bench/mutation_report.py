"""Kill rate per module from mutmut's results (run `mutmut run` first; `make mutate` does both).

Usage: python -m bench.mutation_report [--survivors]
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict

LINE = re.compile(r"^\s*(?P<name>\S+__mutmut_\d+): (?P<status>.+)$")


def module_of(mutant: str) -> str:
    """`pipeline.train.forecaster.x_fit__mutmut_3` -> `pipeline.train.forecaster`."""
    return mutant.rsplit(".", 1)[0]


def main(argv: list[str]) -> int:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True,
                         text=True, check=True).stdout
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors = []
    for line in out.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        status = match["status"].strip()
        if status == "not checked":   # outside this run's MUTATE filter, or the run was stopped
            continue
        counts[module_of(match["name"])][status] += 1
        if status != "killed":
            survivors.append(f"{match['name']}: {status}")
    if not counts:
        print("no mutmut results: run `mutmut run` first")
        return 1
    print(f"{'module':<34} {'killed':>7} {'survived':>9} {'other':>6} {'total':>6} {'kill rate':>10}")
    total = Counter()
    for module in sorted(counts):
        c = counts[module]
        total.update(c)
        _row(module, c)
    _row("all", total)
    if "--survivors" in argv:
        print("\n" + "\n".join(survivors))
    return 0


def _row(name: str, c: Counter) -> None:
    n = sum(c.values())
    killed, survived = c["killed"], c["survived"]
    tested = killed + survived
    rate = f"{100 * killed / tested:.1f}%" if tested else "n/a"
    print(f"{name:<34} {killed:>7} {survived:>9} {n - tested:>6} {n:>6} {rate:>10}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
