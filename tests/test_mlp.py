"""The numpy forecaster: decomposition, hand-written gradients (finite differences, autograd), training."""

import shutil
import sys
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, SHARED_DATA, make_repo_copy, run, small_params
from pipeline.errors import StageError

from pipeline.gradcheck import finite_differences, relative_error
from pipeline.models import mlp_forecaster as model
from pipeline.params import Mlp
from pipeline.data import ett
from pipeline.train.forecaster import NORMALISATIONS, ForecastData, baselines, evaluate, fit, fit_auto, \
    learning_rate


def test_moving_average_matches_a_naive_edge_padded_loop():
    x = np.random.default_rng(0).normal(size=(3, 40))
    k, pad = 7, 3
    padded = np.concatenate([np.repeat(x[:, :1], pad, 1), x, np.repeat(x[:, -1:], pad, 1)], 1)
    naive = np.stack([padded[:, t:t + k].mean(1) for t in range(40)], 1)
    assert np.allclose(model.moving_average(x, k), naive, atol=1e-12)


def _problem(window_norm, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: v.astype(np.float64) for k, v in model.init_params(12, 9, 5, rng).items()}
    if window_norm == "revin":   # 3 channels: the 6 rows are 2 windows x 3 channels
        params.update({k: v.astype(np.float64) for k, v in model.init_revin(3).items()})
    for k in params:   # non-trivial biases, trend and affine weights so every path carries gradient
        params[k] = params[k] + rng.normal(0, 0.1, params[k].shape)
    # Offset and scaled inputs: normalisation must matter.
    return params, 2.0 + 3.0 * rng.normal(size=(6, 12)), rng.normal(size=(6, 5))


@pytest.mark.parametrize("window_norm", ["none", "last", "mean", "revin"])
def test_gradients_pass_finite_differences(window_norm):
    params, x, y = _problem(window_norm)
    pred, cache = model.forward(params, x, 5, window_norm)
    _, d_pred = model.mse_grad(pred, y)
    analytic = model.backward(params, cache, d_pred)
    numeric = finite_differences(lambda p: model.mse_grad(model.forward(p, x, 5, window_norm)[0], y)[0], params)
    for name in params:
        assert relative_error(analytic[name], numeric[name]) < 1e-5, name


def test_gradients_agree_with_torch_autograd():
    params, x, y = _problem("none", seed=1)
    pred, cache = model.forward(params, x, 5)
    analytic = model.backward(params, cache, model.mse_grad(pred, y)[1])

    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    xt = torch.tensor(x)
    trend = torch.tensor(model.moving_average(x, 5))   # a fixed linear map of the input
    out = sum(torch.relu(inp @ t[f"{p}_w1"] + t[f"{p}_b1"]) @ t[f"{p}_w2"] + t[f"{p}_b2"]
              for p, inp in (("s", xt - trend), ("t", trend)))
    torch.mean((out - torch.tensor(y)) ** 2).backward()
    for name in params:
        assert relative_error(analytic[name], t[name].grad.numpy()) < 1e-10, name


def test_initialisations_differ_he_and_small():
    params = model.init_params(96, 512, 192, np.random.default_rng(0))
    assert abs(params["s_w1"].std() - np.sqrt(2 / 96)) < 0.01
    assert abs(params["t_w1"].std() - 0.01) < 0.001


def test_fit_learns_a_predictable_series_and_keeps_the_best_weights():
    t = np.arange(3000)
    series = np.sin(2 * np.pi * t / 24)[:, None] + 0.05 * np.random.default_rng(0).normal(size=(3000, 2))
    windows = {s: (np.lib.stride_tricks.sliding_window_view(part, 36, axis=0)[:, :, :24].copy(),
                   np.lib.stride_tricks.sliding_window_view(part, 36, axis=0)[:, :, 24:].copy())
               for s, part in (("train", series[:2000]), ("val", series[2000:2500]), ("test", series[2500:]))}
    data = ForecastData.from_windows(windows, np.float32)
    cfg = Mlp(input_len=24, pred_len=12, kernel=5, hidden=32, lr=0.5, epochs=4, weight_decay=0.0, window_norm="none",
              lr_decay=0.5, residual="none", lr_schedule="step")
    result = fit(data, cfg, seed=0)
    mse = evaluate(result.params, data.x_test, data.y_test, cfg)["mse"]
    assert mse < 0.05, mse   # the series' variance is 0.5: the model must have learnt it
    assert result.best_val_loss == min(r["valid_loss"] for r in result.history)
    assert [r["lr"] for r in result.history[:2]] == [0.5, 0.25]   # halved every epoch


