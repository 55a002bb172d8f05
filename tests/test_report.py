"""The report stage: complete from a complete run, readable in a real browser, strict about gaps."""

import json
import re
import shutil

import pytest
import yaml

from conftest import REPO, dvc, launch_chromium, run, small_params

PARAMS = small_params()
MLP_VARIANTS = list(PARAMS["mlp"]["variants"])
CNN_RUNS = [*PARAMS["cnn"]["experiments"], *PARAMS["cnn"]["ablations"]]
ARTIFACTS = REPO / "test-artifacts"


OUR_COLUMNS = ("our MSE", "our MAE", "our AUC", "our ACC", "MSE", "MAE", "AUC", "ACC")


def table_rows(markdown_text: str) -> list[tuple[str, dict[str, str]]]:
    """Every data row of every markdown table: (first cell, {header: stripped cell})."""
    rows, header = [], None
    for line in markdown_text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(line) <= set("|-: "):
            rows.append((cells[0], dict(zip(header, cells))))
    return rows


def test_the_table_check_sees_a_missing_value():
    table = "| run | our AUC | our ACC |\n|---|---|---|\n| a | 0.910 | n/a |\n"
    assert ("a", "our ACC", "n/a") in [(r[0], k, v) for r in table_rows(table) for k, v in r[1].items()]


def test_report_has_every_section_row_and_figure(pipeline_repo):
    text = (pipeline_repo / "reports/report.md").read_text()
    for heading in ("## Part 1", "## Part 2", "### Table 1", "### Table 2", "## Part 3", "### Table 3",
                    "### Table 4", "### Feature maps", "### Confusion matrices", "### Curves"):
        assert heading in text, heading
    assert "SYNTHETIC DATA" in text and "⚠ synthetic" in text      # part 3 ran on the synthetic set
    assert "Missing results" not in text
    for variant in MLP_VARIANTS:
        assert re.search(rf"^\| mlp@{re.escape(variant)} ", text, re.M), variant
    for name in CNN_RUNS:
        assert re.search(rf"^\| {name} ⚠ synthetic \|", text, re.M), name
    ours = [(row[0], key, value) for row in table_rows(text) for key, value in row[1].items() if key in OUR_COLUMNS]
    assert len(ours) >= 2 * (len(MLP_VARIANTS) + len(CNN_RUNS))
    assert [cell for cell in ours if cell[2] == "n/a"] == []
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) >= 3 + len(MLP_VARIANTS) + 3 * 5 + 1 + len(CNN_RUNS)
    for image in images:
        assert (pipeline_repo / "reports" / image).stat().st_size > 1000, image
    # every table row links its MLflow run
    run_ids = re.findall(r"#/experiments/\d+/runs/([0-9a-f]{32})", text)
    assert len(set(run_ids)) >= len(MLP_VARIANTS) + len(CNN_RUNS) + 1


