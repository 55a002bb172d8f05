"""Issue 18 (tracking/outputs side): no secret in any output, full disks and divergence end with one
message and exit 2 with nothing half-written, stale MLflow runs closed, a fresh store's `Default`
experiment outside DVC's temp copies, and two `dvc exp run` at once detected."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, dvc, env, free_port, make_repo_copy, run, small_params, wait_for

PASSWORD = "pl4nted-Passw0rd-xyz"

# A stage-like program under run_stage: its argv[1] says what goes wrong.
FAILING_STAGE = """
import errno, os, resource, sys
from pipeline.runtime import run_stage
from pipeline.outputs import write_json

def main(argv):
    if argv[0] == "diverge":
        raise FloatingPointError("overflow encountered in matmul")
    if argv[0] == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device", "models/x.pt")
    if argv[0] == "write":   # a real write beyond the file size limit: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        write_json("metrics/big.json", {"values": list(range(10_000))})

run_stage(main)
"""


def _stage(tmp_path, what):
    return subprocess.run([sys.executable, "-c", FAILING_STAGE, what], cwd=tmp_path, env=env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("what,words", [("diverge", "diverged"), ("enospc", "disk is full"),
                                        ("write", "disk is full writing metrics/big.json")])
def test_divergence_and_a_full_disk_end_with_one_message_and_exit_2(tmp_path, what, words):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # inherited: EFBIG instead of a core-dumping signal
    try:
        result = _stage(tmp_path, what)
    finally:
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers   # no half-written file, no temp file


def test_redact_removes_uri_passwords_and_secret_env_values(monkeypatch):
    from pipeline.errors import redact

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abcd-secret-key")
    text = f"HTTPConnectionPool: http://user:{PASSWORD}@10.0.0.1:1/api failed; s3 key abcd-secret-key"
    cleaned = redact(text)
    assert PASSWORD not in cleaned and "abcd-secret-key" not in cleaned
    assert "http://***@10.0.0.1:1/api" in cleaned
    assert redact("sqlite:////data/a@b/mlflow.db") == "sqlite:////data/a@b/mlflow.db"


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory):
    params = small_params()
    repo = make_repo_copy(tmp_path_factory.mktemp("safety"), params)
    run([sys.executable, "-m", "stages.download_ett"], repo)
    return repo


def test_a_tracking_password_reaches_no_output_file_log_report_or_store(data_repo):
    """An unreachable server whose URI carries a password: the error texts quote the URI."""
    uri = f"http://mlflow-user:{PASSWORD}@127.0.0.1:{free_port()}/"
    logs = []
    for stage in (["stages.backprop"], ["stages.report"]):
        extra = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        if stage == ["stages.report"]:
            params = yaml.safe_load((data_repo / "params.yaml").read_text())
            params["report"]["allow_missing"] = True
            (data_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        result = run([sys.executable, "-m", *stage], data_repo, **extra)
        logs.append(result.stdout + result.stderr)
    assert "TRACKING FAILED" in logs[0], logs[0]
    assert json.loads((data_repo / "metrics/backprop.run.json").read_text())["tracking_failed"]
    assert (data_repo / "reports/report.md").exists()
    leaks = [str(p.relative_to(data_repo)) for p in data_repo.rglob("*")
             if p.is_file() and not {".git", "tests"} & set(p.parts[len(data_repo.parts):])   # this file holds it
             and PASSWORD.encode() in p.read_bytes()]
    assert leaks == [] and all(PASSWORD not in log for log in logs), (leaks, [l[-2000:] for l in logs])
    assert "***@127.0.0.1" in (data_repo / "metrics/backprop.run.json").read_text()


def test_a_sigkilled_run_is_marked_killed_at_the_next_start_of_its_stage(data_repo):
    client = MlflowClient(tracking_uri=f"sqlite:///{data_repo / 'mlflow.db'}")
    params = yaml.safe_load((data_repo / "params.yaml").read_text())
    original = dict(params["backprop"])
    params["backprop"]["epochs"] = 10_000
    (data_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        process = subprocess.Popen([sys.executable, "-m", "stages.backprop"], cwd=data_repo, env=env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        def started():
            experiment = client.get_experiment_by_name("part1-backprop")
            return experiment and client.search_runs([experiment.experiment_id], f"tags.pid = '{process.pid}'")

        running = wait_for(started, 300, "the stage starting its MLflow run", process=process)
        process.kill()
        process.wait(timeout=60)
        assert client.get_run(running[0].info.run_id).info.status == "RUNNING"   # SIGKILL closes nothing
    finally:
        params["backprop"] = original
        (data_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run([sys.executable, "-m", "stages.backprop"], data_repo)
    assert client.get_run(running[0].info.run_id).info.status == "KILLED"
    assert "marked KILLED" in result.stderr


def test_a_fresh_store_made_from_a_dvc_temp_copy_keeps_default_artifacts_in_the_repository(tmp_path):
    """A queued run's working directory is `.dvc/tmp/exps/tmpX/`; MLflow would root `Default` there."""
    temp_copy = tmp_path / ".dvc/tmp/exps/tmpabc"
    temp_copy.mkdir(parents=True)
    code = ("from pipeline import tracking; import sys; "
            "tracking.prepare_experiment(sys.argv[1], 'part1-backprop')")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    subprocess.run([sys.executable, "-c", code, uri], cwd=temp_copy, env=env(PYTHONPATH=str(REPO)),
                   check=True, timeout=300)
    default = MlflowClient(tracking_uri=uri).get_experiment("0")
    assert "/.dvc/tmp/" not in default.artifact_location, default.artifact_location
    assert default.artifact_location.endswith("/mlartifacts/0")


