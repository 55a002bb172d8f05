"""Team services for real: PostgreSQL (Debian), SeaweedFS (its wheel's `weed`) as the S3 store and
`mlflow server` over both with basic auth, started and stopped by `python -m team.services`.

A small pipeline in clone A logs to the server and pushes to the DVC remote on the same store;
clone B pulls and has nothing to re-run; an experiment pushed from A shows up in B."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, dvc, env as stage_env, pushed_pipeline, require, run

try:
    from team.services import ServiceError, alive, postgres_bin
    postgres_bin()
    SKIP = ""
except ServiceError as error:
    SKIP = f"PostgreSQL cannot be used here ({error}; `make test` installs Debian's postgresql)"


@pytest.fixture(scope="module", autouse=True)
def _postgres():
    require(SKIP)

PASSWORD = "team-test-admin-password"
PY = sys.executable


@pytest.fixture(scope="module")
def services():
    # Under /tmp, not pytest's 0700 folder: PostgreSQL runs as the `postgres` user when we are root.
    root = Path(tempfile.mkdtemp(prefix="team-services-"))
    try:
        out = run([PY, "-m", "team.services", "start", "--auth", "--dir", str(root)], REPO, timeout=600,
                  MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD).stdout
        exports = dict(line[len("export "):].split("=", 1) for line in out.splitlines() if line.startswith("export "))
        state = json.loads((root / "services.json").read_text())
        assert run([PY, "-m", "team.services", "env", "--dir", str(root)], REPO).stdout == out
        client_env = {**exports, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
        yield {"root": root, "env": client_env, "state": state}
    finally:
        run([PY, "-m", "team.services", "stop", "--dir", str(root)], REPO, check=False, timeout=300)
        shutil.rmtree(root, ignore_errors=True)
    assert not any(alive(pid) for pid in state["pids"].values()), f"still running after stop: {state['pids']}"


def s3_keys(services, prefix: str) -> list[str]:
    import boto3

    env = services["env"]
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    keys, token = [], {}
    while True:
        page = s3.list_objects_v2(Bucket="team", Prefix=prefix, **token)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = {"ContinuationToken": page["NextContinuationToken"]}


def mlflow_client(services):
    import os

    from mlflow import MlflowClient

    for key, value in services["env"].items():
        if key.startswith("MLFLOW_"):
            os.environ[key] = value
    return MlflowClient(services["env"]["MLFLOW_TRACKING_URI"])


def test_services_bound_to_localhost(services):
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    pids = set(services["state"]["pids"].values())
    ours = [line for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids)]
    assert ours, out
    assert all(line.split()[3].startswith("127.0.0.1:") for line in ours), ours


def test_every_file_holding_a_secret_is_readable_by_its_owner_only(services):
    """services.json holds the S3 secret key; credentials, pgpass, the S3 config hold the rest."""
    creds = json.loads((services["root"] / "credentials.json").read_text())
    secrets = [v.encode() for v in creds.values() if isinstance(v, str) and len(v) >= 8]
    holders = {}
    for path in services["root"].rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(s in data for s in secrets):
                holders[str(path.relative_to(services["root"]))] = oct(path.stat().st_mode & 0o777)
    assert "services.json" in holders and "credentials.json" in holders, holders
    assert {p: m for p, m in holders.items() if m != "0o600"} == {}, holders


def test_wrong_password_refused(services):
    url = services["env"]["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"

    def status(password: str | None) -> int:
        request = urllib.request.Request(url)
        if password is not None:
            token = base64.b64encode(f"admin:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert status("wrong-password") == 401
    assert status(None) == 401
    assert status(PASSWORD) == 200


WRITER = textwrap.dedent("""
    import sys, mlflow
    i, experiment_id = int(sys.argv[1]), sys.argv[2]
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"writer{i}", tags={"writer": str(i)}):
        mlflow.log_params({"writer": i, "lr": 0.01 * (i + 1)})
        for step in range(10):
            mlflow.log_metric("loss", 1.0 / (step + 1) + i, step=step)
        mlflow.log_text(f"writer {i}", "notes/writer.txt")
