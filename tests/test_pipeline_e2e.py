"""The whole pipeline through real DVC and real MLflow, on a throw-away copy with small params."""

import csv
import io
import itertools
import json
import re

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import dvc, make_repo_copy, small_params

MLP_VARIANTS = list(small_params()["mlp"]["variants"])
CNN_RUNS = [*small_params()["cnn"]["experiments"], *small_params()["cnn"]["ablations"]]


def test_every_stage_wrote_its_metrics(pipeline_repo):
    for variant in MLP_VARIANTS:
        metrics = json.loads((pipeline_repo / f"metrics/mlp/{variant}.json").read_text())
        details = json.loads((pipeline_repo / f"metrics/mlp/{variant}.details.json").read_text())
        assert details["n_test_windows"] == 2689          # every stride-1 test window, none dropped
        assert 0 < details["test_mse"] < 2 and 0 < details["test_mae"] < 2
        assert metrics == {variant: details["test_mse"]}  # the headline: one column per variant
    for name in CNN_RUNS:
        metrics = json.loads((pipeline_repo / f"metrics/cnn/{name}.json").read_text())
        details = json.loads((pipeline_repo / f"metrics/cnn/{name}.details.json").read_text())
        assert 0 <= details["test_auc"] <= 1 and 0 <= details["test_acc"] <= 1
        assert metrics == {name: details["test_auc"]}
        timing = json.loads((pipeline_repo / f"metrics/cnn/{name}.timing.json").read_text())
        assert timing["images_per_second"] > 0 and timing["train_seconds"] > 0
        run_info = json.loads((pipeline_repo / f"metrics/cnn/{name}.run.json").read_text())
        assert run_info["data"]["source"] == "synthetic" and run_info["data"]["size"] == 32
        assert run_info["data"]["channels"] == 3 and len(run_info["data"]["sha256"]) == 64
    backprop = json.loads((pipeline_repo / "metrics/backprop.json").read_text())
    details = json.loads((pipeline_repo / "metrics/backprop.details.json").read_text())
    assert details["gradcheck_max_rel_error"] == max(details["fd_max_rel_error"].values()) < 1e-5
    assert backprop == {"backprop": details["test_accuracy"]}


def test_dvc_exp_show_has_every_final_metric(pipeline_repo):
    shown = json.loads(dvc(pipeline_repo, "exp", "show", "--json").stdout)
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    named = [e for e in experiments if e.get("name") == "e2e"]
    assert named, f"experiment e2e not in dvc exp show: {[e.get('name') for e in experiments]}"
    data = named[0]["revs"][0]["data"]
    metric_files = data["metrics"]
    for variant in MLP_VARIANTS:
        assert variant in metric_files[f"metrics/mlp/{variant}.json"]["data"]
    for name in CNN_RUNS:
        assert name in metric_files[f"metrics/cnn/{name}.json"]["data"]
    assert "backprop" in metric_files["metrics/backprop.json"]["data"]
    assert data["params"]["params.yaml"]["data"]["mlp"]["defaults"]["hidden"] == 32


def test_mlflow_store_has_runs_params_metric_steps_and_artifacts(pipeline_repo):
    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_repo / 'mlflow.db'}")
    experiments = {e.name: e for e in client.search_experiments()}
    assert {"part1-backprop", "part2-forecasting", "part3-classification"} <= set(experiments)

    runs = client.search_runs([experiments["part2-forecasting"].experiment_id])
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert {f"mlp@{v}" for v in MLP_VARIANTS} <= set(by_stage)
    run = by_stage["mlp@default"]
    assert run.info.status == "FINISHED"
    assert run.data.params["hidden"] == "32" and run.data.tags["dvc_exp_name"] == "e2e"
    assert run.data.tags["data_source"] == "ETTh1 (real)"
    history = client.get_metric_history(run.info.run_id, "valid_loss")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/prediction_good.png", "figures/prediction_median.png", "figures/prediction_bad.png"} <= artifacts

    cnn_runs = {r.data.tags["stage"]: r for r in client.search_runs([experiments["part3-classification"].experiment_id])}
    assert set(CNN_RUNS) <= set(cnn_runs)
    resnet = cnn_runs["resnet18"]
    assert resnet.data.tags["data_source"].endswith("(synthetic)")
    assert len(client.get_metric_history(resnet.info.run_id, "val_auc")) >= 2


def test_logged_model_loads_back_and_predicts(pipeline_repo):
    import mlflow
    import numpy as np

    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_repo / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{pipeline_repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("part3-classification")
    run = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags["stage"] == "resnet18"][0]
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    model = mlflow.pytorch.load_model(models[0].model_uri)
    out = model(__import__("torch").zeros(2, 3, 32, 32))
    assert tuple(out.shape) == (2, 9) and np.isfinite(out.detach().numpy()).all()


def test_second_repro_runs_nothing(pipeline_repo):
    out = dvc(pipeline_repo, "repro").stdout
    # only `inputs` (always_changed: it re-hashes the inputs outside DVC's view, and they are unchanged)
    assert re.findall(r"Running stage '([^']+)'", out) == ["inputs"], out


