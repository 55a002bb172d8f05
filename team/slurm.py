"""Sweeps and multi-node training on a Slurm cluster.

    python -m team.slurm sweep -S 'backprop.lr=choice(0.01,0.05)' [--gpus-per-task 1] ... [STAGE...]
    python -m team.slurm status DIR          # pushed / queued / failed (with its log), per point
    python -m team.slurm cluster start|stop  # a one-machine Slurm for trying it (and for the tests)

`sweep` expands the `-S` grid exactly as `dvc exp run --queue` does (DVC's own Hydra parser:
`choice()`, `range()`, comma lists), names every point after its overrides and the commit, and
submits the points that have no pushed experiment yet as one `sbatch --array` job. Each array
task (`python -m team.slurm task DIR`) clones the shared git remote at that commit, pulls the
inputs and the run-cache from the DVC remote, runs `dvc exp run -n <name>`, then pushes the
results to the DVC remote first and the experiment's git ref last: a point counts as done only
when its ref is on the git remote, so a task killed at any moment leaves nothing half-pushed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.errors import DataError
from team.services import alive, free_ports, stop_pid, wait_until

BIN = Path(sys.executable).parent
CLUSTER_DIR = Path(os.environ.get("SLURM_CLUSTER_DIR", "/tmp/pipeline-slurm"))


# -- a one-machine cluster: munged, slurmctld, slurmd on 127.0.0.1, stopped by PID -----------------
def cluster_conf(root: Path, cpus: int, ports: list[int]) -> str:
    host = socket.gethostname()
    return f"""ClusterName=pipeline
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/d
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=10
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def cluster_start(root: Path = CLUSTER_DIR) -> dict:
    """Start a one-node cluster in `root`; the environment its clients need (SLURM_CONF)."""
    root = root.resolve()
    for program in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
            raise DataError(f"Slurm is not installed ({program} is missing): `make slurm` installs Debian's "
                            "slurm-wlm and munge")
    if os.geteuid() != 0:
        raise DataError("the local Slurm cluster runs its daemons as root (slurmd must); run it as root "
                        "or use your site's cluster")
    state_path = root / "cluster.json"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if all(alive(pid) for pid in state["pids"].values()):
            return state
        cluster_stop(root)
    for sub in ("munge", "ctld", "d"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key = root / "munge/munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text(cluster_conf(root, os.cpu_count() or 1, free_ports(2)))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    state = {"dir": str(root), "conf": str(conf), "pids": {}}
    try:
        subprocess.run(["/usr/sbin/munged", f"--key-file={key}", f"--socket={root}/munge/munge.socket",
                        f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge/munged.log",
                        f"--seed-file={root}/munge/munged.seed", "--force"], check=True, capture_output=True)
        state["pids"]["munged"] = _written_pid(root / "munge/munged.pid", root / "munge/munged.log")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([f"/usr/sbin/{daemon}", "-f", str(conf)], check=True, capture_output=True, env=env)
            state["pids"][daemon] = _written_pid(root / f"{daemon}.pid", root / f"{daemon}.log")
        (root / "cluster.json").write_text(json.dumps(state))

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            return out.strip() in ("idle", "mix", "alloc")
        wait_until(idle, "slurmd (node idle in sinfo)", root / "slurmd.log", timeout=120)
    except BaseException:
        (root / "cluster.json").write_text(json.dumps(state))
        cluster_stop(root)
        raise
    return state


def _written_pid(pid_file: Path, log: Path) -> int:
    """A forked daemon creates its pid file before it writes the number: wait for the number."""
    wait_until(lambda: pid_file.read_text().strip().isdigit(), pid_file.stem, log, timeout=60)
    return int(pid_file.read_text())


def cluster_stop(root: Path = CLUSTER_DIR) -> bool:
    state_path = root / "cluster.json"
    if not state_path.exists():
        return False
    state = json.loads(state_path.read_text())
    for name in ("slurmd", "slurmctld", "munged"):
        if name in state["pids"]:
            stop_pid(state["pids"][name], signal.SIGTERM)
    state_path.unlink()
    return True


# -- the sweep -------------------------------------------------------------------------------------
def git(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def grid(overrides: list[str]) -> list[list[str]]:
    """The points of a `-S` grid, each a list of plain `-S` values, as `dvc exp run --queue` expands it."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps

    if not overrides:
        return [[]]
    points = get_hydra_sweeps(to_path_overrides(overrides))
    return [[o if path == "params.yaml" else f"{path}:{o}" for path, values in point.items() for o in values]
            for point in points]


def point_name(prefix: str, commit: str, overrides: list[str]) -> str:
    """The same point of the same commit always gets the same name; different points never share one."""
    digest = hashlib.sha1("\n".join([commit, *sorted(overrides)]).encode()).hexdigest()[:10]
    return f"{prefix}-{digest}"


def pushed_names(remote: str) -> set[str]:
    """Experiments whose git ref is on the remote (refs/exps/<baseline>/<name>): the finished points."""
    refs = git("ls-remote", remote, "refs/exps/*").splitlines()
    return {line.split("\t")[1].rsplit("/", 1)[1] for line in refs if "\t" in line}


def queued(job_ids: list[str]) -> dict[str, str]:
    """`<job>_<index>` -> Slurm state, for the array tasks of these jobs still pending or running."""
    if not job_ids:
        return {}
    result = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %T"],
                            capture_output=True, text=True)
    return dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)


def submissions(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("submit-*.json"), key=lambda p: int(p.stem[7:]))]


def report(folder: Path) -> tuple[list[str], list[str]]:
    """One line per point, and the names of the points that failed (no pushed result, not queued)."""
    subs = submissions(folder)
    if not subs:
        raise DataError(f"no sweep was submitted from {folder}: python -m team.slurm sweep ... --dir {folder}")
    done = pushed_names(subs[-1]["remote"])
    states = queued([s["job_id"] for s in subs if s.get("job_id")])
    latest = {}
    for sub in subs:   # a point's latest submission is the one that counts
        for index, point in enumerate(sub["points"]):
            latest[point["name"]] = (sub, index, point)
    lines, failed = [], []
    for name, (sub, index, point) in latest.items():
        task = f"{sub.get('job_id')}_{index}"
        log = folder / "logs" / f"{task}.out"
        if name in done:
            state = "pushed"
        elif task in states:
            state = states[task].lower()
        else:
            state = f"FAILED (no pushed result; log {log})"
            failed.append(name)
        lines.append(f"{name}  {' '.join(point['overrides']) or '(params.yaml)'}  {state}")
    return lines, failed


def sweep(args: argparse.Namespace) -> int:
    repo = Path(git("rev-parse", "--show-toplevel"))
    commit = git("rev-parse", args.rev, cwd=repo)
    remote = git("remote", "get-url", args.remote, cwd=repo)
    git("fetch", "-q", args.remote, cwd=repo)
    if not git("branch", "-r", "--contains", commit, cwd=repo):
        raise DataError(f"commit {commit[:12]} is not on the git remote {args.remote!r}, so the tasks cannot check "
                        f"it out: git push {args.remote} HEAD, then submit again")
    points = [{"name": point_name(args.prefix, commit, o), "overrides": o} for o in grid(args.set_param)]
    folder = (args.dir or Path.home() / "pipeline-sweeps" / point_name(args.prefix, commit, args.set_param)).resolve()
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    subs = submissions(folder)
    active = {p["name"] for s in subs for i, p in enumerate(s["points"])
              if f"{s.get('job_id')}_{i}" in queued([s["job_id"]] if s.get("job_id") else [])}
    done = pushed_names(remote)
    todo = [p for p in points if p["name"] not in done and p["name"] not in active]
    print(f"sweep of {len(points)} point(s) at {commit[:12]}: {len(points) - len(todo)} pushed or queued already, "
          f"{len(todo)} to run; logs in {folder / 'logs'}", flush=True)
    if todo:
        manifest = folder / f"submit-{len(subs)}.json"
        sub = {"commit": commit, "remote": remote, "targets": args.targets, "folder": str(folder), "points": todo}
        manifest.write_text(json.dumps(sub, indent=1))
        command = ["sbatch", "--parsable", f"--array=0-{len(todo) - 1}", f"--job-name={args.prefix}",
                   f"--output={folder / 'logs'}/%A_%a.out", f"--chdir={Path(__file__).resolve().parents[1]}",
                   f"--cpus-per-task={args.cpus_per_task}", f"--time={args.time}"]
        if args.gpus_per_task:
            command.append(f"--gres=gpu:{args.gpus_per_task}")   # Slurm sets CUDA_VISIBLE_DEVICES per task
        if args.ntasks > 1:   # one experiment on several nodes: each task a torchrun node
            command += [f"--ntasks={args.ntasks}", f"--nodes={args.nodes or args.ntasks}"]
        command += [*args.sbatch, "--wait"] if args.wait else list(args.sbatch)
        command += ["--wrap", shlex.join([sys.executable, "-m", "team.slurm", "task", str(manifest)])]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        job_id = process.stdout.readline().strip().split(";")[0]   # --parsable: printed at submission
        sub["job_id"] = job_id
        manifest.write_text(json.dumps(sub, indent=1))
        print(f"submitted array job {job_id} ({len(todo)} task(s))", flush=True)
        process.wait()
        if not args.wait:
            return 0
    lines, failed = report(folder)
    print("\n".join(lines))
    if failed:
        print(f"{len(failed)} point(s) failed or were cancelled; submitting the same sweep again runs only them",
              file=sys.stderr)
    return 1 if failed else 0


def task(manifest: Path) -> int:
    """One array task: one point, from a clean clone to a pushed experiment (ref last)."""
    sub = json.loads(manifest.read_text())
    point = sub["points"][int(os.environ["SLURM_ARRAY_TASK_ID"])]
    name, remote = point["name"], sub["remote"]
    print(f"task {os.environ.get('SLURM_ARRAY_JOB_ID')}_{os.environ['SLURM_ARRAY_TASK_ID']}: {name} "
          f"{' '.join(point['overrides'])} on {socket.gethostname()}", flush=True)
    if name in pushed_names(remote):
        print(f"{name} is already pushed: nothing to do")
        return 0
    work = Path(sub["folder"]) / "work" / f"{name}-{os.environ.get('SLURM_JOB_ID', os.getpid())}"
    shutil.rmtree(work, ignore_errors=True)
    dvc = [str(BIN / "dvc")]

    def step(*cmd: str, cwd: Path = work) -> None:
        print("+", shlex.join(cmd), flush=True)
        subprocess.run(cmd, cwd=cwd, check=True)

    step("git", "clone", "-q", "--no-checkout", remote, str(work), cwd=Path(sub["folder"]))
    step("git", "checkout", "-q", "--detach", sub["commit"])
    step(*dvc, "pull", "--run-cache", "--allow-missing")
    sets = [a for o in point["overrides"] for a in ("-S", o)]
    step(*dvc, "exp", "run", "-n", name, *sets, *sub["targets"])
    step(*dvc, "push", "--run-cache")   # data first ...
    step(*dvc, "exp", "push", "--no-cache", "origin", name)   # ... the ref last: one atomic git push
    shutil.rmtree(work, ignore_errors=True)
    print(f"{name}: pushed", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m team.slurm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="submit a -S grid as one sbatch --array job")
    s.add_argument("-S", "--set-param", action="append", default=[], help="as dvc exp run -S (grids allowed)")
    s.add_argument("targets", nargs="*", help="stages for dvc exp run (default: all)")
    s.add_argument("--remote", default="origin", help="the shared git remote (default origin)")
    s.add_argument("--rev", default="HEAD", help="the commit to run (must be on the remote)")
    s.add_argument("--prefix", default="sweep", help="experiment names are <prefix>-<hash of commit and point>")
    s.add_argument("--dir", type=Path, help="manifests and logs, on a filesystem the nodes share "
                   "(default ~/pipeline-sweeps/<prefix>-<hash>)")
    s.add_argument("--gpus-per-task", type=int, default=0, help="GPUs per experiment (sbatch --gres=gpu:N)")
    s.add_argument("--cpus-per-task", type=int, default=1)
    s.add_argument("--time", default="04:00:00", help="time limit per experiment (sbatch --time)")
    s.add_argument("--ntasks", type=int, default=1, help="Slurm tasks per experiment: >1 trains one model on "
                   "several nodes (torchrun per task, cnn.defaults.devices processes in all)")
    s.add_argument("--nodes", type=int, help="nodes per experiment (default: --ntasks)")
    s.add_argument("--wait", action="store_true", help="return when every task has ended, with the report")
    s.add_argument("--sbatch", action="append", default=[], help="one more sbatch option, e.g. --sbatch=--partition=gpu")
    st = sub.add_parser("status", help="per point: pushed, queued/running, or failed with its log")
    st.add_argument("dir", type=Path)
    t = sub.add_parser("task", help="(run by sbatch) one array task")
    t.add_argument("manifest", type=Path)
    c = sub.add_parser("cluster", help="a one-machine Slurm (munged, slurmctld, slurmd) in --dir")
    c.add_argument("action", choices=["start", "stop"])
    c.add_argument("--dir", type=Path, default=CLUSTER_DIR)
    args = parser.parse_args(argv)
    try:
        if args.command == "sweep":
            return sweep(args)
        if args.command == "status":
            lines, failed = report(args.dir.resolve())
            print("\n".join(lines))
            return 1 if failed else 0
        if args.command == "task":
            return task(args.manifest)
        if args.action == "start":
            print(f"export SLURM_CONF={cluster_start(args.dir)['conf']}")
        else:
            print("stopped" if cluster_stop(args.dir.resolve()) else "nothing running", file=sys.stderr)
        return 0
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        print(f"error: {shlex.join(map(str, error.cmd))} exited with {error.returncode}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
