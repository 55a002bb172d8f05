"""Claims about the report tables: every number is the one in the metrics files (MLP: the seed mean
± std), the deltas are ours minus the reference, reference columns appear only for the data sets the
references belong to (ETTh1, PathMNIST), every heading names the data set, and a missing metric
shows up (never a silently invented number)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from pathlib import Path

import medmnist  # noqa: F401  (image titles come from medmnist's table: import it at collection, once, not per test run)
import pytest
import yaml

from pipeline import params as P, results as R
from pipeline.report import build

REPO = Path(__file__).resolve().parents[2]
REFS = yaml.safe_load(build.REFERENCES.read_text())


@functools.cache
def _repo_params() -> P.Params:
    return P.load(REPO / "params.yaml")


@functools.cache
def _parsed(text: str):
    return _safe_load(text)


_safe_load = yaml.safe_load


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A tmp folder with tiny metrics files for every run params.yaml names; the repository's params.
    Each YAML text is parsed once per session (pure-Python yaml takes ~0.15 s, and these tests build
    ~60 reports): Report() still reads references.yaml itself, the parse is only reused."""
    monkeypatch.setattr(build.yaml, "safe_load", lambda text: copy.deepcopy(_parsed(text)))
    monkeypatch.chdir(tmp_path)
    params = _repo_params()
    for i, variant in enumerate(params.mlp_variants()):
        _write(f"metrics/mlp/{variant}.json", {"test_mse": 0.4 + i / 100 + 1e-5, "test_mae": 0.43 + i / 1000,
                                              "test_mse_std": 0.002 + i / 1000, "test_mae_std": 0.003 + i / 1000,
                                              "repeat_last_mse": 1.3249, "repeat_last_mae": 0.7331,
                                              "window_mean_mse": 0.7183, "window_mean_mae": 0.5705,
                                              "linear_mse": 0.4318, "linear_mae": 0.4243, "skill": 0.6 + i / 100})
        _write(f"metrics/mlp/{variant}.details.json", {
            "n_test_windows": 2689, "best_epoch": i + 1, "n_seeds": 5, "window_norm": "revin" if i % 2 else "none",
            "window_norm_val_loss": {"none": 0.9 + i / 100, "last": 0.95, "mean": 0.97, "revin": 0.91}})
        _write(f"metrics/mlp/{variant}.run.json", {"data_source": "ETTh1 (real)"})
    for i, name in enumerate(params.cnn_experiments()):
        _write(f"metrics/cnn/{name}.json", {"test_auc": 0.95 + i / 1000, "test_acc": 0.8 + i / 100})
        _write(f"metrics/cnn/{name}.details.json", {"best_epoch": i + 2, "best_val_auc": 0.9, "best_val_acc": 0.7})
        _write(f"metrics/cnn/{name}.run.json", {"data_source": "PathMNIST 64px (medmnist)"})
    _write("metrics/backprop.json", {"fd_threshold": 1e-6, "autograd_threshold": 1e-8,
                                     "fd_max_rel_error": {"theta1": 1e-9}, "autograd_max_rel_error": {"theta1": 1e-12},
                                     "epochs": 2, "classes": 3, "window": 24, "test_accuracy": 0.5,
                                     "majority_baseline": 0.4, "n_test": 100, "gradcheck_max_rel_error": 1e-9})
    return params


HEADLINE = re.compile(r"metrics/(?:(backprop)|(mlp|cnn)/([^/.]+))\.json")
DATA_SOURCE = re.compile(r"(\S+)(?: (\d+)px)? \((\w+)\)")


def _out(path) -> R.Results | None:
    match = HEADLINE.fullmatch(str(path))
    return None if match is None else R.backprop() if match[1] else R.Results(match[2], match[3])


def _details_of(path) -> R.Results | None:
    return _out(str(path).replace(".details.json", ".json")) if str(path).endswith(".details.json") else None


def _headline_number(key: str) -> bool:
    """The numbers the headline files held before pipeline/results.py (now in the details)."""
    return key.startswith("test_") or key.endswith(("_mse", "_mae")) or \
        key in ("skill", "majority_baseline", "gradcheck_max_rel_error")


