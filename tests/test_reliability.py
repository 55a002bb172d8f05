"""Guarantees: deterministic results, exact DVC dependencies, safe interruption, concurrent
experiments, no secrets in tracking, safe loading."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, VENV_BIN, dvc, env, make_repo_copy, run, small_params, wait_for

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())


def stage_groups() -> dict[str, dict]:
    """Stage (or matrix family) name -> its definition."""
    return dict(DVC_YAML["stages"])


def imported_project_files(module: str) -> set[str]:
    code = ("import importlib, sys; importlib.import_module(%r); "
            "print('\\n'.join(m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)))" % module)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = set()
    for line in out.split():
        path = Path(line).resolve()
        if path.is_relative_to(REPO) and path.name != "__init__.py" and path.parts[len(REPO.parts)] in ("pipeline", "stages"):
            files.add(str(path.relative_to(REPO)))
    return files


@pytest.mark.parametrize("group", list(stage_groups()))
def test_code_deps_are_exactly_the_modules_each_stage_imports(group):
    spec = stage_groups()[group]
    module = re.match(r"python -m (\S+)", spec["cmd"]).group(1)
    declared = {d for d in spec["deps"] if isinstance(d, str) and d.endswith(".py")}
    assert declared == imported_project_files(module), group
    for dep in spec["deps"]:
        if dep.startswith("pipeline/") and not dep.endswith(".py"):
            assert (REPO / dep).exists(), dep


def _stale(repo) -> set[str]:
    """Stale stage families, without `inputs` (always_changed: DVC lists it every time by design)."""
    return {name.split("@")[0] for name in json.loads(dvc(repo, "status", "--json").stdout)} - {"inputs"}


def test_touching_each_module_makes_exactly_its_users_stale(pipeline_repo):
    users: dict[str, set[str]] = {}
    for group, spec in stage_groups().items():
        for dep in spec["deps"]:
            if dep.startswith(("pipeline/", "stages/")):
                users.setdefault(dep, set()).add(group)
    assert _stale(pipeline_repo) == set()
    for path, expected in sorted(users.items()):
        target = pipeline_repo / path
        original = target.read_bytes()
        try:
            target.write_bytes(original + b"\n# touched by a test\n")
            assert _stale(pipeline_repo) == expected - {"inputs"}, path
        finally:
            target.write_bytes(original)


PARAM_USERS = [
    ("backprop.lr", 0.2, {"backprop"}),
    ("mlp.defaults.hidden", 40, {"mlp", "report"}),   # the report reads the variants' merged configs
    ("mlp.variants.h1024.hidden", 50, {"mlp", "report"}),
    ("cnn.defaults.lr", 0.002, {"cnn", "ablation", "report"}),   # the report reads the merged configs (pretrained)
    ("cnn.ablations.hflip.lr", 0.002, {"ablation", "report"}),
    ("features.channel", 1, {"features"}),
    ("report.allow_missing", True, {"report"}),
    ("data.images.synthetic_val", 63, {"download_images"}),
    ("base.seed", 7, {"backprop", "mlp", "cnn", "ablation"}),
]


@pytest.mark.parametrize("key,value,expected", PARAM_USERS, ids=[p[0] for p in PARAM_USERS])
def test_changing_a_param_makes_exactly_its_readers_stale(pipeline_repo, key, value, expected):
    path = pipeline_repo / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    node = params
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    try:
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert _stale(pipeline_repo) == expected
    finally:
        path.write_text(original)


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory, local_densenet_weights):
    """A small-params copy with both datasets in place, for running stages directly."""
    params = small_params()
    params["mlp"]["defaults"]["epochs"] = 1
    params["cnn"]["defaults"].update(epochs=2)
    repo = make_repo_copy(tmp_path_factory.mktemp("data_repo"), params)
    run([sys.executable, "-m", "stages.download_ett"], repo)
    run([sys.executable, "-m", "stages.download_images"], repo)
    return repo


@pytest.mark.parametrize("stage,outputs", [
    (["stages.backprop"], ["metrics/backprop.json"]),
    (["stages.mlp", "default"], ["metrics/mlp/default.json", "metrics/mlp/curves/default.csv"]),
    (["stages.cnn", "rotation_hflip"], ["metrics/cnn/rotation_hflip.json", "metrics/cnn/curves/rotation_hflip.csv",
                                        "metrics/cnn/confusion/rotation_hflip.csv"]),
])
def test_same_params_and_seed_give_bit_identical_results(data_repo, stage, outputs):
    contents = []
    for _ in range(2):
        run([sys.executable, "-m", *stage], data_repo)
        contents.append([(data_repo / o).read_bytes() for o in outputs])
    assert contents[0] == contents[1]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_stage_fails_keeps_nothing_and_marks_the_run_killed(data_repo, signum):
    name = "resnet18"
    checkpoints = data_repo / ".dvc/tmp/checkpoints" / name   # outside DVC's view, named by fingerprint
    for leftover in (f"metrics/cnn/{name}.json", f"models/cnn/{name}.pt", *checkpoints.glob("*.pt")):
        (data_repo / leftover).unlink(missing_ok=True)
    params = yaml.safe_load((data_repo / "params.yaml").read_text())
    params["cnn"]["defaults"]["epochs"] = 3       # the signal comes right after epoch 1's checkpoint
    (data_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        process = subprocess.Popen([sys.executable, "-m", "stages.cnn", name], cwd=data_repo, env=env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # a finished checkpoint, not the temporary file of one being written
        wait_for(lambda: [c for c in checkpoints.glob("*.pt") if not c.name.startswith("tmp.")], 300,
                 "epoch 1's checkpoint", process=process, every=0.2)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode != 0 and "interrupted" in stderr
        assert not (data_repo / f"metrics/cnn/{name}.json").exists()
        assert not (data_repo / f"models/cnn/{name}.pt").exists()
        client = MlflowClient(tracking_uri=f"sqlite:///{data_repo / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("part3-classification")
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
        assert runs[0].data.tags["stage"] == name and runs[0].info.status == "KILLED"
        # the epoch checkpoint lets a rerun continue where it stopped
        resumed = run([sys.executable, "-m", "stages.cnn", name], data_repo, PIPELINE_RESUME="1")
        assert re.search(r"resuming from .* after epoch [12]", resumed.stdout), resumed.stdout
        assert (data_repo / f"metrics/cnn/{name}.json").exists()
    finally:
        params["cnn"]["defaults"].update(epochs=2)
        (data_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_no_secret_from_the_environment_reaches_mlflow(data_repo):
    secret = "s3cr3t-value-that-must-not-leak"
    run([sys.executable, "-m", "stages.mlp", "lr_div5"], data_repo, AWS_SECRET_ACCESS_KEY=secret,
        MLFLOW_TRACKING_PASSWORD=secret)
    client = MlflowClient(tracking_uri=f"sqlite:///{data_repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("part2-forecasting")
    for r in client.search_runs([experiment.experiment_id]):
        assert secret not in json.dumps([r.data.params, r.data.tags])
    assert secret not in (data_repo / "metrics/mlp/lr_div5.run.json").read_text()


def test_weights_and_checkpoints_are_loaded_weights_only():
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("stages/*.py")]:
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, (path, call)


def test_every_server_command_in_the_readme_binds_localhost():
    readme = (REPO / "README.md").read_text()
    servers = [line for line in readme.splitlines() if re.search(r"\bmlflow (ui|server)\s+--", line)]
    assert servers and all("--host 127.0.0.1" in line for line in servers)


@pytest.mark.slow
def test_two_queued_experiments_run_at_once_and_both_land_in_the_store(pipeline_repo):
    for lr in (0.15, 0.25):
        dvc(pipeline_repo, "exp", "run", "--queue", "-S", f"backprop.lr={lr}", "-n", f"queued-{lr}")
    dvc(pipeline_repo, "queue", "start", "-j", "2")
    def finished():
        status = dvc(pipeline_repo, "queue", "status").stdout
        return status if "Queued" not in status and "Running" not in status else None

    status = wait_for(finished, 900, "DVC's queue running both experiments to the end", every=5)
    assert "Failed" not in status, status + dvc(pipeline_repo, "queue", "logs", "queued-0.15", check=False).stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("part1-backprop")
    runs = {r.data.tags.get("dvc_exp_name"): r for r in client.search_runs([experiment.experiment_id])}
    for name, lr in (("queued-0.15", "0.15"), ("queued-0.25", "0.25")):
        assert name in runs, list(runs)
        assert runs[name].info.status == "FINISHED" and runs[name].data.params["lr"] == lr
        assert "test_accuracy" in runs[name].data.metrics
    shown = json.loads(dvc(pipeline_repo, "exp", "show", "--json").stdout)
    names = {e.get("name") for rev in shown for e in (rev.get("experiments") or [])}
    assert {"queued-0.15", "queued-0.25"} <= names


# -- interruption at chosen points (no timing: the stage signals itself, or it cannot finish) ----------

INTERRUPT_WHILE_WRITING = """
import os, signal, sys
import numpy as np
from pipeline.outputs import atomic_path, write_json
from pipeline.runtime import run_stage

