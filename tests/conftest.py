"""Shared test machinery: small params (shrunk configs, same code), throw-away repository copies,
and one end-to-end `dvc exp run` of the whole pipeline that several tests inspect."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SHARED_DATA") or REPO.parent / "shared" / "data").resolve()
VENV_BIN = str(Path(sys.executable).parent)
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def small_params() -> dict:
    """The repository's params.yaml, shrunk: tiny synthetic PathMNIST, 1 epoch, small MLPs."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data"]["images"].update(source="synthetic", size=32, synthetic_train=180, synthetic_val=54,
                                  synthetic_test=54)
    p["backprop"].update(epochs=2)
    p["mlp"]["defaults"].update(epochs=2, hidden=32, seeds=2)
    p["mlp"]["variants"]["h1024"] = {"hidden": 48}
    p["mlp"]["variants"]["h2048"] = {"hidden": 64}
    p["mlp"]["variants"]["assignment"]["epochs"] = 2   # it pins the assignment's 10 epochs
    p["cnn"]["defaults"].update(epochs=1, batch_size=32, eval_batch_size=64, log_every=2)
    p["cnn"]["experiments"]["finetune"]["epochs"] = 1
    return p


def env(**extra) -> dict:
    """Environment for stage subprocesses: the venv first on PATH, the shared data as mirror."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    e["PATH"] = VENV_BIN + os.pathsep + e.get("PATH", "")
    e["DATA_MIRROR"] = str(SHARED_DATA)
    e["PYTHONUNBUFFERED"] = "1"
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900, **extra_env) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
                             f"stderr:\n{result.stderr[-4000:]}")
    return result


def make_repo_copy(dest: Path, params: dict | None = None) -> Path:
    """A git repository holding the working tree's project files (tracked and new, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        src = REPO / name
        if src.is_file() and not name.startswith(("metrics/", "dvc.lock")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    if params is not None:
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*GIT, "commit", "-qm", "test copy"], cwd=dest, check=True)
    return dest


PIPELINE_TIMEOUT = 3600   # the whole small pipeline took 21+ min on a loaded 2-core machine (2026-12-02)


def pytest_collection_modifyitems(items):
    """A test that builds the session pipeline may spend its whole `dvc exp run` in its setup:
    it gets that run's time limit on top of pytest.ini's per-test one, and is slow (so
    `-m "not slow"` never builds the pipeline)."""
    for item in items:
        if "pipeline_repo" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(PIPELINE_TIMEOUT + 1200))
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def local_densenet_weights(tmp_path_factory) -> Path:
    """A locally saved DenseNet121 state dict, standing in for the ImageNet download offline."""
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "densenet121_imagenet.pt"
    torch.save(torchvision.models.densenet121().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory, local_densenet_weights) -> Path:
    """A throw-away copy of the project after `dvc exp run -n e2e` with small params."""
    params = small_params()
    params["cnn"]["experiments"]["finetune"]["weights_file"] = str(local_densenet_weights)
    repo = make_repo_copy(tmp_path_factory.mktemp("e2e"), params)
    # System metrics every second: the tiny stages finish in seconds (the UI test reads them).
    result = run([str(Path(VENV_BIN) / "dvc"), "exp", "run", "-n", "e2e"], repo, timeout=PIPELINE_TIMEOUT,
                 MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=1)
    (repo.parent / "dvc_exp_run.log").write_text(result.stdout + result.stderr)   # what a user saw
    return repo


def dvc(repo: Path, *args, **kw) -> subprocess.CompletedProcess:
    return run([str(Path(VENV_BIN) / "dvc"), *args], repo, **kw)


def wait_for(ready, timeout: float, what: str, process: subprocess.Popen | None = None, every: float = 0.5,
             detail=None):
    """Poll `ready()` until it gives something truthy and return that. Fails loudly, naming `what`,
    when `timeout` seconds pass or `process` exits first: no polling loop carries on silently. The
    failure ends with the tail of what an exited `process` printed to its pipes, or `detail()`."""
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode} first\n{_exited_output(process, detail)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still not so after {timeout:.0f} s\n{detail() if detail else ''}")
        time.sleep(every)


def _exited_output(process: subprocess.Popen, detail) -> str:
    if detail:
        return detail()
    output = [t.decode(errors="replace") if isinstance(t, bytes) else t for t in process.communicate(timeout=60)]
    return "\n".join(text for text in output if text)[-3000:]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def serving(cmd: list[str], port: int, what: str, timeout: float = 300, cwd: Path | None = None):
    """A server process (e.g. `mlflow server`/`mlflow ui`) until its port answers; stopped by PID.
    300 s: gunicorn took over 120 s to answer on a loaded 2-core machine."""
    server = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: port_open(port), timeout, f"{what} on port {port}", process=server)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def tiny_dvc_repo(path: Path, files: dict[str, str]) -> Path:
    """A git + DVC repository of a few files (a dvc.yaml of its own): for tests of DVC's machinery."""
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    run(["git", "init", "-q"], path)
    dvc(path, "init", "-q")
    run(["git", "add", "-A"], path)
    run([*GIT, "commit", "-qm", "tiny"], path)
    return path


def pushed_pipeline(base: Path, stage: str, services_env: dict) -> dict:
    """A small pipeline in `base/a` after `dvc repro <stage>` against the team services, committed
    and pushed: git to a bare `base/origin.git`, data and run-cache to the team S3 store."""
    origin = base / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    params = small_params()
    params["backprop"].update(epochs=2, stride=16)
    repo = make_repo_copy(base / "a", params)
    subprocess.run(["git", "remote", "add", "origin", str(origin)], cwd=repo, check=True)
    # The remote's URL is committed; its endpoint and credentials come from the environment.
    dvc(repo, "remote", "add", "-d", "team", "s3://team/dvc")
    dvc(repo, "repro", stage, timeout=600, **services_env)
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", f"{stage} on the team services"], cwd=repo, check=True)
    subprocess.run(["git", "push", "-q", "origin", "HEAD:main"], cwd=repo, check=True)
    dvc(repo, "push", timeout=300, **services_env)
    dvc(repo, "push", "--run-cache", timeout=300, **services_env)
    return {"repo": repo, "origin": origin, "base": base}


def require(missing: str) -> None:
    """The one skip for a missing tool or service (Slurm, PostgreSQL, chromium): a skip that names
    it and what installs it; under CI, where `make test` installs them all, a failure instead."""
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_chromium(playwright):
    """Debian's chromium under Playwright, with no background network (this machine has none)."""
    chromium = shutil.which("chromium")
    require("" if chromium else "chromium is not installed (`make test` installs Debian's chromium)")
    return playwright.chromium.launch(executable_path=chromium, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])