def test_divergence_is_reported_with_the_way_out():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1, 8)) * 100
    windows = {s: (x, x[:, :, :4]) for s in ("train", "val", "test")}
    with pytest.raises(StageError, match=r"mlp@v: training diverged at epoch 1 .* lr 1000000.0; lower this variant's lr"):
        fit(ForecastData.from_windows(windows, np.float32), Mlp(input_len=8, pred_len=4, kernel=3, hidden=8,
                                                                lr=1e6, clip_norm=0.0, window_norm="none",
                                                                residual="none"),
            seed=0, label="mlp@v")


def test_a_diverging_stage_ends_with_one_message_and_exit_2(tmp_path):
    """The stage, as DVC runs it: the user's lr is the cause, so no traceback, exit code 2."""
    params = small_params()
    params["mlp"]["defaults"].update(input_len=24, pred_len=24, kernel=5, hidden=8, epochs=1, seeds=1,
                                     window_norm="none", clip_norm=0.0)
    params["mlp"]["variants"]["hot"] = {"lr": 1e30}
    repo = make_repo_copy(tmp_path, params)
    (repo / "data" / "raw").mkdir(parents=True)
    shutil.copy(SHARED_DATA / "ETTh1.csv", repo / "data" / "raw" / "ETTh1.csv")
    result = run([sys.executable, "-m", "stages.mlp", "hot"], repo, check=False, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "mlp@hot" in errors[0] and "lr 1e+30" in errors[0], result.stderr[-3000:]


def test_the_schema_defaults_are_the_params_yaml_defaults():
    """Deleting a key from params.yaml must keep the documented default, not change the experiment."""
    documented = yaml.safe_load((REPO / "params.yaml").read_text())["mlp"]["defaults"]
    assert asdict(Mlp()) == documented


def test_revin_is_invariant_to_each_windows_offset_and_scale():
    """The RevIN model's prediction moves with the input window: y(a x + c) = a y(x) + c per row."""
    params, x, _ = _problem("revin", seed=2)
    pred = model.forward(params, x, 5, "revin")[0]
    scale, shift = np.array([2.0, 0.5, 3.0] * 2)[:, None], np.arange(6.0)[:, None]
    moved = model.forward(params, x * scale + shift, 5, "revin")[0]
    assert np.allclose(moved, pred * scale + shift, atol=1e-4)


def test_predict_chunks_whole_windows_for_revin():
    params, x, _ = _problem("revin", seed=3)
    x = np.tile(x, (5, 1))   # 30 rows = 10 windows of 3 channels
    assert np.allclose(model.predict(params, x, 5, "revin", chunk=8), model.forward(params, x, 5, "revin")[0])


def _sine_data(n=1200, channels=2, level=None, seed=0):
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    series = np.sin(2 * np.pi * t / 24)[:, None] + 0.05 * rng.normal(size=(n, channels))
    if level is not None:
        series = series + level[:, None]
    cut = [int(n * 0.6), int(n * 0.8)]
    view = lambda part: np.lib.stride_tricks.sliding_window_view(part, 36, axis=0)   # noqa: E731
    windows = {s: (view(part)[:, :, :24].copy(), view(part)[:, :, 24:].copy())
               for s, part in (("train", series[:cut[0]]), ("val", series[cut[0]:cut[1]]), ("test", series[cut[1]:]))}
    return ForecastData.from_windows(windows, np.float32)


def test_auto_keeps_the_lowest_validation_loss_and_never_reads_test():
    data = _sine_data()
    data.x_test = data.y_test = None   # the choice must not touch the test split
    cfg = Mlp(input_len=24, pred_len=12, kernel=5, hidden=16, lr=0.5, epochs=2, weight_decay=0.0, window_norm="auto",
              residual="none")
    chosen, results = fit_auto(data, cfg, seed=0)
    assert set(results) == set(NORMALISATIONS)
    assert results[chosen].best_val_loss == min(r.best_val_loss for r in results.values())
    assert all("test_loss" not in row for r in results.values() for row in r.history)
    assert "rv_w" in results["revin"].params and "rv_w" not in results["none"].params


def test_auto_picks_a_window_normalisation_when_the_level_drifts():
    """A level that keeps rising past the train range: only per-window normalisation can follow it."""
    n = 1200
    data = _sine_data(n, level=np.linspace(0, 12, n))
    cfg = Mlp(input_len=24, pred_len=12, kernel=5, hidden=16, lr=0.5, epochs=3, weight_decay=0.0, window_norm="auto",
              residual="none")
    chosen, results = fit_auto(data, cfg, seed=0)
    assert chosen != "none", {k: r.best_val_loss for k, r in results.items()}
    assert results["none"].best_val_loss > 2 * results[chosen].best_val_loss


def test_a_fixed_window_norm_trains_only_that_one():
    data = _sine_data(600)
    cfg = Mlp(input_len=24, pred_len=12, kernel=5, hidden=8, epochs=1, window_norm="revin", residual="none")
    chosen, results = fit_auto(data, cfg, seed=0)
    assert chosen == "revin" and list(results) == ["revin"]


def _hand_data():
    """Two test rows (L=3, P=2) whose naive forecasts are worked out by hand below."""
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(20, 3))
    exact = lambda x: np.stack([x.sum(1), x[:, 0] - x[:, 2] + 1], 1)   # noqa: E731  a linear map plus bias
    x_test = np.array([[1.0, 2.0, 3.0], [4.0, 4.0, 1.0]])
    y_test = np.array([[3.0, 5.0], [0.0, 1.0]])
    return ForecastData(x_train, exact(x_train), x_train, exact(x_train), x_test, y_test, n_channels=1), exact


