"""Claims about the output contract (pipeline/results.py): dvc.yaml declares exactly the files it
names, each headline key is unique across all runs (DVC then never prefixes a `dvc exp show` column
with its file path), the headline is taken from the details, and write_results refuses what the
report could not read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import params as P, results as R

REPO = Path(__file__).resolve().parents[2]
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = P.load(REPO / "params.yaml")


def _paths(entries) -> dict[str, dict]:
    """dvc.yaml's outs/metrics/plots list: path -> its options."""
    found = {}
    for entry in entries or []:
        found.update({entry: {}} if isinstance(entry, str) else entry)
    return found


def _declared(stage: str, item: dict) -> dict[str, dict[str, dict]]:
    """A stage's outs, metrics and plots with ${item.*} filled in."""
    spec = DVC_YAML["stages"][stage]

    def fill(path: str) -> str:
        for key, value in item.items():
            path = path.replace("${item.%s}" % key, value)
        return path
    return {kind: {fill(p): {k: fill(v) if isinstance(v, str) else v for k, v in o.items()}
                   for p, o in _paths(spec.get(kind)).items()} for kind in ("outs", "metrics", "plots")}


CASES = [("backprop", {}, R.backprop())]
CASES += [("mlp", {"variant": v}, R.mlp(v)) for v in PARAMS.mlp_variants()]
CASES += [("cnn" if n in PARAMS.cnn.experiments else "ablation", {"name": n}, R.cnn(n)) for n in PARAMS.cnn_experiments()]


@pytest.mark.parametrize("stage,item,out", CASES, ids=[c[2].run for c in CASES])
def test_dvc_yaml_declares_exactly_the_contracts_files(stage, item, out):
    declared = _declared(stage, item)
    assert list(declared["metrics"]) == [str(out.headline)]
    assert declared["metrics"][str(out.headline)].get("cache") is False   # git-tracked: `dvc exp show` reads it
    expected_outs = {str(out.details), str(out.timing), str(out.run_info), str(out.figures)}
    expected_outs |= {str(out.model)} if out.model else set()
    assert set(declared["outs"]) == expected_outs
    assert set(declared["plots"]) == {str(p) for p in out.curves.values()}


def test_every_plot_has_a_title_naming_its_run():
    for stage, item, out in CASES:
        for path, options in _declared(stage, item)["plots"].items():
            title = options.get("title", "")
            assert title and (out.run in title or out.family == "backprop"), (path, title)


def test_no_top_level_plots_definition_draws_the_runs_under_one_shared_title():
    assert "plots" not in DVC_YAML


def test_every_headline_key_is_unique_across_runs():
    keys = [key for _, _, out in CASES for key in out.headline_keys]
    assert len(keys) == len(set(keys)), sorted(keys)


def test_matrix_stages_run_over_the_params_that_name_the_runs():
    assert DVC_YAML["stages"]["mlp"]["matrix"] == {"variant": "${mlp.variants}"}
    assert DVC_YAML["stages"]["cnn"]["matrix"] == {"name": "${cnn.experiments}"}
    assert DVC_YAML["stages"]["ablation"]["matrix"] == {"name": "${cnn.ablations}"}


def test_every_result_writer_and_the_report_depend_on_the_contract():
    for stage in ("backprop", "mlp", "cnn", "features", "report"):
        deps = DVC_YAML["stages"][stage]["deps"]
        assert ("pipeline/results.py" in deps) == (stage != "features"), stage


def test_the_report_no_longer_reads_the_image_loader():
    deps = DVC_YAML["stages"]["report"]["deps"]
    assert "pipeline/data/images.py" not in deps and "pipeline/data/fetch.py" not in deps
    source = (REPO / "pipeline/report/build.py").read_text()
    assert "pipeline.data" not in source and "os.environ" not in source


def test_headline_comes_from_the_details():
    details = {"test_accuracy": 0.61, "gradcheck_max_rel_error": 1.1365e-09}
    assert R.backprop().headline_of(details) == {"backprop": 0.61}
    assert R.mlp("h1024").headline_of({"test_mse": 0.45, "test_mae": 0.44}) == {"h1024": 0.45}
    assert R.cnn("hflip").headline_of({"test_auc": None, "test_acc": 0.5}) == {"hflip": None}


def _details(out: R.Results) -> dict:
    return {key: 0.5 for key in out.details_keys}


def test_write_results_writes_the_four_files_with_the_data_identity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = R.cnn("resnet18")
    data = {"name": "pathmnist", "title": "PathMNIST", "source": "synthetic", "size": 32, "task": "multi-class",
            "channels": 3, "sha256": "ab" * 32}
    headline = R.write_results(out, _details(out), {"train_seconds": 1.0}, {"run_id": "r"}, data)
    assert headline == {"resnet18": 0.5} == json.loads(out.headline.read_text())
    assert json.loads(out.details.read_text()) == _details(out)
    assert json.loads(out.timing.read_text()) == {"train_seconds": 1.0}
    assert json.loads(out.run_info.read_text()) == {"run_id": "r", "data": data}
    assert R.data_tags(data)["data.size"] == "32"


def test_write_results_refuses_details_the_report_could_not_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = R.mlp("default")
    details = _details(out)
    del details["skill"]
    with pytest.raises(ValueError, match="did not compute skill"):
        R.write_results(out, details, {}, {}, {})
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        R.write_results(out, _details(out), {}, {}, {"colour": "red"})
    with pytest.raises(ValueError, match="default is 'x', not a number"):
        R.write_results(out, {**_details(out), "test_mse": "x"}, {}, {}, {})
    assert not list(tmp_path.rglob("*.json"))   # nothing half-written
