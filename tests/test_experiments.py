"""The experiment layer as a user drives it: queued runs on a fresh clone keep their MLflow runs and
artifacts after DVC's temporary copies are gone, concurrent first writers leave one healthy store,
and a store damaged by older versions is refused with the repair command."""

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import SHARED_DATA, dvc, env, make_repo_copy, run, small_params

QUEUED = {"q-e1-lr1": (1, 0.1), "q-e2-lr1": (2, 0.1), "q-e1-lr2": (1, 0.2), "q-e2-lr2": (2, 0.2)}


@pytest.fixture(scope="module")
def queued_repo(tmp_path_factory):
    """A fresh copy (no mlflow.db yet), four backprop experiments queued and run at -j 4."""
    params = small_params()
    params["backprop"].update(check_window=4)
    repo = make_repo_copy(tmp_path_factory.mktemp("queue"), params)
    # The data stage every experiment shares, once: four workers starting it at once can hit DVC's
    # own run-cache race (tests/test_queue_wait.py). It writes nothing to MLflow.
    dvc(repo, "repro", "download_ett")
    assert not (repo / "mlflow.db").exists()
    for name, (epochs, lr) in QUEUED.items():
        dvc(repo, "exp", "run", "--queue", "-n", name, "-S", f"backprop.epochs={epochs}", "-S", f"backprop.lr={lr}",
            "backprop")
    started = time.time()
    # a 1 s sampling interval so that even these short runs record system metrics
    dvc(repo, "queue", "start", "-j", "4", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=1)
    run([sys.executable, "-m", "pipeline.queue", "wait", "--timeout", "1200"], repo, check=False)   # failures: below
    print(f"4 queued experiments at -j 4: {time.time() - started:.0f} s")
    return repo


def _runs(repo):
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("part1-backprop")
    return client, experiment, {r.data.tags.get("dvc_exp_name"): r for r in client.search_runs([experiment.experiment_id])}


@pytest.mark.slow
def test_concurrent_first_writers_leave_one_healthy_store_with_every_run_finished(queued_repo):
    status = dvc(queued_repo, "queue", "status").stdout
    assert "Failed" not in status, status + dvc(queued_repo, "queue", "logs", next(iter(QUEUED)), check=False).stdout
    client, _, runs = _runs(queued_repo)
    assert set(QUEUED) <= set(runs), list(runs)
    for name, (epochs, lr) in QUEUED.items():
        assert runs[name].info.status == "FINISHED", name
        assert runs[name].data.params["epochs"] == str(epochs) and float(runs[name].data.params["lr"]) == lr
    assert [e.name for e in client.search_experiments()].count("part1-backprop") == 1
    # the store still takes writes
    probe = client.create_run(client.get_experiment_by_name("part1-backprop").experiment_id)
    client.set_terminated(probe.info.run_id)


@pytest.mark.slow
def test_queued_runs_keep_their_artifacts_after_the_temporary_copies_are_gone(queued_repo, tmp_path):
    assert not [p for p in (queued_repo / ".dvc/tmp/exps").glob("tmp*")], "DVC temp copies still present"
    client, experiment, runs = _runs(queued_repo)
    assert experiment.artifact_location == (queued_repo / "mlartifacts/part1-backprop").as_uri()
    for name in QUEUED:
        run_id = runs[name].info.run_id
        assert ".dvc/tmp" not in runs[name].info.artifact_uri
        local = client.download_artifacts(run_id, "figures", str(tmp_path / name))
        assert (tmp_path / name / "figures/loss.png").stat().st_size > 1000, local


@pytest.mark.slow
def test_every_queued_run_records_system_metrics_and_its_dataset(queued_repo):
    _, _, runs = _runs(queued_repo)
    # System metrics are sampled by time (1 s here): a run shorter than that may end before its
    # first sample, so at least one of these few-second runs must have them (the UI test checks a CNN run).
    system = [name for name in QUEUED if {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
              <= set(runs[name].data.metrics)]
    assert system, {name: sorted(runs[name].data.metrics) for name in QUEUED}
    for name in QUEUED:
        (data,) = runs[name].inputs.dataset_inputs
        tags = {t.key: t.value for t in data.tags}
        assert data.dataset.name == "ETTh1" and tags["checksum"].startswith(data.dataset.digest)
        assert int(tags["train_examples"]) > 0 and int(tags["test_examples"]) > 0


def test_an_experiment_with_artifacts_in_a_dvc_temp_folder_is_refused_with_the_repair(tmp_path):
    params = small_params()
    params["backprop"].update(epochs=1, check_window=4)
    repo = make_repo_copy(tmp_path / "repo", params)
    (repo / "data/raw").mkdir(parents=True)
    shutil.copy(SHARED_DATA / "ETTh1.csv", repo / "data/raw/ETTh1.csv")
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("part1-backprop", artifact_location=(repo / ".dvc/tmp/exps/tmpold/mlruns/1").as_uri())

    refused = run([sys.executable, "-m", "stages.backprop"], repo, check=False)
    assert refused.returncode == 2 and ".dvc/tmp/exps/tmpold" in refused.stderr
    assert not (repo / "metrics/backprop.json").exists()
    repair = re.search(r"^\s*(MLFLOW_TRACKING_URI=.*mlflow experiments rename .*)$", refused.stderr, re.M).group(1)
    subprocess.run(repair, shell=True, cwd=repo, env=env(), check=True, capture_output=True, executable="/bin/bash")

    run([sys.executable, "-m", "stages.backprop"], repo)
    experiment = client.get_experiment_by_name("part1-backprop")
    assert experiment.artifact_location == (repo / "mlartifacts/part1-backprop").as_uri()
    (run_,) = client.search_runs([experiment.experiment_id])
    assert [a.path for a in client.list_artifacts(run_.info.run_id, "figures")] == ["figures/loss.png"]


def test_dvc_exp_show_in_200_columns_shows_every_runs_headline(pipeline_repo):
    """What a user sees in a 200-column terminal (DVC pipes the table through `less -S`, which cuts
    each line there): part 1, every MLP variant's test MSE and every CNN's test AUC, each under its
    own column and with the value its headline file holds. Read from the text table itself."""
    from pipeline import params as P, results as R

    params = P.load(pipeline_repo / "params.yaml")
    outs = [R.backprop(), *map(R.mlp, params.mlp_variants()), *map(R.cnn, params.cnn_experiments())]
    assert len(outs) == 14
    table = dvc(pipeline_repo, "exp", "show", COLUMNS=200).stdout.split("\n")
    header = next(line for line in table if line.lstrip().startswith("Experiment"))
    row = next(line for line in table if "[e2e]" in line)
    for out in outs:
        for key, value in json.loads((pipeline_repo / out.headline).read_text()).items():
            match = re.search(rf"(?<=\s){re.escape(key)}(?=\s)", header)
            assert match, f"no column {key!r} in dvc exp show:\n{header}"
            assert match.end() <= 200, f"{key!r} ends at column {match.end()}, past a 200-column terminal:\n{header}"
            # metric columns are right-aligned: the value ends where its header does
            assert row[:match.end()].split()[-1] == f"{value:.5g}", (key, row[:match.end() + 5])
