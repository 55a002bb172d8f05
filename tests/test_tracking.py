"""Tracking against a real MLflow server, and a stage's behaviour when the server is down."""

import itertools
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import SHARED_DATA, VENV_BIN, dvc, free_port, make_repo_copy, run, serving, small_params
from pipeline.paths import main_repo_root
from pipeline.tracking import GIT_COMMIT_TAG, _redact


@pytest.fixture
def backprop_repo(tmp_path):
    params = small_params()
    params["backprop"].update(epochs=1, check_window=4)
    repo = make_repo_copy(tmp_path / "repo", params)
    (repo / "data/raw").mkdir(parents=True)
    shutil.copy(SHARED_DATA / "ETTh1.csv", repo / "data/raw/ETTh1.csv")
    return repo


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    with serving([str(Path(VENV_BIN) / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                  "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                  "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"], port,
                 "mlflow server") as uri:
        yield uri


def test_stage_logs_to_a_real_mlflow_server(backprop_repo, mlflow_server):
    run([sys.executable, "-m", "stages.backprop"], backprop_repo, MLFLOW_TRACKING_URI=mlflow_server,
        MLFLOW_HTTP_REQUEST_TIMEOUT=60)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("part1-backprop")
    (run_,) = client.search_runs([experiment.experiment_id])
    assert run_.info.status == "FINISHED" and run_.data.tags["stage"] == "backprop"
    assert "gradcheck_fd_theta1" in run_.data.metrics and "test_accuracy" in run_.data.metrics
    assert [a.path for a in client.list_artifacts(run_.info.run_id, "figures")] == ["figures/loss.png"]
    assert not (backprop_repo / "mlflow.db").exists()     # nothing went to the local store
    info = json.loads((backprop_repo / "metrics/backprop.run.json").read_text())
    assert info["run_id"] == run_.info.run_id and info["tracking_uri"] == mlflow_server


def test_runs_carry_mlflows_own_git_commit_also_from_a_temporary_dvc_experiment(backprop_repo):
    # MLflow's git context (not this project's code) tags the commit; a queued run goes through the
    # same temporary copy as --temp, a separate git repository checked out at the baseline commit
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=backprop_repo, capture_output=True, text=True,
                          check=True).stdout.strip()
    run([sys.executable, "-m", "stages.backprop"], backprop_repo)
    dvc(backprop_repo, "exp", "run", "--temp", "-n", "tagged", "-S", "backprop.lr=0.2", "backprop", timeout=900)
    client = MlflowClient(tracking_uri=f"sqlite:///{backprop_repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("part1-backprop").experiment_id])
    assert sorted(r.data.tags["dvc_exp_name"] for r in runs) == ["", "tagged"]
    for run_ in runs:
        assert run_.info.status == "FINISHED"
        assert run_.data.tags[GIT_COMMIT_TAG] == head and "git_commit" not in run_.data.tags
    assert ".dvc/tmp/exps/" in next(r for r in runs if r.data.tags["dvc_exp_name"]).data.tags["mlflow.source.name"]
    info = json.loads((backprop_repo / "metrics/backprop.run.json").read_text())
    assert info["git_commit"] == head


@pytest.fixture
def flaky_server(mlflow_server):
    """The real server behind a proxy that answers every other request with 503 (a server under load)."""
    counter, failed = itertools.count(), []

    class Handler(BaseHTTPRequestHandler):
        def forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if next(counter) % 2 == 0:
                failed.append(self.path)
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "content-length")}
            request = urllib.request.Request(mlflow_server + self.path, data=body if body else None,
                                             method=self.command, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, reply_headers, data = response.status, response.headers, response.read()
            except urllib.error.HTTPError as error:
                status, reply_headers, data = error.code, error.headers, error.read()
            self.send_response(status)
            for k, v in reply_headers.items():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        def log_message(self, *args):
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{proxy.server_address[1]}", failed
    proxy.shutdown()


def test_brief_server_errors_are_retried_and_the_run_is_complete(backprop_repo, flaky_server):
    uri, failed = flaky_server
    result = run([sys.executable, "-m", "stages.backprop"], backprop_repo, MLFLOW_TRACKING_URI=uri)
    assert "TRACKING FAILED" not in result.stderr, result.stderr[-3000:]
    assert len(failed) > 10                                   # the server really did fail, often
    client = MlflowClient(tracking_uri=uri)
    (run_,) = client.search_runs([client.get_experiment_by_name("part1-backprop").experiment_id])
    assert run_.info.status == "FINISHED" and "test_accuracy" in run_.data.metrics
    assert [a.path for a in client.list_artifacts(run_.info.run_id, "figures")] == ["figures/loss.png"]


def test_server_down_stage_still_finishes_and_says_so(backprop_repo):
    dead = f"http://127.0.0.1:{free_port()}"     # nothing listens there
    started = time.time()
    result = run([sys.executable, "-m", "stages.backprop"], backprop_repo, timeout=300, MLFLOW_TRACKING_URI=dead)
    assert "MLflow TRACKING FAILED" in result.stderr and dead in result.stderr
    metrics = json.loads((backprop_repo / "metrics/backprop.json").read_text())
    assert metrics["backprop"] > 0
    info = json.loads((backprop_repo / "metrics/backprop.run.json").read_text())
    assert info["run_id"] == "" and info["tracking_failed"]
    print(f"stage with a dead tracking server took {time.time() - started:.1f}s")


def test_store_path_is_the_outer_repository_for_temporary_experiment_copies(tmp_path):
    inner = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    inner.mkdir(parents=True)
    assert main_repo_root(inner) == tmp_path / "project"
    assert main_repo_root(tmp_path / "project") == tmp_path / "project"


def test_credentials_never_reach_written_files():
    assert _redact("https://user:secret@mlflow.example/") == "https://***@mlflow.example/"
    assert _redact("http://user:p@ss@mlflow.example:5000/x?y=1") == "http://***@mlflow.example:5000/x?y=1"
    assert _redact("sqlite:////x/mlflow.db") == "sqlite:////x/mlflow.db"
    assert _redact("sqlite:////home/a@b/mlflow.db") == "sqlite:////home/a@b/mlflow.db"   # a path, not a login
