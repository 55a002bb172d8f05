"""The mutation report's arithmetic: what counts as caught, what survives, what is left out."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from bench import mutation_report as report

STATUSES = {
    "pipeline.a.x_f__mutmut_1": "killed",
    "pipeline.a.x_f__mutmut_2": "timeout",
    "pipeline.a.x_f__mutmut_3": "survived",
    "pipeline.a.x_f__mutmut_4": "no tests",
    "pipeline.a.x_f__mutmut_5": "survived",
    "pipeline.a.x_f__mutmut_6": "not checked",
    "pipeline.b.xǁCǁm__mutmut_1": "killed",
    "pipeline.b.xǁCǁm__mutmut_2": "segfault",
}


def test_no_tests_survives_equivalents_are_left_out_and_unchecked_mutants_are_not_counted(capsys):
    counts, survivors, stale = report.tally(STATUSES, {"pipeline.a.x_f__mutmut_5": "same value"})
    assert dict(counts["pipeline.a"]) == {"killed": 1, "timeout": 1, "survived": 1, "no tests": 1, "equivalent": 1}
    assert sorted(survivors) == ["pipeline.a.x_f__mutmut_3: survived", "pipeline.a.x_f__mutmut_4: no tests"]
    assert stale == []
    report._row("pipeline.a", counts["pipeline.a"])
    assert capsys.readouterr().out.split() == ["pipeline.a", "2", "1", "1", "1", "5", "50.0%"]
    report._row("pipeline.b", counts["pipeline.b"])
    assert capsys.readouterr().out.split()[-1] == "100.0%"


def test_an_equivalent_that_is_caught_is_reported_as_stale():
    _, _, stale = report.tally(STATUSES, {"pipeline.a.x_f__mutmut_1": "was equivalent"})
    assert stale == ["pipeline.a.x_f__mutmut_1: listed as equivalent but killed"]


def test_an_equivalent_naming_no_mutant_is_reported_as_stale():
    # a function renamed or removed leaves its entries behind; one outside a MUTATE filter is "not checked"
    _, _, stale = report.tally(STATUSES, {"pipeline.a.x_gone__mutmut_1": "was equivalent",
                                          "pipeline.a.x_f__mutmut_6": "same value"})
    assert stale == ["pipeline.a.x_gone__mutmut_1: listed as equivalent but no such mutant"]


def test_equivalent_files_need_a_reason_for_every_name(tmp_path):
    (tmp_path / "pipeline.a.txt").write_text("pipeline.a.x_f__mutmut_5  # same value\n\n")
    assert report.equivalents(tmp_path) == {"pipeline.a.x_f__mutmut_5": "same value"}
    (tmp_path / "pipeline.b.txt").write_text("pipeline.b.xǁCǁm__mutmut_1\n")
    with pytest.raises(SystemExit, match="pipeline.b.txt:1: .* has no reason"):
        report.equivalents(tmp_path)


def test_mutmut_copies_every_project_package_and_root_file_the_unit_tests_use():
    # mutmut runs tests/unit inside mutants/, which holds only source_paths and also_copy: a
    # package or file missing there fails mutmut's first (stats) run, and no mutant is checked.
    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mutmut"]
    copied = {entry.strip("/").split("/")[0] for entry in config["also_copy"] + config["source_paths"]}
    packages = {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    used = set()
    for test in (root / "tests/unit").glob("*.py"):
        for node in ast.walk(ast.parse(test.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                used.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                used.update(alias.name.split(".")[0] for alias in node.names)
            elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.left, ast.Name)
                  and node.left.id == "REPO" and isinstance(node.right, ast.Constant)):   # REPO / "dvc.yaml"
                used.add(node.right.value.split("/")[0])
    needed = used & (packages | {p.name for p in root.iterdir() if p.is_file()}) - {"tests"}
    assert {"pipeline", "params.yaml", "dvc.yaml"} <= needed and needed <= copied, sorted(needed - copied)