def test_baselines_on_a_series_worked_out_by_hand():
    data, exact = _hand_data()
    got = baselines(data)["test"]
    # repeat-last [[3, 3], [1, 1]]: errors 0, -2, 1, 0 -> MSE 5/4, MAE 3/4
    assert got["repeat_last"] == pytest.approx({"mse": 1.25, "mae": 0.75})
    # window mean [[2, 2], [3, 3]]: errors -1, -3, 3, 2 -> MSE 23/4, MAE 9/4
    assert got["window_mean"] == pytest.approx({"mse": 5.75, "mae": 2.25})
    # least squares recovers the exact linear map from the train rows: its test error is that map's
    err = exact(data.x_test) - data.y_test   # [[6, -1], [9, 4]] - y = [[3, -6], [9, 3]]
    assert got["linear"] == pytest.approx({"mse": float(np.mean(err ** 2)), "mae": float(np.mean(abs(err)))})
    assert got["linear"] == pytest.approx({"mse": (9 + 36 + 81 + 9) / 4, "mae": (3 + 6 + 9 + 3) / 4})


@pytest.mark.parametrize("norm", ["none", "last", "mean"])
def test_the_ridge_residual_starts_from_its_base_and_never_ends_worse_than_the_naive_forecast(norm):
    data = _sine_data(level=np.linspace(0, 3, 1200))
    cfg = Mlp(input_len=24, pred_len=12, kernel=5, hidden=16, lr=0.5, epochs=2, window_norm=norm, residual="linear")
    stuck = fit(data, replace(cfg, lr=1e-12), seed=0)   # no learning: epoch 0, the base forecast, is kept
    base_val = stuck.base.val_loss[stuck.base.ridge]
    assert stuck.best_epoch == 0 and stuck.best_val_loss == pytest.approx(base_val, rel=1e-5)
    assert evaluate(stuck.params, data.x_val, data.y_val, cfg)["mse"] == pytest.approx(base_val, rel=1e-5)
    naive = baselines(data, ("val",))["val"]
    own_naive = {"last": "repeat_last", "mean": "window_mean"}.get(norm)
    if own_naive:   # the zero map under last/mean is that naive forecast, and it is a candidate
        assert stuck.base.val_loss[float("inf")] == pytest.approx(naive[own_naive]["mse"], rel=1e-5)
        assert stuck.best_val_loss <= naive[own_naive]["mse"] * (1 + 1e-6)
    assert fit(data, cfg, seed=0).best_val_loss <= stuck.best_val_loss


