"""Part 1: the hand-derived gradients are proven (and a broken one is caught); the stage trains."""

import json
import shutil

import numpy as np
import pytest
import yaml

from conftest import SHARED_DATA, dvc, make_repo_copy, run, small_params
from pipeline.data import ett
from pipeline.gradcheck import check_backprop_net
from pipeline.models import backprop_net as net


def _batch(m, window, features, classes, seed=0):
    rng = np.random.default_rng(seed)
    params = net.init_params(window, features, classes, rng)
    for key in ("b1", "b2", "b3"):
        params[key] = rng.normal(0, 0.1, params[key].shape)
    return params, rng.normal(size=(m, window, features)), np.eye(classes)[rng.integers(0, classes, m)]


@pytest.mark.parametrize("m,window,features,classes", [(3, 6, 7, 3), (4, 5, 5, 2), (2, 9, 3, 4), (1, 2, 6, 2)])
def test_gradients_pass_both_checks(m, window, features, classes):
    errors = check_backprop_net(*_batch(m, window, features, classes))
    assert max(errors["finite_differences"].values()) < 1e-5, errors
    assert max(errors["autograd"].values()) < 1e-8, errors


def test_softmax_jacobian_route_equals_the_simplification():
    params, x, y = _batch(5, 6, 4, 3)
    y_hat, cache = net.forward(params, x)
    d_yhat = -y / y_hat / len(y)
    assert np.allclose(np.einsum("mij,mj->mi", net.softmax_jacobian(y_hat), d_yhat), (y_hat - y) / len(y))


def _without_mean_factor(params, cache, y):
    """A deliberately wrong backward pass: forgets the 1/D of the mean over features."""
    grads = net.backward(params, cache, y)
    d = cache["a2"].shape[2]
    for name in ("theta1", "b1", "theta2", "b2"):
        grads[name] = grads[name] * d
    return grads


def _without_relu_mask(params, cache, y):
    """Another broken one: treats the first ReLU as the identity."""
    saved = cache["a1"]
    cache = {**cache, "a1": np.abs(saved) + 1}
    return net.backward(params, cache, y)


@pytest.mark.parametrize("broken", [_without_mean_factor, _without_relu_mask])
def test_a_broken_backward_pass_is_caught(broken):
    params, x, y = _batch(4, 6, 5, 3, seed=3)
    errors = check_backprop_net(params, x, y, backward_fn=broken)
    assert max(errors["finite_differences"].values()) > 1e-3
    assert max(errors["autograd"].values()) > 1e-3


def test_direction_labels_are_balanced_on_every_split():
    frame = ett.load_csv(SHARED_DATA / "ETTh1.csv")
    splits = ett.standardised_splits(frame, "ETTh1", 24)
    for split in ("train", "val", "test"):
        _, labels = ett.direction_labels(getattr(splits, split), 6, 24, 24, 0.5, 3)
        assert np.bincount(labels, minlength=3).min() / len(labels) > 0.2


@pytest.mark.parametrize("key,value,message", [
    ("window", 5000, "exceeds the 2880 rows of ETTh1's validation period"),
    ("classes", 1, "backprop.classes: 1 is not allowed; choose one of: 2, 3"),
    ("lr", -0.1, "backprop.lr: -0.1 must be positive"),
])
def test_bad_params_stop_before_any_work(tmp_path, key, value, message):
    params = small_params()
    params["backprop"][key] = value
    repo = make_repo_copy(tmp_path, params)
    (repo / "data/raw").mkdir(parents=True)
    shutil.copy(SHARED_DATA / "ETTh1.csv", repo / "data/raw/ETTh1.csv")
    result = run(["python", "-m", "stages.backprop"], repo, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (repo / "metrics/backprop.json").exists()


def test_a_csv_without_ot_runs_through_dvc_repro_backprop_on_its_target_column(tmp_path):
    """data.ett.target is read by backprop (and declared in dvc.yaml): any forecasting CSV works."""
    frame = ett.load_csv(SHARED_DATA / "ETTh1.csv").iloc[:3000]
    frame = frame.rename(columns={"OT": "load"})[["date", "load", "HUFL", "MUFL"]]
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    frame.to_csv(mirror / "grid.csv", index=False)
    params = small_params()
    params["data"]["ett"].update(name="grid", target="load", pins={}, url="http://127.0.0.1:9/{name}.csv")
    repo = make_repo_copy(tmp_path / "repo", params)
    dvc(repo, "repro", "backprop", DATA_MIRROR=mirror)
    metrics = json.loads((repo / "metrics/backprop.json").read_text())
    details = json.loads((repo / "metrics/backprop.details.json").read_text())
    assert 0 <= details["test_accuracy"] == metrics["backprop"] <= 1
    assert details["n_test"] == 24 + 600 - 24 - 24 + 1   # the window before + the 600 test rows (70/10/20)
    stage = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["backprop"]
    assert stage["params"]["params.yaml"]["data.ett.target"] == "load"


@pytest.mark.parametrize("stage,headline", [(["stages.backprop"], "metrics/backprop.json"),
                                            (["stages.mlp", "default"], "metrics/mlp/default.json")])
def test_an_edited_pinned_csv_is_refused_before_training(tmp_path, stage, headline):
    params = small_params()
    repo = make_repo_copy(tmp_path, params)
    (repo / "data/raw").mkdir(parents=True)
    data = (SHARED_DATA / "ETTh1.csv").read_bytes()
    (repo / "data/raw/ETTh1.csv").write_bytes(data.replace(b"5.827", b"5.828", 1))
    result = run(["python", "-m", *stage], repo, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "its pin data.ett.pins.ETTh1" in result.stderr and "dvc repro download_ett" in result.stderr
    assert not (repo / headline).exists()