def test_changing_one_variant_reruns_only_it_and_the_report(pipeline_repo):
    params_path = pipeline_repo / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["mlp"]["variants"]["lr_div5"]["lr"] = 0.3
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        stale = set(json.loads(dvc(pipeline_repo, "status", "--json").stdout)) - {"inputs"}   # always_changed
        assert stale == {"mlp@lr_div5", "report"}, stale
    finally:
        params_path.write_text(original)


EXP_SHOW_FIXED = ["Experiment", "rev", "typ", "Created", "parent", "State", "Executor"]


def _metric_columns(repo) -> list[str]:
    header = next(csv.reader(io.StringIO(dvc(repo, "exp", "show", "--csv", "--no-pager").stdout)))
    assert header[0] == "Experiment", header
    # After the fixed columns (the CSV leaves out empty ones) come the metrics, then the params
    # (dotted keys), then the deps (paths).
    columns = [c for c in header if c not in EXP_SHOW_FIXED]
    return list(itertools.takewhile(lambda c: "." not in c and "/" not in c, columns))


def _results(repo, *names) -> dict:
    return {n: (repo / n).read_bytes() for n in names}


@pytest.mark.slow
def test_returning_to_a_param_set_restores_from_the_run_cache_and_exp_show_leads_with_the_headline(tmp_path):
    """A, B, A: the third run is restored by DVC (no training) with the same results, for the MLP
    and the CNN stage; the epoch checkpoint is gone after each success; `dvc exp show` opens on
    the headline metrics."""
    repo = make_repo_copy(tmp_path, small_params())
    stages = ["backprop", "mlp@default", "cnn@resnet18"]
    # No residual: in two small epochs the residual MLP may keep its ridge base at either lr.
    a = ["-S", "mlp.defaults.lr=0.4", "-S", "mlp.defaults.residual=none", "-S", "cnn.defaults.lr=0.002"]
    b = ["-S", "mlp.defaults.lr=2.0", "-S", "mlp.defaults.residual=none", "-S", "cnn.defaults.lr=0.001"]
    files = ["metrics/mlp/default.json", "metrics/mlp/default.run.json", "metrics/mlp/curves/default.csv",
             "metrics/cnn/resnet18.json", "metrics/cnn/resnet18.details.json", "metrics/cnn/resnet18.run.json",
             "metrics/cnn/curves/resnet18.csv", "models/cnn/resnet18.pt", "models/mlp/default.npz"]

    first = dvc(repo, "exp", "run", *a, *stages, TQDM_DISABLE=1)
    assert "mlp@default: test MSE" in first.stdout and "resnet18: test AUC" in first.stdout
    results_a = _results(repo, *files)
    checkpoints = repo / ".dvc/tmp/checkpoints"
    assert not list(checkpoints.rglob("*.pt")), "the epoch checkpoint outlived a successful stage"

    columns = _metric_columns(repo)
    # Headline first: part 1, then the MLP variant's test MSE, then the CNN's test AUC, keyed by run.
    assert columns == ["backprop", "default", "resnet18"], columns
    assert not {"run_id", "train_seconds", "images_per_second", "best_val_auc", "fd_threshold"} & set(columns)

    second = dvc(repo, "exp", "run", *b, "mlp@default", "cnn@resnet18", TQDM_DISABLE=1)
    assert "mlp@default: test MSE" in second.stdout and "resnet18: test AUC" in second.stdout
    assert _results(repo, "metrics/mlp/default.json")["metrics/mlp/default.json"] != results_a["metrics/mlp/default.json"]

    third = dvc(repo, "exp", "run", *a, "mlp@default", "cnn@resnet18", TQDM_DISABLE=1)
    out = third.stdout + third.stderr
    assert "Stage 'mlp@default' is cached - skipping run" in out, out
    assert "Stage 'cnn@resnet18' is cached - skipping run" in out, out
    assert "test MSE" not in out and "test AUC" not in out        # nothing trained
    assert _results(repo, *files) == results_a                    # restored: the same bytes


def test_captured_output_shows_epoch_lines_and_a_projected_time_per_cnn_stage(pipeline_repo):
    log = (pipeline_repo.parent / "dvc_exp_run.log").read_text()
    assert "\r" not in log                                   # captured: plain lines, no bar redraws
    for variant in MLP_VARIANTS:
        assert re.search(rf"mlp@{variant} \[\w+, seed \d+\] epoch 1/2  train_loss [\d.]+  valid_loss [\d.]+", log), variant
    for name in CNN_RUNS:
        family = "ablation" if name in small_params()["cnn"]["ablations"] else "cnn"
        assert re.search(rf"projected: .+ for {family}@{name} on cpu", log), name
        assert re.search(rf"{family}@{name} epoch 1/1  train_loss [\d.]+  val_auc [\d.]+  val_acc [\d.]+  lr ", log), name
