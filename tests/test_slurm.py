"""Slurm for real: munged, slurmctld and slurmd (Debian's packages) started on 127.0.0.1 in a temp
folder by `team.slurm cluster_start`, stopped by PID.

Two Slurm tasks are two "nodes" of one torchrun rendezvous training the CNN stage; sweeps of the
backprop stage run as array jobs against the team services (team/services.py), and come back
into a second clone's `dvc exp show` and the MLflow server; a resubmission runs only what is
missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, dvc, make_repo_copy, pushed_pipeline, require, run, small_params, wait_for
from pipeline.models import cnn
from team import slurm
from team.services import alive

PY = sys.executable


def _missing() -> str:
    for program in ("sbatch", "munged", "slurmctld", "slurmd"):
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
            return f"Slurm is not installed ({program} missing; `make slurm` installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "the local Slurm cluster's slurmd must run as root"
    return ""


@pytest.fixture(scope="module")
def cluster():
    require(_missing())
    root = Path(tempfile.mkdtemp(prefix="slurm-cluster-"))
    state = slurm.cluster_start(root)
    try:
        yield {"SLURM_CONF": state["conf"]}
    finally:
        slurm.cluster_stop(root)
        shutil.rmtree(root, ignore_errors=True)
    assert not any(alive(pid) for pid in state["pids"].values()), state["pids"]


def test_cluster_runs_an_array_job(cluster, tmp_path):
    run(["sbatch", "--wait", "--array=0-2", f"--output={tmp_path}/%a.out", "--wrap", "echo task $SLURM_ARRAY_TASK_ID"],
        tmp_path, timeout=300, **cluster)
    assert [(tmp_path / f"{i}.out").read_text().strip() for i in range(3)] == ["task 0", "task 1", "task 2"]


# -- one model on two "nodes" ------------------------------------------------------------------------
@pytest.mark.slow
def test_two_slurm_tasks_as_two_torchrun_nodes_end_with_the_weights_of_one_process(cluster, tmp_path):
    from test_distributed import UPDATE_TOLERANCE

    params = small_params()
    params["data"]["images"].update(size=16, synthetic_train=64, synthetic_val=27, synthetic_test=27)
    params["cnn"]["defaults"].update(epochs=1, batch_size=16, max_steps_per_epoch=2, log_every=1000)
    repo = make_repo_copy(tmp_path / "repo", params)
    run([PY, "-m", "stages.download_images"], repo)
    run([PY, "-m", "stages.cnn", "resnet18"], repo, timeout=600, OMP_NUM_THREADS=1)
    one = torch.load(repo / "models/cnn/resnet18.pt", weights_only=True)
    params["cnn"]["defaults"]["devices"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = tmp_path / "ddp.out"
    result = run(["sbatch", "--wait", "--ntasks=2", "--cpus-per-task=1", f"--output={log}", "--wrap",
                  f"{PY} -m stages.cnn resnet18"], repo, check=False, timeout=900, OMP_NUM_THREADS=1, **cluster)
    text = log.read_text() if log.exists() else ""
    assert result.returncode == 0, text[-4000:] + result.stderr
    assert "--nnodes=2" in text and "--nproc-per-node=1" in text and "--rdzv-backend=c10d" in text, text[-3000:]
    two = torch.load(repo / "models/cnn/resnet18.pt", weights_only=True)
    torch.manual_seed(params["base"]["seed"])
    start = cnn.build("resnet18", 9).state_dict()
    keys = [k for k in start if start[k].is_floating_point()]
    update_one = torch.cat([(one[k] - start[k]).flatten() for k in keys])
    update_two = torch.cat([(two[k] - start[k]).flatten() for k in keys])
    relative = ((update_two - update_one).norm() / update_one.norm()).item()
    print(f"2 Slurm tasks vs 1 process: relative update difference {relative:.2e}")
    assert update_one.norm() > 0 and relative < UPDATE_TOLERANCE


# -- sweeps -------------------------------------------------------------------------------------------
def test_the_grid_is_dvcs_and_names_are_deterministic_and_distinct():
    points = slurm.grid(["backprop.lr=choice(0.01,0.05)", "backprop.epochs=range(1,3)"])
    assert points == [["backprop.lr=0.01", "backprop.epochs=1"], ["backprop.lr=0.01", "backprop.epochs=2"],
                      ["backprop.lr=0.05", "backprop.epochs=1"], ["backprop.lr=0.05", "backprop.epochs=2"]]
    assert slurm.grid(["backprop.lr=0.1,0.2"]) == [["backprop.lr=0.1"], ["backprop.lr=0.2"]]
    names = [slurm.point_name("s", "c0ffee", p) for p in points]
    assert len(set(names)) == 4 and names == [slurm.point_name("s", "c0ffee", p) for p in points]
    assert slurm.point_name("s", "c0ffee", ["a=1", "b=2"]) == slurm.point_name("s", "c0ffee", ["b=2", "a=1"])
    assert slurm.point_name("s", "beef", points[0]) != names[0]   # another commit: another experiment


def test_a_commit_the_remote_lacks_is_refused_with_the_way_out(tmp_path):
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    repo = make_repo_copy(tmp_path / "repo")
    subprocess.run(["git", "remote", "add", "origin", str(origin)], cwd=repo, check=True)
    result = run([PY, "-m", "team.slurm", "sweep", "-S", "backprop.lr=0.1,0.2", "backprop"], repo, check=False,
                 PYTHONPATH=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not on the git remote 'origin'" in result.stderr and "git push origin HEAD" in result.stderr


@pytest.fixture(scope="module")
def services():
    root = Path(tempfile.mkdtemp(prefix="slurm-services-"))
    try:
        out = run([PY, "-m", "team.services", "start", "--dir", str(root)], REPO, timeout=600).stdout
        yield dict(line[len("export "):].split("=", 1) for line in out.splitlines() if line.startswith("export "))
    finally:
        run([PY, "-m", "team.services", "stop", "--dir", str(root)], REPO, check=False, timeout=300)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def origin_repo(services, tmp_path_factory):
    return pushed_pipeline(tmp_path_factory.mktemp("sweep"), "download_ett", services)


def sweep(repo: Path, folder: Path, env: dict, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([PY, "-m", "team.slurm", "sweep", "--dir", str(folder), "--time", "00:30:00", *extra, "backprop"],
               repo, check=check, timeout=1800, PYTHONPATH=REPO, **env)


def pushed_lines(report: str) -> int:
    return sum(line.endswith("  pushed") for line in report.splitlines())


def exp_names(clone: Path, env: dict) -> set[str]:
    shown = json.loads(dvc(clone, "exp", "show", "--json", **env).stdout)
    return {rev.get("name") for commit in shown for group in (commit.get("experiments") or [])
            for rev in (group.get("revs") or [])}


@pytest.mark.slow
def test_a_sweep_with_a_cancelled_task_reruns_only_it_and_lands_whole_in_dvc_and_mlflow(cluster, services, origin_repo,
                                                                                      monkeypatch):
    """One three-point sweep, one of its tasks cancelled mid-run: status names it, the resubmission
    runs only it, then a second clone's `dvc exp show` and the MLflow server hold all three points,
    and a third submission runs nothing (one sweep for all of it: each task is a whole clone + exp run)."""
    env = {**cluster, **services}
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])   # for squeue from this process
    repo, folder = origin_repo["repo"], origin_repo["base"] / "sweep-lr"
    grid = ["-S", "backprop.lr=choice(0.01,0.05,0.1)"]
    out = sweep(repo, folder, env, *grid).stdout
    assert "3 to run" in out, out
    job = out.split("submitted array job ")[1].split()[0]
    victim = f"{job}_1"
    log = folder / "logs" / f"{victim}.out"
    # The task is under way (its clone is made and `dvc exp run` has started), then cancelled.
    wait_for(lambda: log.exists() and "exp run" in log.read_text(), 900, f"task {victim} starting `dvc exp run`")
    run(["scancel", victim], repo, **env)
    wait_for(lambda: not slurm.queued([job]), 900, f"array job {job} leaving the queue", every=2)
    status = run([PY, "-m", "team.slurm", "status", str(folder)], repo, check=False, PYTHONPATH=REPO, **env)
    lines = status.stdout.splitlines()
    assert status.returncode == 1 and len(lines) == 3, status.stdout + status.stderr
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == 1 and "backprop.lr=0.05" in failed[0] and str(log) in failed[0], status.stdout
    killed = failed[0].split()[0]
    assert killed not in slurm.pushed_names(str(origin_repo["origin"]))   # nothing half-pushed

    started = time.monotonic()
    again = sweep(repo, folder, env, "--wait", *grid).stdout
    print(f"resubmitted task on Slurm: {time.monotonic() - started:.0f}s\n{again}")
    assert "1 to run" in again and "(1 task(s))" in again and pushed_lines(again) == 3, again
    names = {line.split()[0] for line in again.splitlines() if line.endswith(" pushed")}

    clone = origin_repo["base"] / "b"
    subprocess.run(["git", "clone", "-q", "-b", "main", str(origin_repo["origin"]), str(clone)], check=True)
    dvc(clone, "exp", "pull", "origin", *names, timeout=600, **env)
    assert names <= exp_names(clone, env)

    from mlflow import MlflowClient

    client = MlflowClient(services["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("stage") == "backprop" and r.info.status == "FINISHED"]
    assert sorted(float(r.data.params["lr"]) for r in runs) == [0.01, 0.05, 0.1]
    for r in runs:
        assert "val_accuracy" in r.data.metrics
        assert [a.path for a in client.list_artifacts(r.info.run_id, "figures")] == ["figures/loss.png"]

    third = sweep(repo, folder, env, "--wait", *grid).stdout
    assert "0 to run" in third and "submitted" not in third, third
