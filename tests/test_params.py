"""One schema for params.yaml: each kind of bad value gets one message naming key, value and allowed
values; params.yaml reads the way DVC writes it (`-S key=1e-5` becomes `1e-05`)."""

import copy
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from conftest import REPO, dvc, make_repo_copy, small_params
from pipeline import params as P

GOOD = yaml.safe_load((REPO / "params.yaml").read_text())


def with_change(path: str, value):
    raw = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


def test_repository_params_are_valid():
    params = P.parse(copy.deepcopy(GOOD))
    assert params.mlp_variant("default").hidden == 512
    assert params.mlp_variant("assignment").lr == 0.05 and params.mlp_variant("assignment").hidden == 512
    assert params.cnn_experiment("rotation_hflip").augment == ["rotation", "hflip"]
    assert params.cnn_experiment("finetune").pretrained is True
    assert params.cnn_experiments()[:3] == ["resnet18", "densenet121", "finetune"]
    assert params.data.ett.pins["ETTh2"].startswith("a3dc2c59")


BAD = [
    ("mlp.defaults.hidden", "512", "mlp.defaults.hidden: expected an integer, got '512' (drop the quotes)"),
    ("mlp.defaults.lr", -1.0, "mlp.defaults.lr: -1.0 must be positive"),
    ("mlp.defaults.kernel", 24, "mlp.defaults.kernel: 24 must be odd"),
    ("mlp.defaults.hiden", 10, "mlp.defaults.hiden: unknown key; allowed keys of mlp.defaults: batch_size, clip_norm,"),
    ("mlp.defaults.seeds", 0, "mlp.defaults.seeds: 0 must be at least 1"),
    ("mlp.defaults.window_norm", "zscore", "choose one of: auto, none, last, mean, revin"),
    ("mlp.variants.h1024", {"hidden": 0}, "mlp.variants.h1024.hidden: 0 must be at least 1"),
    ("mlp.variants.lr_div5", {"lr": "0.4"}, "mlp.variants.lr_div5.lr: expected a number, got '0.4' (drop the quotes)"),
    ("mlp.variants.h1024", 5, "mlp.variants.h1024: expected a mapping, got 5"),
    ("cnn.defaults.model", "vgg16", "cnn.defaults.model: 'vgg16' is not allowed; choose one of: resnet18, densenet121"),
    ("cnn.ablations.rotation", {"augment": ["jitter"]},
     "cnn.ablations.rotation.augment[0]: 'jitter' is not allowed; choose one of: hflip, rotation"),
    ("cnn.ablations.hflip", {"hflip": True}, "cnn.ablations.hflip.hflip: unknown key; allowed keys of cnn.ablations.hflip:"),
    ("cnn.defaults.scheduler", "plateau", "choose one of: cosine, step, none"),
    ("cnn.defaults.pretrained", "yes", "cnn.defaults.pretrained: expected true or false, got 'yes'"),
    ("cnn.defaults.devices", 0, "cnn.defaults.devices: 0 must be at least 1"),
    ("cnn.defaults.upsample_to", 4, "cnn.defaults.upsample_to: 4 must be 0 (no resizing) or at least 8"),
    ("cnn.defaults.rotation_interpolation", "bicubic", "choose one of: nearest, bilinear"),
    ("backprop.classes", 1, "backprop.classes: 1 is not allowed; choose one of: 2, 3"),
    ("backprop.lr", 0, "backprop.lr: 0 must be positive"),
    ("base.device", "tpu", "base.device: 'tpu' is not allowed; choose one of: auto, cpu, cuda"),
    ("data.images.source", "web", "choose one of: medmnist, file, synthetic"),
    ("data.images.size", 100, "data.images.size: 100 is not a MedMNIST size (28, 64, 128, 224)"),
    ("data.images.name", "organmnist3d", "data.images.name: 'organmnist3d' is not a 2-D MedMNIST flag; choose one of: "
                                         "pathmnist, chestmnist,"),
    ("data.images.task", "regression", "data.images.task: 'regression' is not allowed; choose one of: '', multi-class, "
                                       "'multi-label, binary-class', binary-class, ordinal-regression"),
    ("data.images.source", "file", "data.images.path: required with source: file"),
    ("data.ett.pins", {"ETTh1": "f18de3"}, "data.ett.pins.ETTh1: 'f18de3' is not a sha256 (64 lowercase hex digits)"),
    ("data.ett.pins", ["f18de3"], "data.ett.pins: expected a mapping, got ['f18de3']"),
    ("data.ett.target", 10, "data.ett.target: expected a string, got 10 (put it in quotes)"),
    ("report.allow_mising", True, "report.allow_mising: unknown key; allowed keys of report: allow_missing"),
    ("cnn.experiment", {}, "cnn.experiment: unknown key; allowed keys of cnn: ablations, defaults, experiments"),
    ("colour", 1, "colour: unknown key; allowed keys of params.yaml: backprop, base, cnn, data, features, mlp, report"),
    # Keys of older params files say where they went.
    ("data.pathmnist", {"size": 64},
     "params.yaml: data.pathmnist was renamed to data.images (same keys plus name/path/task/synthetic_seed)"),
    ("data.ett.sha256", "f18de3", "params.yaml: data.ett.sha256 was replaced by data.ett.pins: {<file name>: <sha256>}"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_params_name_the_key_and_the_allowed_values(path, value, message):
    with pytest.raises(P.ParamsError) as caught:
        P.parse(with_change(path, value))
    assert message in str(caught.value)


def test_every_problem_is_reported_on_its_own_line():
    raw = with_change("mlp.defaults.hidden", "512")
    raw["cnn"]["defaults"]["epochs"] = True
    raw["cnn"]["ablations"]["rotation"]["augment"] = ["rotation", "blur"]
    with pytest.raises(P.ParamsError) as caught:
        P.parse(raw)
    lines = str(caught.value).splitlines()
    assert lines == ["params.yaml: mlp.defaults.hidden: expected an integer, got '512' (drop the quotes)",
                     "params.yaml: cnn.defaults.epochs: expected an integer, got True"]
    raw["mlp"]["defaults"]["hidden"], raw["cnn"]["defaults"]["epochs"] = 512, 10   # then the variants are checked
    with pytest.raises(P.ParamsError, match=r"cnn.ablations.rotation.augment\[1\]: 'blur' is not allowed"):
        P.parse(raw)


def test_missing_section_and_unknown_variant():
    raw = copy.deepcopy(GOOD)
    del raw["cnn"]["ablations"]
    with pytest.raises(P.ParamsError, match="cnn.ablations: missing"):
        P.parse(raw)
    with pytest.raises(P.ParamsError, match="params.yaml: \\(top level\\): expected a mapping of sections"):
        P.parse(None)
    with pytest.raises(P.ParamsError, match="mlp: no entry 'h4096'; defined: default, lr_div5"):
        P.parse(copy.deepcopy(GOOD)).mlp_variant("h4096")


def test_image_sources():
    synthetic = P.parse(with_change("data.images", {"source": "synthetic", "size": 32})).data.images
    assert synthetic.size == 32 and synthetic.name == "pathmnist"
    own = P.parse(with_change("data.images", {"source": "file", "name": "digits", "path": "d.npz",
                                              "task": "multi-label, binary-class"})).data.images
    assert (own.name, own.task) == ("digits", "multi-label, binary-class")   # any label for one's own file


def test_flags_and_tasks_match_medmnist():
    # medmnist/info.py alone (the package's __init__ imports torch).
    spec = importlib.util.spec_from_file_location(
        "medmnist_info", Path(importlib.util.find_spec("medmnist").submodule_search_locations[0]) / "info.py")
    info = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(info)
    flat = {flag: entry for flag, entry in info.INFO.items() if not flag.endswith("3d")}
    assert P.MEDMNIST_FLAGS == tuple(flat)
    assert set(P.MEDMNIST_TASKS) == {entry["task"] for entry in flat.values()}


def test_types_are_not_coerced():
    params = P.parse(with_change("cnn.defaults.lr", 2))
    lr = params.cnn_experiment("resnet18").lr
    assert lr == 2.0 and type(lr) is float                       # a float key takes ints
    assert type(params.mlp_variant("default").epochs) is int
    for bad in (10.0, True, "10"):
        with pytest.raises(P.ParamsError, match="cnn.defaults.epochs: expected an integer"):
            P.parse(with_change("cnn.defaults.epochs", bad))
    with pytest.raises(P.ParamsError, match="mlp.defaults.lr: expected a finite number, got nan"):
        P.parse(with_change("mlp.defaults.lr", float("nan")))


@pytest.mark.parametrize("text,value", [("1e-05", 1e-5), ("5E-4", 5e-4), ("1.0e+3", 1000.0), ("1e5", 1e5),
                                        ("+1e-5", 1e-5), ("0.5", 0.5), (".5", 0.5), ("2", 2), ("1_000", 1000),
                                        ("0x1F", 31), ("yes", "yes"), ("on", "on"), ("1e", "1e"), ("e5", "e5"),
                                        ("'1e-05'", "1e-05"), (".inf", float("inf")), ("true", True)])
def test_params_yaml_is_read_as_yaml_1_2_like_dvc_reads_it(text, value):
    from dvc.utils.serialize import parse_yaml

    loaded = P.load_yaml(f"k: {text}")["k"]
    assert loaded == value and type(loaded) is type(value)
    assert loaded == parse_yaml(f"k: {text}", "params.yaml")["k"]   # what DVC's -S and exp show see


def _dvc_set(tmp_path, *overrides: str) -> Path:
    """params.yaml after DVC's own `-S` writer (the code `dvc exp run -S` calls) applied the overrides."""
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    apply_overrides(path, list(overrides))
    return path


FLOAT_KEYS = ["mlp.defaults.weight_decay", "mlp.defaults.lr", "cnn.defaults.lr", "backprop.lr"]
SWEEP = [("1e-5", 1e-5, "1e-05"), ("5e-4", 5e-4, "0.0005"), ("0.5", 0.5, "0.5"), ("2", 2.0, "2")]


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_dvc_sweep_values_load_as_floats(tmp_path, key):
    for given, expected, written in SWEEP:
        path = _dvc_set(tmp_path, f"{key}={given}")
        assert f"{key.rsplit('.', 1)[1]}: {written}\n" in path.read_text()     # what DVC really writes
        params = P.load(path)
        section, _, name = key.partition(".")
        if section == "mlp":
            value = getattr(params.mlp_variant("default"), name.split(".")[1])
        elif section == "cnn":
            value = getattr(params.cnn_experiment("resnet18"), name.split(".")[1])
        else:
            value = getattr(params.backprop, name)
        assert value == expected and type(value) is float, (key, given)


def test_dvc_int_and_string_edge_cases(tmp_path):
    assert P.load(_dvc_set(tmp_path, "cnn.defaults.epochs=10")).cnn_experiment("resnet18").epochs == 10
    quoted = _dvc_set(tmp_path, "cnn.defaults.epochs='10'")
    assert "epochs: '10'" in quoted.read_text()
    with pytest.raises(P.ParamsError, match=r"cnn.defaults.epochs: expected an integer, got '10' \(drop the quotes\)"):
        P.load(quoted)
    assert P.load(_dvc_set(tmp_path, "data.ett.target='10'")).data.ett.target == "10"
    with pytest.raises(P.ParamsError, match=r"data.ett.target: expected a string, got 10 \(put it in quotes\)"):
        P.load(_dvc_set(tmp_path, "data.ett.target=10"))
    assert P.load(_dvc_set(tmp_path, "data.ett.name=ETTh2")).data.ett.name == "ETTh2"


def test_standalone_check_command(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(with_change("mlp.defaults.epochs", 0)))
    result = subprocess.run([sys.executable, "-m", "pipeline.params", str(bad)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "mlp.defaults.epochs: 0 must be at least 1" in result.stderr
    ok = subprocess.run([sys.executable, "-m", "pipeline.params"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_dvc_exp_run_with_an_exponent_sweep_value(tmp_path):
    """The reported failure: every stage loads all of params.yaml, so `-S ...=1e-5` broke every
    stage; the cheapest one (fetching ETTh1 from the mirror) shows it."""
    repo = make_repo_copy(tmp_path, small_params())
    start = time.monotonic()
    result = dvc(repo, "exp", "run", "-S", "mlp.defaults.weight_decay=1e-5", "download_ett", timeout=300)
    print(f"dvc exp run download_ett: {time.monotonic() - start:.1f} s")
    assert "weight_decay: 1e-05" in (repo / "params.yaml").read_text()
    assert "Running stage 'download_ett'" in result.stdout and (repo / "data" / "raw" / "ETTh1.csv").exists()


# The schema is the one source of defaults, and params.yaml writes each of them out: deleting a key
# keeps the documented value. One case per section, so a mismatch names its owner's section.
SECTIONS = {"base": P.Base, "data": P.Data, "backprop": P.Backprop, "mlp.defaults": P.Mlp, "cnn.defaults": P.Cnn,
            "features": P.Features, "report": P.Report}


@pytest.mark.parametrize("section", SECTIONS)
def test_every_schema_default_equals_params_yaml(section):
    from dataclasses import asdict

    schema = asdict(P._validate(SECTIONS[section], {}))   # every field at its default
    written = GOOD
    for key in section.split("."):
        written = written[key]

    def differences(defaults, values, prefix):
        for key, default in defaults.items():
            value = values.get(key, "(absent)") if isinstance(values, dict) else "(absent)"
            if isinstance(default, dict) and default and isinstance(value, dict):
                yield from differences(default, value, f"{prefix}.{key}")
            elif default != value:
                yield f"{prefix}.{key}: schema {default!r}, params.yaml {value!r}"

    assert list(differences(schema, written, section)) == []


@pytest.mark.parametrize("path,value,message", [
    ("base.seed", 2**32, "base.seed: 4294967296 must be at most 4294967295"),
    ("cnn.defaults.epochs", 10**9, "cnn.defaults.epochs: 1000000000 must be at most 10000"),
    ("cnn.defaults.batch_size", 10**7, "cnn.defaults.batch_size: 10000000 must be at most 65536"),
    ("cnn.defaults.eval_batch_size", 10**7, "cnn.defaults.eval_batch_size: 10000000 must be at most 65536"),
    ("cnn.defaults.devices", 10**4, "cnn.defaults.devices: 10000 must be at most 1024"),
    ("cnn.defaults.upsample_to", 10**5, "cnn.defaults.upsample_to: 100000 must be at most 1024"),
    ("cnn.defaults.step_size", 10**9, "cnn.defaults.step_size: 1000000000 must be at most 10000"),
    ("cnn.defaults.lr", 1e3, "cnn.defaults.lr: 1000.0 must be at most 10"),
    ("cnn.defaults.max_steps_per_epoch", 10**12, "cnn.defaults.max_steps_per_epoch: 1000000000000 must be at most"),
    ("features.image_index", 10**12, "features.image_index: 1000000000000 must be at most 10000000"),
    ("features.channel", 10**6, "features.channel: 1000000 must be at most 4095"),
], ids=lambda v: str(v)[:40])
def test_values_no_one_could_mean_are_refused_before_any_work(path, value, message):
    with pytest.raises(P.ParamsError) as caught:
        P.parse(with_change(path, value))
    assert message in str(caught.value)
    assert P.parse(with_change(path, getattr(_bound(path), "le")))   # the bound itself is allowed


def _bound(path: str):
    """The `le` metadata of a schema field (e.g. Field(..., le=10000))."""
    section, key = path.rsplit(".", 1)
    cls = SECTIONS[section]
    return next(m for m in cls.__pydantic_fields__[key].metadata if hasattr(m, "le"))
