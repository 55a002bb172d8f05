"""Claims about the report's helpers and its non-table parts: number formatting (mean ± std, signed
deltas), the MLflow links (never a login in them), the row marks, part 1's gradient table, the figures
each section draws from which file (figures.curves is replaced by a recorder: no rendering), the
header, and the self-contained HTML (tables kept, images inlined)."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path

import numpy as np
import pytest

from pipeline.report import build
from test_report_claims import _lines_after, _ran_on, _read, _with, _write, workspace  # noqa: F401 (a fixture)


# -- formatting ------------------------------------------------------------------------------------

def test_fmt_rounds_to_four_digits_by_default_and_says_n_a_for_none():
    assert build._fmt(0.123456) == "0.1235" and build._fmt(0) == "0.0000"
    assert build._fmt(2.26, 1) == "2.3" and build._fmt(1234.6, 0) == "1235"
    assert build._fmt(None) == "n/a" and build._fmt(None, 1) == "n/a"


def test_diff_is_ours_minus_reference_signed():
    assert build._diff(0.5, 0.2) == "+0.3000" and build._diff(0.2, 0.5) == "-0.3000"
    assert build._diff(0.987, 0.985, 3) == "+0.002"
    assert build._diff(None, 0.5) == "n/a" and build._diff(0.5, None) == "n/a"


def test_spread_is_mean_plus_minus_std_in_two_significant_digits_or_the_mean_alone():
    assert build._spread(0.44853, 0.00861) == "0.4485 ± 0.0086"
    assert build._spread(0.44853, 0.000321) == "0.4485 ± 0.00032"       # a small spread keeps its digits
    assert build._spread(1.26, 0.04, 1) == "1.3 ± 0.04"
    assert build._spread(0.44853, None) == "0.4485" and build._spread(None, 0.1) == "n/a"


def test_fmt_gives_a_small_number_significant_digits_not_zeros():
    assert build._fmt(0.00032) == "0.00032" and build._fmt(-0.0000123) == "-1.2e-05"
    assert build._fmt(0.01) == "0.0100" and build._fmt(0.0) == "0.0000"
    assert build._fmt(0.009) == "0.009"                          # below 10^-(digits-2): significant digits
    assert build._fmt(0.000123456, 5) == "0.000123"              # digits - 2 of them


def test_read_csv_turns_empty_and_short_cells_into_nan(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("step,loss,val\n1,0.5,\n2,,3\n3,0.25\n")
    data = build._read_csv(path)
    assert list(data) == ["step", "loss", "val"]
    np.testing.assert_array_equal(data["step"], [1.0, 2.0, 3.0])
    assert data["step"].dtype == np.float64                      # an all-integer column too
    np.testing.assert_array_equal(data["loss"], [0.5, np.nan, 0.25])
    np.testing.assert_array_equal(data["val"], [np.nan, 3.0, np.nan])
    path.write_text("epoch,train_loss\n1,0.5\n")                        # a one-epoch curve
    assert {k: v.tolist() for k, v in build._read_csv(path).items()} == {"epoch": [1.0], "train_loss": [0.5]}


def test_img_copies_the_figure_next_to_the_report_and_links_it_relatively(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.png").write_bytes(b"first")
    Path("b.png").write_bytes(b"second")
    assert build._img(Path("a.png"), "x.png") == "img/x.png"
    assert build._img(Path("b.png"), "y.png") == "img/y.png"      # the folder exists already: fine
    assert (tmp_path / "reports/img/x.png").read_bytes() == b"first"
    assert (tmp_path / "reports/img/y.png").read_bytes() == b"second"


# -- names, links, marks ---------------------------------------------------------------------------

def test_data_label_spells_a_runs_data_from_its_fields():
    assert build.data_label({"name": "ETTh1", "title": "ETTh1", "source": "real"}) == "ETTh1 (real)"
    assert build.data_label({"name": "chestmnist", "title": "ChestMNIST", "source": "synthetic", "size": 28}) == \
        "ChestMNIST 28px (synthetic)"
    assert build.data_label({}) == ""
    assert build.data_label({"name": "my_series", "source": "file"}) == "my_series (file)"   # no title: the name
    assert build.data_label({"size": 28}) == "? 28px (?)"       # what a field-less record still says


def test_ui_address_is_an_http_tracking_server_else_mlflow_uis_default_and_never_a_login(monkeypatch):
    monkeypatch.setenv("MLFLOW_UI_URL", "http://me:***@ui.example:8080/")   # the environment plays no part
    assert build.ui_address("http://host:5000/") == "http://host:5000"
    assert build.ui_address("https://user:secret@host/mlflow/") == "https://host/mlflow"
    assert build.ui_address("sqlite:///mlflow.db") == build.DEFAULT_UI == "http://127.0.0.1:5000"
    assert build.ui_address("file:///tmp/mlruns") == build.ui_address("") == build.DEFAULT_UI
    assert build.ui_address("http://ui.example/MLX/") == "http://ui.example/MLX"    # only the slash goes


def test_run_link_links_the_run_or_says_why_there_is_none():
    run = {"run_id": "abcdef0123456789", "ui_path": "#/experiments/1/runs/abcdef0123456789"}
    assert build.Report.run_link({**run, "tracking_uri": "http://h:5000/"}) == \
        "[`abcdef01`](http://h:5000/#/experiments/1/runs/abcdef0123456789)"
    assert build.Report.run_link({**run, "tracking_uri": "sqlite:///mlflow.db"}) == build.Report.run_link(run) == \
        "[`abcdef01`](http://127.0.0.1:5000/#/experiments/1/runs/abcdef0123456789)"
    assert build.Report.run_link({}) == "no MLflow run"
    assert build.Report.run_link({"tracking_failed": "server down"}) == "no MLflow run (server down)"


def test_the_html_repoints_run_links_to_the_address_it_is_opened_with(tmp_path):
    html = build.to_html("[`abc`](http://127.0.0.1:5000/#/experiments/1/runs/abc)\n", tmp_path)
    script = html.split("<script>")[1].split("</script>")[0]
    assert script == build.VIEW_TIME_LINKS and "get('mlflow')" in script and "https?" in script


def test_mark_flags_synthetic_data_and_another_data_set():
    mark = build.Report.mark
    ett = {"name": "ETTh1", "title": "ETTh1", "source": "real"}
    assert mark({}, {"name": "ETTh1"}) == "" and mark({"data": ett}, {"name": "ETTh1"}) == ""
    assert mark({"data": {**ett, "name": "ETTh2", "title": "ETTh2"}}, {"name": "ETTh1"}) == " ⚠ ran on ETTh2 (real)"
    assert mark({"data": {**ett, "source": "synthetic"}}, {"name": "ETTh1"}) == " ⚠ synthetic"
    assert mark({"data": {**ett, "name": "ETTh2"}}) == ""                  # no data set named: no comparison
    path = {"name": "pathmnist", "title": "PathMNIST", "source": "synthetic", "size": 64}
    assert mark({"data": path}) == " ⚠ synthetic"
    assert mark({"data": path}, {"name": "pathmnist", "size": 28}) == " ⚠ ran on PathMNIST 64px (synthetic)"


# -- part 1 ------------------------------------------------------------------------------------------

def test_part_1_states_the_gradient_errors_thresholds_and_accuracy_margin_from_its_files(workspace, monkeypatch):
    monkeypatch.delenv("MLFLOW_UI_URL", raising=False)
    _write("metrics/backprop.json", {"test_accuracy": 0.61234, "majority_baseline": 0.40001})
    _write("metrics/backprop.details.json", {
        "fd_threshold": 1e-6, "autograd_threshold": 1e-8, "fd_max_rel_error": {"theta1": 1.234e-9, "b2": 5e-10},
        "autograd_max_rel_error": {"theta1": 2e-12, "b2": 3.456e-13}, "epochs": 7, "classes": 3, "window": 24,
        "n_test": 101})
    _write("metrics/backprop.run.json", {"run_id": "feedbeef" * 4, "ui_path": "#/r", "tracking_uri": "http://m/"})
    text = build.Report(workspace).build("abc1234")
    assert _lines_after(text, "## Part 1: backpropagation, made executable")[:9] == [
        "", "Largest relative error of the hand-written gradients, per parameter (finite differences in float64, "
        "threshold 1e-06; torch autograd, threshold 1e-08):", "",
        "| parameter | finite differences | torch autograd |", "|---|---|---|",
        "| theta1 | 1.23e-09 | 2.00e-12 |", "| b2 | 5.00e-10 | 3.46e-13 |", "",
        "Training with plain SGD (7 epochs, K = 3 classes, L = 24): test accuracy **0.6123** against the "
        "majority-class baseline 0.4000 (margin +0.2123; 101 test windows). MLflow run: [`feedbeef`](http://m/#/r)."]


def test_part_1_without_its_numbers_says_missing_and_draws_no_table(workspace):
    _write("metrics/backprop.details.json", {"test_accuracy": 0.5, "majority_baseline": 0.4})
    report = build.Report(workspace)
    text = report.build("abc1234")
    part1 = text.split("## Part 1")[1].split("## Part 2")[0]
    assert part1 == (": backpropagation, made executable\n\n*Missing: `metrics/backprop.json` or some of its numbers "
                     "(stage `backprop`).*\n\n")
    assert "metrics/backprop.details.json (no fd_threshold)" in report.missing
    Path("metrics/backprop.json").unlink()
    report = build.Report(workspace)
    assert "*Missing: `metrics/backprop.json`" in report.build("abc1234")
    assert report.missing[0] == "metrics/backprop.json"


@pytest.mark.parametrize("value", ["high", True])
def test_part_1_fails_on_an_accuracy_that_is_not_a_number(workspace, value):
    """A bool would print as 1.0000 and a string failed on an unrelated format error: both name the file now."""
    _write("metrics/backprop.json", {**_read("metrics/backprop.json"), "test_accuracy": value})
    with pytest.raises(ValueError, match=f"metrics/backprop.json: backprop is {value!r}, not a number"):
        build.Report(workspace).build("abc1234")


# -- figures -----------------------------------------------------------------------------------------

@pytest.fixture
def drawn(monkeypatch):
    """figures.curves replaced by a recorder that writes a stub file where the figure would be."""
    calls = []

    def curves(series, title, xlabel, ylabel, path, smoothing=None):
        calls.append(dict(series=series, title=title, xlabel=xlabel, ylabel=ylabel, path=path, smoothing=smoothing))
        Path(path).write_bytes(b"png")
        return Path(path)

    monkeypatch.setattr(build.figures, "curves", curves)
    return calls


def _csv(path, header, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


def test_part_1_draws_the_training_loss_csv(workspace, drawn):
    _csv("metrics/backprop/train_loss.csv", ["step", "train_loss"], [[0, 1.5], [10, 0.75]])
    text = build.Report(workspace).build("abc1234")
    [call] = drawn
    assert list(call["series"]) == ["train loss"]
    np.testing.assert_array_equal(call["series"]["train loss"], [[0, 10], [1.5, 0.75]])
    assert (call["title"], call["xlabel"], call["ylabel"], call["path"], call["smoothing"]) == (
        "Part 1: training loss", "step", "cross-entropy", build.IMG / "backprop_loss.png", 0.6)
    assert "\n![Part 1 training loss](img/backprop_loss.png)\n\n" in text


def test_part_2_draws_each_variants_curve_file_and_links_the_prediction_figures(workspace, drawn):
    _csv("metrics/mlp/curves/lr_div5.csv", ["epoch", "train_loss", "valid_loss"], [[1, 0.9, 1.0], [2, 0.5, 0.7]])
    _csv("metrics/mlp/curves/h2048.csv", ["epoch", "train_loss", "valid_loss"], [[1, 0.8, 0.9]])
    for label in ("good", "bad"):
        Path("figures/mlp/default").mkdir(parents=True, exist_ok=True)
        Path(f"figures/mlp/default/prediction_{label}.png").write_bytes(label.encode())
    report = build.Report(workspace)
    text = report.build("abc1234")
    assert [c["path"] for c in drawn] == [build.IMG / "mlp_lr_div5_loss.png", build.IMG / "mlp_h2048_loss.png"]
    call = drawn[0]
    assert list(call["series"]) == ["train_loss", "valid_loss"]
    np.testing.assert_array_equal(call["series"]["train_loss"], [[1, 2], [0.9, 0.5]])
    np.testing.assert_array_equal(call["series"]["valid_loss"], [[1, 2], [1.0, 0.7]])
    assert (call["title"], call["xlabel"], call["ylabel"], call["smoothing"]) == (
        "mlp@lr_div5 on ETTh1: train / valid loss", "epoch", "MSE", 0.6)
    assert _lines_after(text, "### Loss curves")[:9] == [
        "", "Raw (faint) and smoothed with factor 0.6 (solid).", "", "![mlp@lr_div5 loss](img/mlp_lr_div5_loss.png)",
        "![mlp@h2048 loss](img/mlp_h2048_loss.png)", "", "### Test predictions (ETTh1, OT channel, default variant)",
        "", "![good prediction](img/mlp_default_good.png)"]
    assert _lines_after(text, "![good prediction](img/mlp_default_good.png)")[:2] == [
        "![bad prediction](img/mlp_default_bad.png)", ""]
    assert Path("reports/img/mlp_default_bad.png").read_bytes() == b"bad"
    assert "figures/mlp/default/prediction_median.png" in report.missing
    assert "figures/mlp/default/prediction_good.png" not in report.missing


def test_part_3_draws_model_a_against_b_and_each_other_run_against_b_without_nan_points(workspace, drawn):
    header = ["step", "train_loss", "val_auc", "val_acc"]
    _csv("metrics/cnn/curves/resnet18.csv", header, [[1, 2.0, "", ""], [2, 1.0, 0.9, 0.7]])
    _csv("metrics/cnn/curves/hflip.csv", header, [[1, 1.5, 0.8, ""], [2, 1.25, "", 0.6]])
    text = build.Report(workspace).build("abc1234")
    assert [c["path"].name for c in drawn] == [
        "cnn_model_a_vs_model_b_train_loss.png", "cnn_model_a_vs_model_b_val_auc.png",
        "cnn_model_a_vs_model_b_val_acc.png", "cnn_hflip_vs_b_train_loss.png", "cnn_hflip_vs_b_val_auc.png",
        "cnn_hflip_vs_b_val_acc.png"]
    assert all(c["path"].parent == build.IMG and c["smoothing"] is None and c["xlabel"] == "iteration"
               for c in drawn)
    assert [(c["title"], c["ylabel"]) for c in drawn[:3]] == [
        ("Model A vs model B (PathMNIST 64 px): train loss", "train loss"),
        ("Model A vs model B (PathMNIST 64 px): validation AUC", "validation AUC"),
        ("Model A vs model B (PathMNIST 64 px): validation ACC", "validation ACC")]
    assert [list(c["series"]) for c in drawn] == [["resnet18"]] * 3 + [["hflip"]] * 3
    expect = [([1, 2], [2.0, 1.0]), ([2], [0.9]), ([2], [0.7]), ([1, 2], [1.5, 1.25]), ([1], [0.8]), ([2], [0.6])]
    for call, (x, y) in zip(drawn, expect):
        got = next(iter(call["series"].values()))
        assert got[0].tolist() == x and got[1].tolist() == y
    assert _lines_after(text, "### Curves (train loss, validation AUC, validation ACC against iterations)")[:10] == [
        "", "![Model A vs model B train loss](img/cnn_model_a_vs_model_b_train_loss.png)",
        "![Model A vs model B validation AUC](img/cnn_model_a_vs_model_b_val_auc.png)",
        "![Model A vs model B validation ACC](img/cnn_model_a_vs_model_b_val_acc.png)", "",
        "![hflip vs B train loss](img/cnn_hflip_vs_b_train_loss.png)",
        "![hflip vs B validation AUC](img/cnn_hflip_vs_b_val_auc.png)",
        "![hflip vs B validation ACC](img/cnn_hflip_vs_b_val_acc.png)", "", "### Feature maps of ResNet-18"]


def test_part_3_puts_model_b_first_in_each_comparison(workspace, drawn):
    header = ["step", "train_loss", "val_auc", "val_acc"]
    for name in ("resnet18", "densenet121", "steplr"):
        _csv(f"metrics/cnn/curves/{name}.csv", header, [[1, 1.0, 0.5, 0.5]])
    build.Report(workspace).build("abc1234")
    groups = {c["title"].split(" (")[0]: list(c["series"]) for c in drawn}
    assert groups == {"Model A vs model B": ["resnet18", "densenet121"], "finetune vs B": ["densenet121"],
                      "steplr vs B": ["densenet121", "steplr"], "rotation vs B": ["densenet121"],
                      "hflip vs B": ["densenet121"], "rotation_hflip vs B": ["densenet121"]}


def test_part_3_links_the_feature_maps_and_each_confusion_matrix_that_exists(workspace):
    for path in ("figures/features/feature_maps.png", "figures/cnn/hflip/confusion.png",
                 "figures/cnn/resnet18/confusion.png"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(path.encode())
    report = build.Report(workspace)
    text = report.build("abc1234")
    assert _lines_after(text, "### Feature maps of ResNet-18")[:6] == [
        "", "![feature maps](img/feature_maps.png)", "", "### Confusion matrices (test split)", ""]  + [
        "![resnet18 confusion](img/confusion_resnet18.png)"]
    assert _lines_after(text, "![resnet18 confusion](img/confusion_resnet18.png)")[:2] == [
        "![hflip confusion](img/confusion_hflip.png)", ""]
    assert Path("reports/img/confusion_hflip.png").read_bytes() == b"figures/cnn/hflip/confusion.png"
    assert Path("reports/img/feature_maps.png").read_bytes() == b"figures/features/feature_maps.png"
    assert not [m for m in report.missing if "features" in m or "confusion" in m]
    Path("figures/features/feature_maps.png").unlink()
    _ran_on(workspace, "ChestMNIST 64px (synthetic)")   # its task (multi-label): as its runs recorded it
    report = build.Report(_with(workspace, images={"name": "chestmnist"}))
    text = report.build("abc1234")
    assert "figures/features/feature_maps.png" in report.missing and "![feature maps]" not in text
    assert _lines_after(text, "### Per-label test outcomes (multi-label)")[:4] == [
        "", "ChestMNIST is multi-label, so there is no confusion matrix: each run's per-label positives, predicted "
        "positives, AUC and ACC are in `metrics/cnn/<run>.details.json` (`per_label`) and drawn in "
        "`figures/cnn/<run>/confusion.png`:", "", "![resnet18 per-label outcomes](img/confusion_resnet18.png)"]


# -- the whole document ------------------------------------------------------------------------------

def test_the_header_names_part_1s_data_source(workspace):
    _write("metrics/backprop.run.json", {"data_source": "ETTh1 (real)"})
    head = build.Report(workspace).build("abc1234").split("## Part 1")[0].split("\n")
    assert "- data, part 1: ETTh1 (real)" in head


def test_header_lists_commit_date_devices_sources_and_missing_results_before_the_parts(workspace):
    _write("metrics/cnn/hflip.run.json", {"data_source": "PathMNIST 64px (synthetic)", "device": "cuda:0"})
    _write("metrics/cnn/resnet18.run.json", {"data_source": "PathMNIST 64px (medmnist)", "device": "cpu"})
    _write("metrics/mlp/h1024.run.json", {"data_source": "ETTh1 (synthetic)"})
    Path("metrics/cnn/steplr.json").unlink()
    Path("reports/img").mkdir(parents=True)
    Path("reports/stale.md").write_text("old")
    before = datetime.date.today().isoformat()
    text = build.Report(workspace).build("abc1234")
    dates = {before, datetime.date.today().isoformat()}   # a build across midnight has either date
    assert not Path("reports/stale.md").exists() and Path("reports/img").is_dir()
    head = text.split("## Part 1")[0].split("\n")
    assert head[:4] == [
        "# Deep-learning assignment, reproduced", "",
        "> **⚠ SYNTHETIC DATA.** Some results below come from a generated stand-in (ETTh1 (synthetic); PathMNIST "
        "64px (synthetic)), not the real data set; rows marked ⚠ synthetic are not comparable to the reference values.",
        ""]
    assert head[4] == ("> **Missing results:** `figures/mlp/default/prediction_good.png`, "
                       "`figures/mlp/default/prediction_median.png`, `figures/mlp/default/prediction_bad.png`, "
                       "`metrics/cnn/steplr.json`, `figures/features/feature_maps.png`")
    assert head[7].removeprefix("- built: ") in dates
    assert head[5:7] + head[8:] == [
        "", "- git commit: `abc1234`", "- devices: cpu, cuda:0",
        "- data, part 2: ETTh1 (real); ETTh1 (synthetic)",
        "- data, part 3: PathMNIST 64px (medmnist); PathMNIST 64px (synthetic)",
        "- reference values: `pipeline/report/references.yaml` (with their sources)", "", ""]
    assert text.endswith("### Confusion matrices (test split)\n\n\n")     # the parts' lines, then one newline
    assert text.index("## Part 1") < text.index("## Part 2") < text.index("## Part 3")


def test_header_says_cpu_when_no_run_names_a_device(workspace):
    text = build.Report(workspace).build("abc1234")
    assert "- devices: cpu (numpy)\n" in text and "> **" not in text.split("## Part 1")[0].replace(
        "> **Missing results:**", "")


def test_html_keeps_the_tables_inlines_the_report_images_and_loads_nothing(tmp_path):
    (tmp_path / "img").mkdir()
    png = b"\x89PNG fake"
    (tmp_path / "img/a.png").write_bytes(png)
    md = "# T\n\n| x | y |\n|---|---|\n| 1 | 2 |\n\n![a](img/a.png)\n\n> warn\n"
    html = build.to_html(md, tmp_path)
    assert "<table>" in html and "<td>1</td>" in html and "<th>x</th>" in html
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in html
    assert 'src="img/' not in html and "<blockquote>" in html
    assert html.startswith('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Assignment report'
                           "</title><style>body{")
    assert html.endswith("\n</body></html>\n")
    # readable without any external stylesheet: a page width, bordered tables, images that fit the page,
    # the warning banners (blockquotes) highlighted; each rule whole, in the one <style>
    style = html.split("<style>")[1].split("</style>")[0]
    assert style.startswith("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
                            "line-height:1.4}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}")
    for rule in ("}td,th{border:1px solid #bbb;padding:3px 7px}th{background:#eee}img{max-width:100%;margin:4px 0}",
                 "}blockquote{background:#fff3cd;border-left:5px solid #e0a800;margin:1em 0;padding:0.5em 1em}"):
        assert rule in style, rule
    assert style.endswith("padding:0.5em 1em}")
    assert build.to_html("![b](other/b.png)\n", tmp_path).count('src="other/b.png"') == 1   # not ours: left alone
