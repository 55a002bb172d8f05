"""One schema for params.yaml: each kind of bad value gets one message naming key and allowed values."""

import copy
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
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
    assert params.cnn_experiment("rotation_hflip").augment == ["rotation", "hflip"]
    assert params.cnn_experiment("finetune").pretrained is True


BAD = [
    ("mlp.defaults.hidden", "512", "mlp.defaults.hidden: expected an integer"),
    ("mlp.defaults.lr", -1.0, "mlp.defaults.lr: -1.0 must be positive"),
    ("mlp.defaults.kernel", 24, "must be odd"),
    ("mlp.defaults.hiden", 10, "mlp.defaults.hiden: unknown key; allowed keys"),
    ("mlp.variants.h1024", {"hidden": 0}, "mlp.variants.h1024.hidden"),
    ("cnn.defaults.model", "vgg16", "'vgg16' is not allowed; choose one of: resnet18, densenet121"),
    ("cnn.ablations.rotation", {"augment": ["jitter"]}, "choose one of: hflip, rotation"),
    ("cnn.defaults.scheduler", "plateau", "choose one of: cosine, step, none"),
    ("cnn.defaults.pretrained", "yes", "expected true or false"),
    ("backprop.classes", 1, "backprop.classes: 1 must be 2 or 3"),
    ("backprop.lr", 0, "backprop.lr: 0.0 must be positive"),
    ("base.device", "tpu", "choose one of: auto, cpu, cuda"),
    ("data.images.source", "web", "choose one of: medmnist, file, synthetic"),
    ("data.images.size", 100, "not a MedMNIST size"),
    ("report.allow_mising", True, "report.allow_mising: unknown key"),
    ("cnn.experiment", {}, "cnn.experiment: unknown key"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[b[0] for b in BAD])
def test_bad_params_name_the_key_and_the_allowed_values(path, value, message):
    with pytest.raises(P.ParamsError, match=None) as caught:
        P.parse(with_change(path, value))
    assert message in str(caught.value)


def test_standalone_check_command(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(with_change("mlp.defaults.epochs", 0)))
    result = subprocess.run([sys.executable, "-m", "pipeline.params", str(bad)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "mlp.defaults.epochs: must be at least 1" in result.stderr
    ok = subprocess.run([sys.executable, "-m", "pipeline.params"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