def main(argv):
    target, how = argv
    with atomic_path(target, suffix=".npz" if target.endswith(".npz") else ".tmp") as tmp:
        if target.endswith(".npz"):
            np.savez(tmp, x=np.zeros(1000))
        else:
            tmp.write_text('{"half": ')
        os.kill(os.getpid(), getattr(signal, how))   # the signal arrives mid-write
        signal.pause()

run_stage(main)
"""


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if ".git" not in p.parts and (p.name.startswith("tmp.") or p.name.endswith((".partial", ".tmp"))))


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("target", ["metrics/x.json", "models/x.npz"])
def test_a_signal_during_an_output_write_keeps_the_previous_file_and_no_temp_file(tmp_path, target, how):
    (tmp_path / target).parent.mkdir(parents=True)
    (tmp_path / target).write_bytes(b"previous")
    process = subprocess.run([sys.executable, "-c", INTERRUPT_WHILE_WRITING, target, how], cwd=tmp_path,
                             env=env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert process.returncode == 130 and "interrupted" in process.stderr, process.stderr
    assert (tmp_path / target).read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stage_started_from_a_shell_that_ignores_sigint_still_stops_cleanly(data_repo, signum):
    """`trap "" INT` makes the stage inherit SIG_IGN; run_stage must still turn SIGINT into a clean stop."""
    outputs = ["metrics/backprop.json", "metrics/backprop.run.json", "metrics/backprop/train_loss.csv"]
    if not all((data_repo / o).exists() for o in outputs):
        run([sys.executable, "-m", "stages.backprop"], data_repo)   # the previous, complete outputs
    before = {o: (data_repo / o).read_bytes() for o in outputs}
    params_path = data_repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["backprop"]["epochs"] = 10_000                            # cannot finish before the signal
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    client = MlflowClient(tracking_uri=f"sqlite:///{data_repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("part1-backprop")
    known = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    process = None
    try:
        process = subprocess.Popen(["bash", "-c", f'trap "" INT; exec "{sys.executable}" -m stages.backprop'],
                                   cwd=data_repo, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        new = wait_for(lambda: [r for r in client.search_runs([experiment.experiment_id])
                                if r.info.run_id not in known and "val_accuracy" in r.data.metrics],
                       300, "the stage's MLflow run logging training", process=process)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        params_path.write_text(original)
        if process is not None and process.poll() is None:
            process.kill()
    assert process.returncode == 130 and "interrupted" in stderr, stderr
    assert {o: (data_repo / o).read_bytes() for o in outputs} == before
    assert client.get_run(new[0].info.run_id).info.status == "KILLED"
    assert _leftovers(data_repo) == []


def test_make_works_in_a_folder_whose_path_has_a_space(tmp_path):
    repo = make_repo_copy(tmp_path / "dir with space")
    (repo / ".venv").symlink_to(Path(VENV_BIN).parent)
    # -o: treat the venv stamp as up to date (never reinstall the shared venv from a test)
    result = subprocess.run(["make", "-o", ".venv/.installed", "params"], cwd=repo, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_outputs_get_the_usual_permissions_and_secrets_only_their_owners(tmp_path):
    from pipeline.outputs import write_text

    write_text(tmp_path / "metrics.json", "{}")
    write_text(tmp_path / "pgpass", "secret", mode=0o600)   # libpq ignores a group-readable pgpass
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert (tmp_path / "pgpass").stat().st_mode & 0o777 == 0o600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