def test_a_failed_model_upload_leaves_nothing_under_mlartifacts(tmp_path, monkeypatch):
    """A full disk in the middle of a model upload (several files): the ones already copied go too."""
    import torch

    from pipeline import tracking

    monkeypatch.setattr(tracking, "main_repo_root", lambda: tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    import shutil

    from mlflow.store.artifact import local_artifact_repo

    copies = []

    def copy_one_then_fail(local_dir, artifact_dir):   # the first file arrives, then the disk is full
        first = next(p for p in sorted(Path(local_dir).rglob("*")) if p.is_file())
        Path(artifact_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(first, Path(artifact_dir) / first.name)
        copies.append(Path(artifact_dir) / first.name)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local_artifact_repo, "shutil_copytree_without_file_permissions", copy_one_then_fail)
    with tracking.Tracker("backprop", "backprop", "test") as tracker:
        tracker.torch_model(torch.nn.Linear(2, 1), torch.zeros(1, 2).numpy())
    monkeypatch.undo()
    assert tracker.failure and "No space left" in tracker.failure, (tracker.failure, copies)
    left = [str(p.relative_to(tmp_path)) for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()]
    assert left == [], left
    assert copies and "mlartifacts" in str(copies[0])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_two_dvc_exp_runs_at_once_in_one_workspace_fail_loudly_with_the_queue_advice(tmp_path):
    """DVC's race (issue 18.5): the second `dvc exp run` rewrites params.yaml under the first."""
    (tmp_path / "repo").mkdir()
    repo = make_repo_copy(tmp_path / "repo", small_params())
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "exp", "run", "-n", "first",
                              "-S", "backprop.epochs=10000", "backprop"], cwd=repo, env=env(),
                             stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        def training():   # the first run's stage trains
            experiment = client.get_experiment_by_name("part1-backprop") if (repo / "mlflow.db").exists() else None
            return experiment and [r for r in client.search_runs([experiment.experiment_id])
                                   if "val_accuracy" in r.data.metrics]

        wait_for(training, 600, "the first experiment's stage training", process=first, every=1,
                 detail=lambda: (tmp_path / "first.log").read_text()[-3000:])
        # short, whichever way DVC then goes (busy lock, or a run after the first gave up)
        second = dvc(repo, "exp", "run", "-n", "second", "-S", "backprop.lr=0.07", "-S", "backprop.epochs=2",
                     "backprop", check=False, timeout=900)
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    said = (tmp_path / "first.log").read_text()
    assert first.returncode != 0, (said[-3000:], second.stdout + second.stderr)
    assert "changed while this stage ran" in said and "dvc exp run --queue" in said, said[-3000:]
    assert "Traceback" not in said
    assert "first" not in dvc(repo, "exp", "ls", check=False).stdout   # no experiment recorded under wrong params
