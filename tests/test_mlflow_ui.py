"""The MLflow UI, in a real browser, on the store the end-to-end pipeline run wrote: a CNN run's
System metrics tab shows CPU and memory series (MLflow's own system-metrics logging)."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, VENV_BIN, free_port, launch_chromium, serving

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture
def mlflow_ui(pipeline_repo):
    """`mlflow ui` as the README starts it, on the e2e store, stopped by PID."""
    port = free_port()
    with serving([str(Path(VENV_BIN) / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{pipeline_repo / 'mlflow.db'}",
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], port, "mlflow ui",
                 cwd=pipeline_repo) as url:
        yield url


def test_system_metrics_tab_of_a_cnn_run_shows_cpu_and_memory(pipeline_repo, mlflow_ui):
    from playwright.sync_api import sync_playwright

    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("part3-classification")
    run_ = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags["stage"] == "resnet18")
    metrics = set(run_.data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= metrics, metrics

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{run_.info.run_id}/system-metrics")
        for series in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            page.get_by_text(series).first.wait_for(timeout=60_000)   # the chart's title
        page.screenshot(path=str(ARTIFACTS / "mlflow_system_metrics.png"))
        browser.close()