def _write(path, data):
    """A file as the stages write it. A run's numbers given for its headline path go where
    pipeline/results.py puts them: all into the details, the headline keys into the headline (as
    write_results would, without its checks, so a test can write a bad value). A run.json's
    `data_source` ("PathMNIST 64px (synthetic)") becomes the structured `data` the stages record."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    out, details_of = _out(path), _details_of(path)
    if out is not None:
        old = json.loads(out.details.read_text()) if out.details.exists() else {}
        details = {**{k: v for k, v in old.items() if not _headline_number(k)}, **data}
        Path(out.details).write_text(json.dumps(details))
        data = {out.run: details.get(R.HEADLINE_OF[out.family])}
    elif details_of is not None and details_of.details.exists():   # keeps the numbers written as the headline's
        old = json.loads(details_of.details.read_text())
        data = {**{k: v for k, v in old.items() if _headline_number(k)}, **data}
    elif str(path).endswith(".run.json") and "data_source" in data:
        title, size, source = DATA_SOURCE.fullmatch(data["data_source"]).groups()
        name = title.lower() if size else title
        identity = {"name": name, "title": title, "source": source}
        if size:   # as the CNN stage records it: the set's own task
            identity["task"] = medmnist.INFO[name]["task"] if name in medmnist.INFO else "multi-class"
        data = {**{k: v for k, v in data.items() if k != "data_source"},
                "data": {**identity, **({"size": int(size)} if size else {})}}
    Path(path).write_text(json.dumps(data))


def _ran_on(params, data_source: str) -> None:
    """Every CNN run's run.json names this data (as the stage records it)."""
    for name in params.cnn_experiments():
        _write(f"metrics/cnn/{name}.run.json", {"data_source": data_source})


def _read(path):
    """A file's contents; for a run's headline path, the run's numbers (its details)."""
    out = _out(path)
    return json.loads((out.details if out else Path(path)).read_text())


def _with(params, ett=None, images=None):
    """The params with other data sets named (validated as params.yaml would be)."""
    data = params.data
    if ett:
        data = dataclasses.replace(data, ett=dataclasses.replace(data.ett, **ett))
    if images:
        data = dataclasses.replace(data, images=dataclasses.replace(data.images, **images))
    return dataclasses.replace(params, data=data)