""")


def test_eight_concurrent_writers(services, tmp_path):
    client = mlflow_client(services)
    experiment_id = client.create_experiment("concurrent-writers")
    procs = [subprocess.Popen([PY, "-c", WRITER, str(i), experiment_id], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=stage_env(**services["env"]))
             for i in range(8)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, "\n".join(o[-1500:] for o in outputs)

    runs = client.search_runs([experiment_id], max_results=100)
    assert sorted(r.data.tags["writer"] for r in runs) == [str(i) for i in range(8)]
    for r in runs:
        i = int(r.data.tags["writer"])
        assert r.info.status == "FINISHED"
        assert r.data.params == {"writer": str(i), "lr": str(0.01 * (i + 1))}
        history = client.get_metric_history(r.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(10))
        assert [a.path for a in client.list_artifacts(r.info.run_id, "notes")] == ["notes/writer.txt"]
    assert len([k for k in s3_keys(services, f"mlflow/{experiment_id}/") if k.endswith("notes/writer.txt")]) == 8


# -- one pipeline, two clones, one shared store -------------------------------------------------------
@pytest.fixture(scope="module")
def clone_a(services, tmp_path_factory):
    """Clone A: a small pipeline run against the team server, committed and pushed to a bare origin."""
    return pushed_pipeline(tmp_path_factory.mktemp("clones"), "backprop", services["env"])


def test_stage_logs_to_server(services, clone_a):
    info = json.loads((clone_a["repo"] / "metrics/backprop.run.json").read_text())
    assert info["tracking_failed"] == "" and info["tracking_uri"] == services["env"]["MLFLOW_TRACKING_URI"]
    client = mlflow_client(services)
    run_ = client.get_run(info["run_id"])
    assert run_.info.status == "FINISHED" and run_.data.tags["stage"] == "backprop"
    assert run_.data.params["epochs"] == "2"
    steps = [m.step for m in client.get_metric_history(run_.info.run_id, "val_accuracy")]
    assert sorted(steps) == [0, 1, 2], steps   # before training, then after each of the 2 epochs
    assert len(client.get_metric_history(run_.info.run_id, "train_loss")) > 2
    assert [a.path for a in client.list_artifacts(run_.info.run_id, "figures")] == ["figures/loss.png"]
    local = client.download_artifacts(run_.info.run_id, "figures/loss.png", str(clone_a["base"]))
    assert Path(local).read_bytes()[:4] == b"\x89PNG"
    key = f"mlflow/{info['experiment_id']}/{info['run_id']}/artifacts/figures/loss.png"
    assert key in s3_keys(services, f"mlflow/{info['experiment_id']}/{info['run_id']}/")


def test_dvc_remote_two_clones(services, clone_a):
    env = services["env"]
    assert [k for k in s3_keys(services, "dvc/") if "/runs/" in k], "the run-cache was not pushed"
    b = clone_a["base"] / "b"
    subprocess.run(["git", "clone", "-q", "-b", "main", str(clone_a["origin"]), str(b)], check=True)
    # Clone B keeps the endpoint in its own untracked .dvc/config.local instead of the environment.
    dvc(b, "remote", "modify", "--local", "team", "endpointurl", env["AWS_ENDPOINT_URL"])
    creds = {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    dvc(b, "pull", "--run-cache", "--with-deps", "backprop", timeout=300, **creds)
    assert (b / "data/raw/ETTh1.csv").read_bytes() == (clone_a["repo"] / "data/raw/ETTh1.csv").read_bytes()
    assert (b / "figures/backprop/loss.png").exists()
    repro = dvc(b, "repro", "backprop", timeout=300, **creds)
    # Only `inputs` runs (always_changed: it re-hashes the user's own files); its records are the pulled ones.
    assert re.findall(r"Running stage '([^']+)'", repro.stdout) == ["inputs"], repro.stdout
    assert "is cached - skipping run" not in repro.stdout, repro.stdout
    assert "config.local" not in subprocess.run(["git", "ls-files", ".dvc"], cwd=b, capture_output=True,
                                                text=True).stdout

    # An experiment made in A, pushed, pulled into B.
    a = clone_a["repo"]
    dvc(a, "exp", "run", "-n", "lr005", "-S", "backprop.lr=0.05", "backprop", timeout=600, **env)
    dvc(a, "exp", "push", "origin", "lr005", timeout=300, **env)
    dvc(b, "exp", "pull", "origin", "lr005", timeout=300, **creds)
    shown = json.loads(dvc(b, "exp", "show", "--json", **creds).stdout)
    names = [rev.get("name") for commit in shown for group in (commit.get("experiments") or [])
             for rev in (group.get("revs") or [])]
    assert "lr005" in names, json.dumps(shown)[:3000]