def test_report_html_renders_in_a_real_browser(pipeline_repo):
    from playwright.sync_api import sync_playwright

    html = pipeline_repo / "reports/report.html"
    text = html.read_text()
    # nothing loaded from the network (the MLflow run links are links, to the UI, not loads)
    assert not re.search(r'src="(https?:)?//', text) and not re.search(r'<link[^>]+href="(https?:)?//', text)
    assert not re.search(r'href="(https?:)?//(?!127\.0\.0\.1:5000/#/experiments/)', text)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(html.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        links = page.evaluate("Array.from(document.links).map(a => a.href).filter(h => h.includes('#/experiments/'))")
        # opened as report.html?mlflow=<address>: every run link points there, decided in the browser
        page.goto(html.as_uri() + "?mlflow=http://ui.example:8080/")
        page.wait_for_load_state("load")
        moved = page.evaluate("Array.from(document.links).map(a => a.href).filter(h => h.includes('#/experiments/'))")
        tables = page.evaluate("Array.from(document.querySelectorAll('table')).map(t => t.rows.length)")
        page.screenshot(path=str(ARTIFACTS / "report_first_screen.png"))
        browser.close()
    assert images and all(ok for _, ok in images), [alt for alt, ok in images if not ok]
    assert links and all(h.startswith("http://127.0.0.1:5000/#/experiments/") for h in links), links
    assert [h.replace("http://ui.example:8080/", "http://127.0.0.1:5000/") for h in moved] == links, moved
    assert len(tables) >= 5 and all(rows >= 2 for rows in tables), tables


def test_dvc_plots_show_draws_every_curve_family(pipeline_repo):
    shown = json.loads(dvc(pipeline_repo, "plots", "show", "--json").stdout)["data"]
    expected = [f"metrics/mlp/curves/{v}.csv" for v in MLP_VARIANTS]
    expected += [f"metrics/cnn/curves/{n}.csv" for n in CNN_RUNS]
    expected += [f"metrics/cnn/confusion/{n}.csv" for n in CNN_RUNS]
    expected += ["metrics/backprop/train_loss.csv", "metrics/backprop/val_accuracy.csv"]
    assert set(expected) <= set(shown), sorted(set(expected) - set(shown))
    assert len(shown) == len(expected)          # each curve file drawn once
    # Each chart names its run; a curve file's series share one chart, every one with several points.
    titles = {path: plot[0]["content"]["title"] for path, plot in shown.items()}
    titles = {path: t["text"] if isinstance(t, dict) else t for path, t in titles.items()}   # vega: str or {text}
    for variant in MLP_VARIANTS:
        assert f"mlp@{variant}:" in titles[f"metrics/mlp/curves/{variant}.csv"]
    for name in CNN_RUNS:
        assert titles[f"metrics/cnn/curves/{name}.csv"].startswith(f"{name}:")
        assert titles[f"metrics/cnn/confusion/{name}.csv"].startswith(f"{name}: test confusion")
        values = shown[f"metrics/cnn/curves/{name}.csv"][0]["content"]["data"]["values"]
        assert len([v for v in values if v["train_loss"] != ""]) >= 4, values   # 6 steps: one point per step
        assert len([v for v in values if v["val_auc"] != ""]) >= 4, values
    assert len(set(titles.values())) == len(titles), titles


@pytest.fixture
def report_workspace(pipeline_repo, tmp_path):
    """The files the report stage reads, copied so a test can remove some."""
    work = tmp_path / "ws"
    for part in ("stages", "pipeline", "metrics", "figures"):
        shutil.copytree(pipeline_repo / part, work / part)
    shutil.copy(pipeline_repo / "params.yaml", work / "params.yaml")
    (work / "metrics/cnn/hflip.json").unlink()
    return work


def test_missing_metrics_fail_by_default_and_name_the_files(report_workspace):
    result = run(["python", "-m", "stages.report"], report_workspace, check=False)
    assert result.returncode == 2 and "metrics/cnn/hflip.json" in result.stderr
    assert "report.allow_missing=true" in result.stderr


def test_missing_metrics_allowed_by_param_build_a_partial_report(report_workspace):
    params = yaml.safe_load((report_workspace / "params.yaml").read_text())
    params["report"]["allow_missing"] = True
    (report_workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["python", "-m", "stages.report"], report_workspace)
    text = (report_workspace / "reports/report.md").read_text()
    assert "Missing results" in text and "metrics/cnn/hflip.json" in text
    assert (report_workspace / "reports/report.html").exists()


def test_run_references_are_links_settled_where_the_report_is_viewed(monkeypatch):
    """Links never depend on the build's environment (a run-cache restore rebuilds nothing): a local
    store links `mlflow ui`'s default address, and report.html?mlflow=<address> repoints them."""
    from pipeline.report.build import Report, VIEW_TIME_LINKS

    run_ = {"run_id": "a" * 32, "ui_path": f"#/experiments/1/runs/{'a' * 32}", "tracking_uri": "sqlite:////x/mlflow.db"}
    monkeypatch.setenv("MLFLOW_UI_URL", "http://elsewhere:1/")   # ignored: the old way baked it in
    assert Report.run_link(run_) == f"[`aaaaaaaa`](http://127.0.0.1:5000/#/experiments/1/runs/{'a' * 32})"
    assert Report.run_link({**run_, "tracking_uri": "https://***@mlflow.lab:5000"}) == \
        f"[`aaaaaaaa`](https://mlflow.lab:5000/#/experiments/1/runs/{'a' * 32})"
    assert "URLSearchParams(location.search).get('mlflow')" in VIEW_TIME_LINKS


def test_a_metrics_file_lacking_a_tables_metric_fails_the_stage_unless_allowed(tmp_path):
    """The stage itself (no pipeline run): details without test_mse are a missing result, named in the error."""
    for part in ("stages", "pipeline"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "metrics/mlp").mkdir(parents=True)
    (tmp_path / "metrics/mlp/default.json").write_text(json.dumps({"default": 0.45}))
    (tmp_path / "metrics/mlp/default.details.json").write_text(json.dumps({"test_mae": 0.44, "test_mse_std": 0.01,
                                                                           "test_mae_std": 0.01}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["python", "-m", "stages.report"], tmp_path, check=False)
    assert result.returncode == 2 and "metrics/mlp/default.details.json (no test_mse)" in result.stderr
    params["report"]["allow_missing"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["python", "-m", "stages.report"], tmp_path)
    text = (tmp_path / "reports/report.md").read_text()
    assert "`metrics/mlp/default.details.json (no test_mse)`" in text and "| mlp@default | 2 / 512 |" in text