def test_auto_with_the_residual_tries_none_last_and_mean():
    data = _sine_data(600)
    cfg = Mlp(input_len=24, pred_len=12, kernel=5, hidden=8, epochs=1, window_norm="auto", residual="linear")
    chosen, results = fit_auto(data, cfg, seed=0)
    assert list(results) == ["none", "last", "mean"] and all(r.base is not None for r in results.values())
    assert results[chosen].best_val_loss == min(r.best_val_loss for r in results.values())


def test_residual_linear_refuses_revin():
    with pytest.raises(ValueError, match="residual: linear needs window_norm auto, none, last or mean"):
        Mlp(window_norm="revin", residual="linear")
    Mlp(window_norm="last", residual="linear")   # the base follows the normalised window


def test_the_cosine_schedule_anneals_from_lr_towards_zero():
    cfg = Mlp(lr=2.0, epochs=4, lr_schedule="cosine")
    assert [learning_rate(cfg, e) for e in (1, 2, 3, 4)] == pytest.approx([2.0, 2.0 * (0.5 + 0.5 ** 1.5), 1.0,
                                                                           2.0 * (0.5 - 0.5 ** 1.5)])
    assert [learning_rate(replace(cfg, lr_schedule="step"), e) for e in (1, 2, 3)] == [2.0, 1.0, 0.5]


def test_the_stage_details_hold_the_naive_baselines_of_its_test_windows_and_the_chosen_ridge(tmp_path):
    """metrics/mlp/<variant>.details.json and MLflow hold the baselines and the residual's ridge
    (the headline: the test MSE alone)."""
    params = small_params()
    params["mlp"]["defaults"].update(input_len=24, pred_len=24, kernel=5, hidden=8, epochs=1, seeds=1,
                                     window_norm="none")   # the default residual: a ridge base, then the MLPs
    repo = make_repo_copy(tmp_path, params)
    (repo / "data" / "raw").mkdir(parents=True)
    shutil.copy(SHARED_DATA / "ETTh1.csv", repo / "data" / "raw" / "ETTh1.csv")
    run([sys.executable, "-m", "stages.mlp", "default"], repo, timeout=900)
    headline = json.loads((repo / "metrics" / "mlp" / "default.details.json").read_text())
    assert json.loads((repo / "metrics" / "mlp" / "default.json").read_text()) == {"default": headline["test_mse"]}
    splits = ett.standardised_splits(ett.load_csv(SHARED_DATA / "ETTh1.csv"), "ETTh1", 24, pred_len=24)
    x, y = (a.reshape(-1, 24) for a in ett.windows(splits.test, 24, 24))
    last = np.mean((x[:, -1:] - y) ** 2)
    mean = np.mean((x.mean(1, keepdims=True) - y) ** 2)
    assert headline["repeat_last_mse"] == pytest.approx(last, rel=1e-5)
    assert headline["window_mean_mse"] == pytest.approx(mean, rel=1e-5)
    assert headline["skill"] == pytest.approx(headline["test_mse"] / min(last, mean), rel=1e-5)
    assert {"linear_mse", "linear_mae", "repeat_last_mae", "window_mean_mae"} <= set(headline)
    tried = headline["ridge_val_loss"]   # every strength of mlp.defaults.ridge and inf, on validation
    assert "inf" in tried and headline["ridge"] == min(tried, key=tried.get)
    import mlflow
    from pipeline.tracking import EXPERIMENTS
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    run_metrics = mlflow.search_runs(experiment_names=[EXPERIMENTS["mlp"]]).iloc[0]
    assert run_metrics["metrics.repeat_last_mse"] == pytest.approx(last, rel=1e-5)
