"""Kill rate per module from mutmut's results (run `mutmut run` first; `make mutate` does both).

A mutant counts as caught when a test failed on it (killed), it hung (timeout) or it crashed the
interpreter (segfault). "no tests" (no fast test calls the function) counts as surviving, like
"survived". Mutants that cannot change behaviour are listed, one line each with the reason, in
bench/equivalent_mutants/<module>.txt (`<mutant name>  # why`) and are left out of the rate; a
listed name that no longer survives is reported as stale.

Usage: python -m bench.mutation_report [--survivors]
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*(?P<name>\S+__mutmut_\d+): (?P<status>.+)$")
EQUIVALENT_DIR = Path(__file__).parent / "equivalent_mutants"
CAUGHT = {"killed", "timeout", "segfault"}
NOT_CAUGHT = {"survived", "no tests", "suspicious"}


def module_of(mutant: str) -> str:
    """`pipeline.train.forecaster.x_fit__mutmut_3` -> `pipeline.train.forecaster`."""
    return mutant.rsplit(".", 1)[0]


def equivalents(folder: Path = EQUIVALENT_DIR) -> dict[str, str]:
    """{mutant name: why it is equivalent} from every `<module>.txt` in `folder`."""
    found = {}
    for path in sorted(folder.glob("*.txt")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            name, _, why = line.partition("#")
            name = name.strip()
            if not name:
                continue
            if not why.strip():
                raise SystemExit(f"{path}:{number}: {name} has no reason (write `name  # why it is equivalent`)")
            found[name] = why.strip()
    return found


def tally(statuses: dict[str, str], equivalent: dict[str, str]) -> tuple[dict[str, Counter], list[str], list[str]]:
    """Counts per module and status (equivalent survivors as "equivalent"), survivors, stale equivalents."""
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors, stale = [], []
    for name, status in statuses.items():
        if status == "not checked":   # outside this run's MUTATE filter, or the run was stopped
            continue
        if name in equivalent:
            if status in NOT_CAUGHT:
                status = "equivalent"
            else:
                stale.append(f"{name}: listed as equivalent but {status}")
        counts[module_of(name)][status] += 1
        if status in NOT_CAUGHT:
            survivors.append(f"{name}: {status}")
    # mutmut lists every mutant, checked or not: a name it does not know is left from a removed function
    stale += [f"{name}: listed as equivalent but no such mutant" for name in equivalent if name not in statuses]
    return counts, survivors, stale


def main(argv: list[str]) -> int:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True,
                         text=True, check=True).stdout
    statuses = {m["name"]: m["status"].strip() for m in map(LINE.match, out.splitlines()) if m}
    counts, survivors, stale = tally(statuses, equivalents())
    if not counts:
        print("no mutmut results: run `mutmut run` first")
        return 1
    print(f"{'module':<34} {'caught':>7} {'survived':>9} {'no tests':>9} {'equiv.':>7} {'total':>6} {'kill rate':>10}")
    total = Counter()
    for module in sorted(counts):
        total.update(counts[module])
        _row(module, counts[module])
    _row("all", total)
    print("kill rate = caught / (caught + survived + no tests); equivalent mutants are left out")
    if "--survivors" in argv and survivors:
        print("\n" + "\n".join(sorted(survivors)))
    if stale:
        print("\nstale entries in bench/equivalent_mutants/:\n" + "\n".join(stale))
    return 0


def _row(name: str, c: Counter) -> None:
    caught = sum(c[s] for s in CAUGHT)
    survived = c["survived"] + c["suspicious"]
    counted = caught + survived + c["no tests"]
    rate = f"{100 * caught / counted:.1f}%" if counted else "n/a"
    print(f"{name:<34} {caught:>7} {survived:>9} {c['no tests']:>9} {c['equivalent']:>7} {sum(c.values()):>6} {rate:>10}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