def _table(text: str, heading: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The table under the first heading that starts with `heading`: its header and {first cell: {column: cell}}."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(f"### {heading}"))
    table = [line for line in lines[start + 1:next(i for i in range(start + 3, len(lines)) if not lines[i].strip())]
             if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return header, rows


def _mlp_cells_match_files(rows, variants):
    for variant in variants:
        values = {**_read(f"metrics/mlp/{variant}.json"), **_read(f"metrics/mlp/{variant}.details.json")}
        row = rows[f"mlp@{variant}"]
        mse = next(v for k, v in row.items() if k.endswith("MSE") and not k.startswith(("ref", "Δ")))
        mae = next(v for k, v in row.items() if k.endswith("MAE") and not k.startswith(("ref", "Δ")))
        assert mse == f"{values['test_mse']:.4f} ± {values['test_mse_std']:.2g}"   # the spread: 2 significant digits
        assert mae == f"{values['test_mae']:.4f} ± {values['test_mae_std']:.2g}"
        assert row["seeds"] == "5" and row["window_norm"] == values["window_norm"]
        assert row["test windows"] == "2689"


def test_mlp_tables_hold_the_seed_means_and_spreads_and_the_deltas_to_the_references(workspace):
    text = build.Report(workspace).build("abc1234")
    assert "## Part 2: MLP forecaster on ETTh1" in text
    for table, key in (("Table 1", "learning_rate"), ("Table 2", "hidden_size")):
        header, rows = _table(text, table)
        assert text.split(f"### {table}: ")[1].split("\n")[0].endswith(" on ETTh1")
        assert {"ref MSE", "ref MAE", "ΔMSE", "ΔMAE"} <= set(header)
        assert set(rows) == {f"mlp@{v}" for v in REFS["mlp"][key]}
        _mlp_cells_match_files(rows, REFS["mlp"][key])
        for variant, ref in REFS["mlp"][key].items():
            values, cfg, row = _read(f"metrics/mlp/{variant}.json"), workspace.mlp_variant(variant), rows[f"mlp@{variant}"]
            assert row["our lr / hidden"] == f"{cfg.lr:g} / {cfg.hidden}" and row["assignment setting"] == ref["label"]
            assert [row["ref MSE"], row["ref MAE"], row["ΔMSE"], row["ΔMAE"]] == [
                f"{ref['mse']:.4f}", f"{ref['mae']:.4f}", f"{values['test_mse'] - ref['mse']:+.4f}",
                f"{values['test_mae'] - ref['mae']:+.4f}"]
    assert "mlp@assignment" in text.split("Other variants")[1].split("\n\n")[1]
    assert "Published results (ETTh1" in text


def test_mlp_tables_of_another_series_name_it_and_show_our_numbers_alone(workspace):
    for variant in workspace.mlp_variants():
        _write(f"metrics/mlp/{variant}.run.json", {"data_source": "ETTh2 (real)"})
    text = build.Report(_with(workspace, ett={"name": "ETTh2"})).build("abc1234")
    assert "## Part 2: MLP forecaster on ETTh2" in text and "No reference values exist for ETTh2" in text
    for table, key in (("Table 1", "learning_rate"), ("Table 2", "hidden_size")):
        assert text.split(f"### {table}: ")[1].split("\n")[0].endswith(" on ETTh2")
        header, rows = _table(text, table)
        assert not [c for c in header if "ref" in c or "Δ" in c], header
        _mlp_cells_match_files(rows, REFS["mlp"][key])
        assert "n/a" not in json.dumps(rows)
    assert "Published results" not in text and "- data, part 2: ETTh2 (real)" in text


def test_each_variants_window_norm_choice_and_candidate_losses_are_listed(workspace):
    text = build.Report(workspace).build("abc1234")
    for variant in workspace.mlp_variants():
        details = _read(f"metrics/mlp/{variant}.details.json")
        losses = ", ".join(f"{n} {v:.4f}" for n, v in details["window_norm_val_loss"].items())
        assert f"- mlp@{variant}: **{details['window_norm']}** ({losses})" in text


def test_cnn_tables_hold_the_metrics_files_numbers_and_the_deltas(workspace):
    text = build.Report(workspace).build("abc1234")
    assert "## Part 3: CNNs on PathMNIST (64 px)" in text
    for table, key in (("Table 3", "strategies"), ("Table 4", "models")):
        header, rows = _table(text, table)
        assert text.split(f"### {table}: ")[1].split("\n")[0].endswith(" on PathMNIST 64 px")
        assert set(rows) == set(REFS["cnn"][key])
        assert ("published (AUC / ACC)" in header) == (key == "models")
        for name, ref in REFS["cnn"][key].items():
            values = {**_read(f"metrics/cnn/{name}.json"), **_read(f"metrics/cnn/{name}.details.json")}
            row = rows[name]
            assert row["experiment"] == ref["label"]
            assert [row[c] for c in ("our AUC", "our ACC", "ref AUC", "ref ACC", "ΔAUC", "ΔACC")] == [
                f"{values['test_auc']:.3f}", f"{values['test_acc']:.3f}", f"{ref['auc']:.3f}", f"{ref['acc']:.3f}",
                f"{values['test_auc'] - ref['auc']:+.3f}", f"{values['test_acc'] - ref['acc']:+.3f}"]
            assert row["best epoch"] == str(values["best_epoch"])
    assert "### Confusion matrices" in text and "measured at 64 px" not in text


def test_pathmnist_at_another_size_keeps_the_references_and_says_their_size(workspace):
    for name in workspace.cnn_experiments():
        _write(f"metrics/cnn/{name}.run.json", {"data_source": "PathMNIST 28px (medmnist)"})
    text = build.Report(_with(workspace, images={"size": 28})).build("abc1234")
    assert "## Part 3: CNNs on PathMNIST (28 px)" in text
    assert _lines_after(text, "## Part 3: CNNs on PathMNIST (28 px)")[1] == (
        "Test AUC and ACC on PathMNIST at 28 px, as MedMNIST's evaluator scores a multi-class set. References "
        f"(pathmnist, 64 px): {REFS['cnn']['source']}; Δ = ours − reference. The references were measured at 64 px, "
        "these runs at 28 px.")
    header, rows = _table(text, "Table 3")
    assert "ref AUC" in header and set(rows) == set(REFS["cnn"]["strategies"])


def test_a_multi_label_set_is_named_shows_our_numbers_alone_and_points_to_the_per_label_details(workspace):
    for name in workspace.cnn_experiments():
        _write(f"metrics/cnn/{name}.run.json", {"data_source": "ChestMNIST 28px (synthetic)"})
    text = build.Report(_with(workspace, images={"name": "chestmnist", "size": 28})).build("abc1234")
    assert "## Part 3: CNNs on ChestMNIST (28 px)" in text and "No reference values exist for ChestMNIST" in text
    assert "multi-label" in text.split("## Part 3")[1].split("###")[0]
    for table, key in (("Table 3", "strategies"), ("Table 4", "models")):
        header, rows = _table(text, table)
        assert text.split(f"### {table}: ")[1].split("\n")[0].endswith(" on ChestMNIST 28 px")
        assert header[:4] == ["run", "experiment", "AUC", "ACC"]
        assert not [c for c in header if "ref" in c or "Δ" in c or "published" in c], header
        for name in REFS["cnn"][key]:
            values = _read(f"metrics/cnn/{name}.json")
            assert [rows[f"{name} ⚠ synthetic"][c] for c in ("AUC", "ACC")] == [
                f"{values['test_auc']:.3f}", f"{values['test_acc']:.3f}"]
    assert "### Confusion matrices" not in text and "### Per-label test outcomes (multi-label)" in text
    assert "`metrics/cnn/<run>.details.json` (`per_label`)" in text and "`figures/cnn/<run>/confusion.png`" in text
    assert "- data, part 3: ChestMNIST 28px (synthetic)" in text
    assert "generated stand-in (ChestMNIST 28px (synthetic))" in text


def test_header_names_the_commit_and_the_data_sources(workspace):
    text = build.Report(workspace).build("abc1234")
    assert "- git commit: `abc1234`" in text and "- data, part 3: PathMNIST 64px (medmnist)" in text
    assert "- data, part 2: ETTh1 (real)" in text
    assert "SYNTHETIC" not in text


def test_a_missing_metrics_file_is_reported_and_its_cells_say_n_a(workspace):
    Path("metrics/mlp/lr_div5.json").unlink()
    Path("metrics/cnn/steplr.json").unlink()
    report = build.Report(workspace)
    text = report.build("abc1234")
    assert "metrics/mlp/lr_div5.json" in report.missing and "metrics/cnn/steplr.json" in report.missing
    assert "**Missing results:**" in text and "`metrics/cnn/steplr.json`" in text
    assert _table(text, "Table 1")[1]["mlp@lr_div5"]["our MSE"] == "n/a"
    assert _table(text, "Table 3")[1]["steplr"]["our AUC"] == "n/a"


def test_synthetic_results_are_marked(workspace):
    _write("metrics/cnn/hflip.run.json", {"data_source": "PathMNIST 64px (synthetic)"})
    text = build.Report(workspace).build("abc1234")
    assert "**⚠ SYNTHETIC DATA.**" in text and "| hflip ⚠ synthetic |" in text


def test_a_row_from_another_data_set_than_params_name_is_marked(workspace):
    """Stale files (e.g. params switched to ChestMNIST, metrics still PathMNIST's) never pass silently."""
    _write("metrics/cnn/hflip.run.json", {"data_source": "PathMNIST 28px (medmnist)"})
    _write("metrics/mlp/h1024.run.json", {"data_source": "ETTh2 (real)"})
    _write("metrics/mlp/assignment.run.json", {"data_source": "ETTh2 (real)"})
    text = build.Report(workspace).build("abc1234")
    assert "| hflip ⚠ ran on PathMNIST 28px (medmnist) |" in text and "| rotation |" in text
    assert "| mlp@assignment ⚠ ran on ETTh2 (real) | 5 |" in text       # the other-variants table too
    assert "| mlp@h1024 ⚠ ran on ETTh2 (real) |" in text and "| mlp@h2048 |" in text


@pytest.mark.parametrize("path, drop", [("metrics/mlp/default.json", "test_mse"),
                                        ("metrics/mlp/h1024.json", "test_mae_std"),
                                        ("metrics/mlp/lr_div5.details.json", "n_seeds"),
                                        ("metrics/cnn/finetune.json", "test_acc"),
                                        ("metrics/cnn/steplr.details.json", "best_epoch"),
                                        ("metrics/backprop.json", "test_accuracy")])
def test_a_metrics_file_without_the_tables_metric_is_missing(workspace, path, drop):
    values = _read(path)
    del values[drop]
    _write(path, values)
    report = build.Report(workspace)
    report.build("abc1234")
    out = _out(path)   # a headline path: the number is in the details now (and the headline's own is gone)
    expected = [f"{path} (no {drop})"] if out is None else [f"{out.details} (no {drop})"]
    if out is not None and drop in ("test_mse", "test_auc", "test_accuracy"):
        expected.insert(0, f"{out.headline} (no {out.headline_keys[0]})")
    assert [m for m in report.missing if m.startswith("metrics/")] == expected


def test_a_metric_of_the_wrong_type_fails(workspace):
    _write("metrics/cnn/finetune.json", {"test_auc": "high", "test_acc": 0.9})
    with pytest.raises(ValueError, match="metrics/cnn/finetune.json: finetune is 'high', not a number"):
        build.Report(workspace).build("abc1234")


def _parse(edit):
    """params.yaml with `edit(raw dict)` applied, validated as the stages validate it."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(raw)
    return P.parse(raw)


def _lines_after(text: str, heading: str) -> list[str]:
    lines = text.split("\n")
    return lines[lines.index(heading) + 1:]


MLP_HEAD = ["variant", "our lr / hidden", "assignment setting", "seeds", "window_norm", "our MSE", "our MAE", "skill",
            "ref MSE", "ref MAE", "ΔMSE", "ΔMAE", "test windows", "MLflow run"]


def test_mlp_table_columns_come_in_this_order_with_a_separator_per_column(workspace):
    text = build.Report(workspace).build("abc1234")
    after = _lines_after(text, "### Table 1: learning rate on ETTh1")
    assert after[:3] == ["", "| " + " | ".join(MLP_HEAD) + " |", "|---" * len(MLP_HEAD) + "|"]
    assert [line.split(" | ")[0] for line in after[3:6]] == ["| mlp@default", "| mlp@lr_div5", "| mlp@lr_div50"]
    assert after[6] == ""
    other = _with(workspace, ett={"name": "ETTh2"})
    for variant in workspace.mlp_variants():
        _write(f"metrics/mlp/{variant}.run.json", {"data_source": "ETTh2 (real)"})
    after = _lines_after(build.Report(other).build("abc1234"), "### Table 2: hidden size on ETTh2")
    head = ["variant", "our lr / hidden", "assignment setting", "seeds", "window_norm", "MSE", "MAE", "skill",
            "test windows", "MLflow run"]
    assert after[1:3] == ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    assert [line.split(" | ")[0] for line in after[3:6]] == ["| mlp@default", "| mlp@h1024", "| mlp@h2048"]


def test_part_2_states_the_naive_baselines_and_each_rows_skill(workspace):
    text = build.Report(workspace).build("abc1234")
    assert ("Baselines on the test windows (MSE / MAE): repeat-last 1.3249 / 0.7331; window mean 0.7183 / 0.5705; "
            "least-squares linear 0.4318 / 0.4243.") in text
    for table in ("Table 1", "Table 2"):
        for name, row in _table(text, table)[1].items():
            assert row["skill"] == f"{_read(f'metrics/mlp/{name[4:]}.json')['skill']:.3f}"


SKILL_NOTE = ("skill = the model's test MSE / the best naive forecast's (repeat-last or window mean) on the same "
              "windows: below 1 the model beats both.")


def test_the_skill_note_takes_the_baselines_from_the_first_file_that_holds_them_or_states_none(workspace):
    variants = list(workspace.mlp_variants())
    baseline_keys = [f"{k}_{m}" for k in ("repeat_last", "window_mean", "linear") for m in ("mse", "mae")]
    def without_baselines(variant):   # a details file written before the baselines existed
        details = R.mlp(variant).details
        details.write_text(json.dumps({k: v for k, v in json.loads(details.read_text()).items()
                                       if k not in baseline_keys}))
    for variant in variants[:2]:
        without_baselines(variant)
    _write(f"metrics/mlp/{variants[2]}.json", {**_read(f"metrics/mlp/{variants[2]}.json"), "repeat_last_mse": 2.5})
    text = build.Report(workspace).build("abc1234")
    assert f"{SKILL_NOTE} Baselines on the test windows (MSE / MAE): repeat-last 2.5000 / 0.7331;" in text
    for variant in variants:
        without_baselines(variant)
    assert _lines_after(build.Report(workspace).build("abc1234"), SKILL_NOTE)[0] == ""   # the sentence alone


def test_an_mlp_row_is_exactly_the_files_numbers_the_variants_settings_and_its_run_link(workspace):
    _write("metrics/mlp/h1024.run.json", {"data_source": "ETTh1 (real)", "run_id": "0123456789abcdef" * 2,
                                          "ui_path": "#/experiments/3/runs/0123456789abcdef0123456789abcdef",
                                          "tracking_uri": "sqlite:///mlflow.db"})
    text = build.Report(workspace).build("abc1234")
    cfg, values = workspace.mlp_variant("h1024"), _read("metrics/mlp/h1024.json")
    ref = REFS["mlp"]["hidden_size"]["h1024"]
    row = next(line for line in _lines_after(text, "### Table 2: hidden size on ETTh1") if line.startswith("| mlp@h1024"))
    assert row == ("| mlp@h1024 | " + f"{cfg.lr:g} / 1024 | hidden 1024 | 5 | revin | "
                   f"{values['test_mse']:.4f} ± {values['test_mse_std']:.2g} | "
                   f"{values['test_mae']:.4f} ± {values['test_mae_std']:.2g} | {values['skill']:.3f} | "
                   f"{ref['mse']:.4f} | {ref['mae']:.4f} | {values['test_mse'] - ref['mse']:+.4f} | "
                   f"{values['test_mae'] - ref['mae']:+.4f} | 2689 | "
                   "[`01234567`](http://127.0.0.1:5000/#/experiments/3/runs/0123456789abcdef0123456789abcdef) |")
    assert "| mlp@h2048 |" in text and "no MLflow run" in text.split("| mlp@h2048 |")[1].split("\n")[0]


def test_a_missing_mlp_file_leaves_n_a_in_every_cell_that_would_come_from_it(workspace):
    for suffix in (".json", ".details.json", ".run.json"):
        Path(f"metrics/mlp/h2048{suffix}").unlink()
    text = build.Report(workspace).build("abc1234")
    row = _table(text, "Table 2")[1]["mlp@h2048"]
    ref = REFS["mlp"]["hidden_size"]["h2048"]
    assert row["skill"] == "n/a"
    assert [row[c] for c in ("seeds", "window_norm", "our MSE", "our MAE", "ref MSE", "ref MAE", "ΔMSE", "ΔMAE",
                             "test windows", "MLflow run")] == [
        "n/a", "n/a", "n/a", "n/a", f"{ref['mse']:.4f}", f"{ref['mae']:.4f}", "n/a", "n/a", "n/a", "no MLflow run"]
    assert "- mlp@h2048:" not in text   # no window_norm line invented for it


def test_a_variant_params_do_not_name_has_no_row_and_the_rest_of_its_table_stays(workspace):
    def drop(raw):
        del raw["mlp"]["variants"]["lr_div5"]
        del raw["cnn"]["ablations"]["steplr"]
    params = _parse(drop)
    text = build.Report(params).build("abc1234")
    assert list(_table(text, "Table 1")[1]) == ["mlp@default", "mlp@lr_div50"]
    assert list(_table(text, "Table 3")[1]) == ["densenet121", "rotation", "hflip", "rotation_hflip"]
    assert "metrics/mlp/lr_div5.json" not in text and "steplr" not in text


def test_the_other_variants_table_holds_only_the_variants_outside_tables_1_and_2_with_their_timing(workspace):
    _write("metrics/mlp/assignment.timing.json", {"train_seconds": 12.5})
    _write("metrics/mlp/assignment.run.json", {"data_source": "ETTh1 (synthetic)"})
    text = build.Report(workspace).build("abc1234")
    after = _lines_after(text, "Other variants (see params.yaml):")
    values = {**_read("metrics/mlp/assignment.json"), **_read("metrics/mlp/assignment.details.json")}
    assert after[:5] == [
        "", "| variant | seeds | window_norm | MSE | MAE | skill | best epoch | seconds | MLflow run |",
        "|---" * 9 + "|",
        f"| mlp@assignment ⚠ synthetic | 5 | {values['window_norm']} | "
        f"{values['test_mse']:.4f} ± {values['test_mse_std']:.2g} | "
        f"{values['test_mae']:.4f} ± {values['test_mae_std']:.2g} | {values['skill']:.3f} | "
        f"{values['best_epoch']} | 12.5 | no MLflow run |", ""]
    params = _parse(lambda raw: raw["mlp"]["variants"].pop("assignment"))
    assert "Other variants" not in build.Report(params).build("abc1234")


def test_window_norm_lines_appear_only_for_variants_that_report_candidate_losses(workspace):
    for variant in workspace.mlp_variants():
        details = _read(f"metrics/mlp/{variant}.details.json")
        if variant != "h1024":
            del details["window_norm_val_loss"]
        _write(f"metrics/mlp/{variant}.details.json", details)
    text = build.Report(workspace).build("abc1234")
    assert _lines_after(text, "Window normalisation per variant: the one kept, and each candidate's best validation "
                              "loss (first seed; the lowest is kept when `window_norm: auto`):")[:3] == [
        "", "- mlp@h1024: **revin** (none 0.9300, last 0.9500, mean 0.9700, revin 0.9100)", ""]
    for variant in workspace.mlp_variants():
        details = _read(f"metrics/mlp/{variant}.details.json")
        details.pop("window_norm_val_loss", None)
        _write(f"metrics/mlp/{variant}.details.json", details)
    assert "Window normalisation per variant" not in build.Report(workspace).build("abc1234")


def test_each_cross_checked_variant_lists_what_it_kept_and_both_losses(workspace):
    heading = ("Trained MLPs or their ridge base, per variant (`cross_check`): early stopping's pick on each half of "
               "the validation windows scored on the other half, seed mean; the MLPs are kept only when that beats "
               "the base scored the same way:")
    assert heading not in build.Report(workspace).build("abc1234")   # no variant reports a check
    for variant, check in (("default", {"trained": 0.80153, "base": 0.79961, "kept": "base"}),
                           ("h2048", {"trained": 0.5, "base": 0.6, "kept": "trained"})):
        details = _read(f"metrics/mlp/{variant}.details.json")
        _write(f"metrics/mlp/{variant}.details.json", {**details, "cross_check": check})
    assert _lines_after(build.Report(workspace).build("abc1234"), heading)[:4] == [
        "", "- mlp@default: **base** (trained MLPs 0.8015, base 0.7996)",
        "- mlp@h2048: **trained** (trained MLPs 0.5000, base 0.6000)", ""]


def test_the_published_etth1_results_are_listed_from_the_references(workspace):
    text = build.Report(workspace).build("abc1234")
    pub = REFS["mlp"]["published"]
    assert (f"Published results ({pub['source']}): DLinear 0.437 / 0.432; PatchTST 0.460 / 0.445; "
            "TimesNet 0.436 / 0.429.") in text.split("\n")
    assert [r["model"] for r in pub["rows"]] == ["DLinear", "PatchTST", "TimesNet"]


def test_part_2_note_names_the_series_target_and_reference_source(workspace):
    text = build.Report(workspace).build("abc1234")
    blank, note, after = _lines_after(text, "## Part 2: MLP forecaster on ETTh1 (numpy, hand-written backprop)")[:3]
    assert blank == after == ""
    assert note == ("Test MSE and MAE on ETTh1 (target OT, standardised): the mean ± sample std over `seeds` "
                    "training seeds; `window_norm` is the per-window normalisation chosen on validation. "
                    f"References (ETTh1): {REFS['mlp']['source']}; Δ = our mean − reference.")


CNN_HEAD = ["run", "experiment", "our AUC", "our ACC", "ref AUC", "ref ACC", "ΔAUC", "ΔACC"]
CNN_TAIL = ["best epoch", "train s", "images/s", "MLflow run"]


def test_cnn_table_columns_come_in_this_order(workspace):
    text = build.Report(workspace).build("abc1234")
    for heading, cols in (("### Table 3: training strategies (model B) on PathMNIST 64 px", CNN_HEAD + CNN_TAIL),
                          ("### Table 4: from scratch vs fine-tuned on PathMNIST 64 px",
                           CNN_HEAD + ["published (AUC / ACC)"] + CNN_TAIL)):
        after = _lines_after(text, heading)
        assert after[:3] == ["", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    after = _lines_after(text, "### Table 4: from scratch vs fine-tuned on PathMNIST 64 px")
    assert [line.split(" | ")[0] for line in after[3:7]] == ["| resnet18", "| densenet121", "| finetune", ""]
    _ran_on(workspace, "DermaMNIST 64px (medmnist)")   # the set's spelling: as its runs recorded it
    text = build.Report(_with(workspace, images={"name": "dermamnist"})).build("abc1234")
    after = _lines_after(text, "### Table 4: from scratch vs fine-tuned on DermaMNIST 64 px")
    cols = ["run", "experiment", "AUC", "ACC"] + CNN_TAIL
    assert after[1:3] == ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]


def test_a_cnn_row_is_exactly_the_files_numbers_timing_and_published_reference(workspace):
    _write("metrics/cnn/finetune.timing.json", {"train_seconds": 12.345, "images_per_second": 1234.6})
    text = build.Report(workspace).build("abc1234")
    rows = _table(text, "Table 4")[1]
    values, ref = _read("metrics/cnn/finetune.json"), REFS["cnn"]["models"]["finetune"]
    assert list(rows["finetune"].values()) == [
        "finetune", ref["label"], f"{values['test_auc']:.3f}", f"{values['test_acc']:.3f}", f"{ref['auc']:.3f}",
        f"{ref['acc']:.3f}", f"{values['test_auc'] - ref['auc']:+.3f}", f"{values['test_acc'] - ref['acc']:+.3f}",
        ref["published"], "4", "12.3", "1235", "no MLflow run"]
    assert rows["densenet121"]["published (AUC / ACC)"] == "—"          # an empty reference is a dash
    assert [rows["resnet18"][c] for c in ("train s", "images/s")] == ["n/a", "n/a"]


def test_a_fine_tuning_row_trained_from_scratch_says_so(workspace):
    params = _parse(lambda raw: raw["cnn"]["experiments"]["finetune"].update(pretrained=False))
    rows = _table(build.Report(params).build("abc1234"), "Table 4")[1]
    assert rows["finetune"]["experiment"] == ("DenseNet121 fine-tuned from ImageNet ⚠ trained from scratch here "
                                              "(pretrained: false)")
    assert rows["resnet18"]["experiment"] == "A: ResNet-18 from scratch"


def test_part_3_note_names_the_set_its_task_and_the_references(workspace):
    text = build.Report(workspace).build("abc1234")
    refs = REFS["cnn"]
    assert _lines_after(text, "## Part 3: CNNs on PathMNIST (64 px)")[:3:2] == ["", ""]
    assert _lines_after(text, "## Part 3: CNNs on PathMNIST (64 px)")[1] == (
        "Test AUC and ACC on PathMNIST at 64 px, as MedMNIST's evaluator scores a multi-class set. "
        f"References (pathmnist, 64 px): {refs['source']}; Δ = ours − reference.")
    assert "## Part 3: CNNs on pneumoniamnist (28 px)" in \
        build.Report(_with(workspace, images={"name": "pneumoniamnist", "size": 28})).build("abc1234")  # no run on it yet
    _ran_on(workspace, "PneumoniaMNIST 28px (medmnist)")   # its spelling and task: as its runs recorded them
    text = build.Report(_with(workspace, images={"name": "pneumoniamnist", "size": 28})).build("abc1234")
    assert _lines_after(text, "## Part 3: CNNs on PneumoniaMNIST (28 px)")[1] == (
        "Test AUC and ACC on PneumoniaMNIST at 28 px, as MedMNIST's evaluator scores a binary-class set. "
        "No reference values exist for PneumoniaMNIST: our numbers alone.")


def test_runs_at_another_size_lend_the_set_neither_their_title_nor_their_task(workspace):
    _ran_on(workspace, "PneumoniaMNIST 28px (medmnist)")
    text = build.Report(_with(workspace, images={"name": "pneumoniamnist", "size": 64})).build("abc1234")
    assert _lines_after(text, "## Part 3: CNNs on pneumoniamnist (64 px)")[1].startswith(
        "Test AUC and ACC on pneumoniamnist at 64 px, as MedMNIST's evaluator scores a classification set. ")


def test_per_label_details_make_a_set_multi_label_even_when_params_say_otherwise(workspace):
    details = _read("metrics/cnn/hflip.details.json")
    _write("metrics/cnn/hflip.details.json", {**details, "per_label": [{"auc": 0.9}]})
    text = build.Report(workspace).build("abc1234")
    assert "scores a multi-label set" in text
    assert "### Per-label test outcomes (multi-label)" in text and "### Confusion matrices" not in text


def test_a_bool_metric_is_not_a_number(workspace):
    _write("metrics/mlp/default.json", {**_read("metrics/mlp/default.json"), "test_mae": True})
    with pytest.raises(ValueError, match="metrics/mlp/default.details.json: test_mae is True, not a number"):
        build.Report(workspace).build("abc1234")
    _write("metrics/mlp/default.json", {**_read("metrics/mlp/default.json"), "test_mae": 1})   # an int is one
    assert _table(build.Report(workspace).build("abc1234"), "Table 1")[1]["mlp@default"]["our MAE"].startswith(
        "1.0000 ± ")


def test_a_missing_file_leaves_n_a_in_the_other_variants_and_cnn_rows_too(workspace):
    for path in ("metrics/mlp/assignment.json", "metrics/mlp/assignment.details.json", "metrics/cnn/steplr.json",
                 "metrics/cnn/steplr.details.json"):
        Path(path).unlink()
    text = build.Report(workspace).build("abc1234")
    assert "| mlp@assignment | n/a | n/a | n/a | n/a | n/a | n/a | n/a | no MLflow run |" in text.split("\n")
    ref = REFS["cnn"]["strategies"]["steplr"]
    assert list(_table(text, "Table 3")[1]["steplr"].values()) == [
        "steplr", ref["label"], "n/a", "n/a", f"{ref['auc']:.3f}", f"{ref['acc']:.3f}", "n/a", "n/a", "n/a", "n/a",
        "n/a", "no MLflow run"]


def test_a_window_norm_line_without_the_chosen_norm_says_n_a(workspace):
    details = _read("metrics/mlp/h2048.details.json")
    del details["window_norm"]
    _write("metrics/mlp/h2048.details.json", details)
    report = build.Report(workspace)
    text = report.build("abc1234")
    assert "- mlp@h2048: **n/a** (none 0.9400, last 0.9500, mean 0.9700, revin 0.9100)" in text.split("\n")
    assert "metrics/mlp/h2048.details.json (no window_norm)" in report.missing


def _skeleton(text: str) -> list[str]:
    """The document's shape: headings verbatim, a blank line as "", a table as one "|" per line, and other
    lines by their first character (">" banner, "-" list item, "text" a paragraph)."""
    shape = []
    for line in text.split("\n"):
        kind = line if line.startswith("#") or not line else {"|": "|", ">": ">", "-": "-"}.get(line[0], "text")
        if kind == "|" and shape and set(shape[-1]) == {"|"}:
            shape[-1] += "|"
        else:
            shape.append(kind)
    return shape


def test_every_heading_table_and_paragraph_stands_apart_in_this_order(workspace):
    """Markdown needs the blank lines: a table or heading glued to a paragraph does not render."""
    text = build.Report(workspace).build("abc1234")
    assert _skeleton(text) == [
        "# Deep-learning assignment, reproduced", "", ">", "", "-", "-", "-", "-", "-", "-", "",
        "## Part 1: backpropagation, made executable", "", "text", "", "|||", "", "text", "",
        "## Part 2: MLP forecaster on ETTh1 (numpy, hand-written backprop)", "", "text", "", "text", "",
        "### Table 1: learning rate on ETTh1", "", "|||||", "", "### Table 2: hidden size on ETTh1", "", "|||||", "",
        "text", "", "|||", "", "text", "", "-", "-", "-", "-", "-", "-", "", "text", "",
        "### Loss curves", "", "text", "", "", "### Test predictions (ETTh1, OT channel, default variant)", "", "",
        "## Part 3: CNNs on PathMNIST (64 px)", "", "text", "",
        "### Table 3: training strategies (model B) on PathMNIST 64 px", "", "|||||||", "",
        "### Table 4: from scratch vs fine-tuned on PathMNIST 64 px", "", "|||||", "",
        "### Curves (train loss, validation AUC, validation ACC against iterations)", "",
        "### Feature maps of ResNet-18", "", "### Confusion matrices (test split)", "", "", ""]
