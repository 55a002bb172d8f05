"""The numpy forecaster: decomposition, hand-written gradients (finite differences, autograd), training."""

import numpy as np
import pytest
import torch

from pipeline.gradcheck import finite_differences, relative_error
from pipeline.models import mlp_forecaster as model
from pipeline.params import Mlp
from pipeline.train.forecaster import ForecastData, evaluate, fit


def test_moving_average_matches_a_naive_edge_padded_loop():
    x = np.random.default_rng(0).normal(size=(3, 40))
    k, pad = 7, 3
    padded = np.concatenate([np.repeat(x[:, :1], pad, 1), x, np.repeat(x[:, -1:], pad, 1)], 1)
    naive = np.stack([padded[:, t:t + k].mean(1) for t in range(40)], 1)
    assert np.allclose(model.moving_average(x, k), naive, atol=1e-12)


def _problem(window_norm, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: v.astype(np.float64) for k, v in model.init_params(12, 9, 5, rng).items()}
    for k in params:   # non-trivial biases and trend weights so every path carries gradient
        params[k] = params[k] + rng.normal(0, 0.1, params[k].shape)
    return params, rng.normal(size=(6, 12)), rng.normal(size=(6, 5))


@pytest.mark.parametrize("window_norm", ["none", "last", "mean"])
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
    cfg = Mlp(input_len=24, pred_len=12, kernel=5, hidden=32, lr=0.5, epochs=4, weight_decay=0.0)
    result = fit(data, cfg, seed=0)
    mse = evaluate(result.params, data.x_test, data.y_test, cfg)["mse"]
    assert mse < 0.05, mse   # the series' variance is 0.5: the model must have learnt it
    assert result.best_val_loss == min(r["valid_loss"] for r in result.history)
    assert [r["lr"] for r in result.history[:2]] == [0.5, 0.25]   # halved every epoch


def test_divergence_is_reported_with_the_way_out():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1, 8)) * 100
    windows = {s: (x, x[:, :, :4]) for s in ("train", "val", "test")}
    with pytest.raises(FloatingPointError, match="lower mlp.lr"):
        fit(ForecastData.from_windows(windows, np.float32), Mlp(input_len=8, pred_len=4, kernel=3, hidden=8,
                                                                lr=1e6, clip_norm=0.0), seed=0)
