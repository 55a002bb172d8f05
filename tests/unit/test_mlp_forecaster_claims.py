"""Claims about the numpy decomposition forecaster (pipeline/models/mlp_forecaster.py): the moving
average against a direct edge-padded average, its matrix against the convolution, the forward pass
as trend MLP + seasonal MLP, every window normalisation by hand (RevIN with its affine map), the
hand-written backward pass against central finite differences for every parameter, mse_grad, the
chunked predict, the initialisations. Tiny float64 models: everything runs in milliseconds."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.models import mlp_forecaster as model

L, H, P, K = 8, 4, 3, 5     # kernel 5: its moving-average matrix is not symmetric
EPS = 1e-5   # RevIN's epsilon, written out


def _direct_moving_average(x: np.ndarray, kernel: int) -> np.ndarray:
    """Mean of the `kernel` values centred on each step, indices outside the row clamped to its ends."""
    pad = (kernel - 1) // 2
    n = x.shape[-1]
    out = np.zeros(x.shape, dtype=np.float64)
    for t in range(n):
        idx = np.clip(np.arange(t - pad, t + pad + 1), 0, n - 1)
        out[..., t] = x[..., idx].astype(np.float64).mean(axis=-1)
    return out


def _params(seed=0, channels=None, dtype=np.float64) -> dict:
    """Random, non-trivial parameters (biases and RevIN's affine map away from their start)."""
    rng = np.random.default_rng(seed)
    params = model.init_params(L, H, P, rng, np.float64)
    if channels:
        params.update(model.init_revin(channels, np.float64))
    return {k: (v + rng.normal(0, 0.3, v.shape)).astype(dtype) for k, v in params.items()}


def _mlp(params, part, inputs):
    hidden = np.maximum(inputs @ params[f"{part}_w1"] + params[f"{part}_b1"], 0.0)
    return hidden @ params[f"{part}_w2"] + params[f"{part}_b2"]


def _decomposed(params, u):
    trend = _direct_moving_average(u, K)
    return _mlp(params, "s", u - trend) + _mlp(params, "t", trend)


def _revin_by_hand(params, x):
    """Row r is channel r % C: standardise the row, y = (MLPs(x_hat w + b) - b) * std / (w + eps^2) + mean."""
    channels = len(params["rv_w"])
    out = np.zeros((len(x), P))
    for r, row in enumerate(x):
        w, b = params["rv_w"][r % channels], params["rv_b"][r % channels]
        mean = row.sum() / len(row)
        std = np.sqrt(((row - mean) ** 2).sum() / len(row) + EPS)
        z = _decomposed(params, (((row - mean) / std) * w + b)[None, :])[0]
        out[r] = (z - b) * std / (w + EPS ** 2) + mean
    return out


# -- the decomposition -------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_moving_average_equals_the_direct_edge_clamped_mean_along_the_last_axis(kernel):
    x = np.random.default_rng(kernel).normal(size=(2, 3, 6))      # 3-D: the last axis, not another one
    out = model.moving_average(x, kernel)
    assert out.shape == x.shape and out.dtype == np.float64
    assert np.allclose(out, _direct_moving_average(x, kernel), rtol=0, atol=1e-12)


def test_moving_average_of_float32_keeps_the_dtype_and_accumulates_in_float64():
    # Large level, small wiggles: a float32 running sum would lose the wiggles.
    x = (1e6 + np.random.default_rng(0).normal(size=(4, 16))).astype(np.float32)
    out = model.moving_average(x, 5)
    assert out.dtype == np.float32
    assert np.array_equal(out, _direct_moving_average(x, 5).astype(np.float32))


def test_moving_average_matrix_applies_the_moving_average_to_a_row_vector():
    for kernel in (1, 3, 5):
        m = model._moving_average_matrix(L, kernel, np.float64)
        assert m.shape == (L, L) and m.dtype == np.float64
        x = np.random.default_rng(kernel).normal(size=(5, L))
        assert np.allclose(x @ m, _direct_moving_average(x, kernel), rtol=0, atol=1e-12)
    m = model._moving_average_matrix(5, 3, np.float32)
    assert m.dtype == np.float32
    # Column t holds the weights of step t: 1/3 for its neighbours, the clamped edges doubled.
    assert np.allclose(m[:, 0], [2 / 3, 1 / 3, 0, 0, 0]) and np.allclose(m[:, 2], [0, 1 / 3, 1 / 3, 1 / 3, 0])
    assert np.allclose(m[:, 4], [0, 0, 0, 1 / 3, 2 / 3])


# -- window normalisation ----------------------------------------------------------------------

def test_normalise_none_is_the_identity_with_a_zero_offset():
    x = np.random.default_rng(0).normal(size=(2, 3, 5))
    out, offset = model.normalise(x, "none")
    assert out is x and offset.shape == (2, 3, 1) and not offset.any()


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_normalise_subtracts_the_last_value_or_the_mean_of_each_window(mode):
    x = np.array([[[1.0, 2.0, 6.0], [4.0, -2.0, 1.0]]])
    expected = {"last": [[[6.0], [1.0]]], "mean": [[[3.0], [1.0]]]}[mode]
    out, offset = model.normalise(x, mode)
    assert offset.shape == (1, 2, 1) and np.allclose(offset, expected)
    assert np.allclose(out, x - np.array(expected))


@pytest.mark.parametrize("mode", ["none", "last", "mean"])
def test_forward_is_trend_mlp_plus_seasonal_mlp_on_the_normalised_window_plus_its_offset(mode):
    params = _params(1)
    x = 2.0 + 3.0 * np.random.default_rng(2).normal(size=(5, L))
    offset = {"none": np.zeros((5, 1)), "last": x[:, -1:], "mean": x.mean(axis=1, keepdims=True)}[mode]
    out, cache = model.forward(params, x, K, mode)
    assert out.shape == (5, P)
    assert np.allclose(out, _decomposed(params, x - offset) + offset, rtol=0, atol=1e-12)
    assert cache["window_norm"] == mode and cache["kernel"] == K
    seasonal_in, _ = cache["s"]
    trend_in, _ = cache["t"]
    assert np.allclose(trend_in, _direct_moving_average(x - offset, K)) and np.allclose(seasonal_in + trend_in,
                                                                                       x - offset)


def test_window_norm_defaults_to_none():
    params, x = _params(1), np.random.default_rng(2).normal(size=(3, L)) + 5.0
    assert np.array_equal(model.forward(params, x, K)[0], model.forward(params, x, K, "none")[0])
    assert not np.allclose(model.forward(params, x, K)[0], model.forward(params, x, K, "last")[0])


def test_init_revin_is_the_identity_map_per_channel():
    rv = model.init_revin(3)
    assert set(rv) == {"rv_w", "rv_b"}
    assert rv["rv_w"].dtype == np.float32 and rv["rv_b"].dtype == np.float32   # float32 by default
    assert np.array_equal(rv["rv_w"], np.ones(3)) and np.array_equal(rv["rv_b"], np.zeros(3))
    assert model.init_revin(2, np.float64)["rv_w"].dtype == np.float64
    assert model.init_revin(2, np.float64)["rv_b"].dtype == np.float64


def test_revin_forward_by_hand_with_a_per_channel_affine_map():
    params = _params(3, channels=3)            # 6 rows: 2 windows x 3 channels, window-major
    x = 2.0 + 3.0 * np.random.default_rng(4).normal(size=(6, L))
    out, cache = model.forward(params, x, K, "revin")
    assert np.allclose(out, _revin_by_hand(params, x), rtol=1e-12, atol=1e-12)
    assert cache["window_norm"] == "revin"


def test_revin_epsilons_constant_window_and_zero_affine_weight():
    """A constant window has std sqrt(eps); an affine weight of 0 divides by eps^2 alone."""
    params = _params(5, channels=2)
    params["rv_w"][1] = 0.0
    x = np.random.default_rng(6).normal(size=(4, L))
    x[2] = 7.0                                   # a constant row (channel 0 of window 2)
    out = model.forward(params, x, K, "revin")[0]
    assert np.allclose(out, _revin_by_hand(params, x), rtol=1e-9, atol=1e-9)
    # Row 2: x_hat = 0 so the MLPs see the bias b; y = (z - b) * sqrt(eps) / (w + eps^2) + 7.
    b, w = params["rv_b"][0], params["rv_w"][0]
    z = _decomposed(params, np.full((1, L), b))[0]
    assert np.allclose(out[2], (z - b) * np.sqrt(EPS) / (w + EPS ** 2) + 7.0, rtol=1e-12)


def test_revin_with_the_identity_map_standardises_each_row():
    params = _params(7)
    params.update(model.init_revin(2, np.float64))
    x = np.random.default_rng(8).normal(size=(4, L)) * 4 + 1
    mean, std = x.mean(1, keepdims=True), np.sqrt(x.var(1, keepdims=True) + EPS)
    expected = _decomposed(params, (x - mean) / std) * std / (1 + EPS ** 2) + mean
    assert np.allclose(model.forward(params, x, K, "revin")[0], expected, rtol=1e-12)


# -- gradients ---------------------------------------------------------------------------------

def _loss(params, x, y, mode):
    return model.mse_grad(model.forward(params, x, K, mode)[0], y)[0]


@pytest.mark.parametrize("mode", ["none", "last", "mean", "revin"])
def test_backward_equals_central_finite_differences_for_every_parameter(mode):
    params = _params(11, channels=2 if mode == "revin" else None)
    rng = np.random.default_rng(12)
    x, y = 1.5 + 2.0 * rng.normal(size=(6, L)), rng.normal(size=(6, P))
    pred, cache = model.forward(params, x, K, mode)
    grads = model.backward(params, cache, model.mse_grad(pred, y)[1])
    assert set(grads) == set(params)
    eps = 1e-6
    for name, value in params.items():
        assert grads[name].shape == value.shape and grads[name].dtype == np.float64, name
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            old = value[idx]
            value[idx] = old + eps
            up = _loss(params, x, y, mode)
            value[idx] = old - eps
            down = _loss(params, x, y, mode)
            value[idx] = old
            numeric[idx] = (up - down) / (2 * eps)
        assert np.abs(numeric).max() > 0, name          # every parameter carries gradient here
        assert np.allclose(grads[name], numeric, rtol=1e-5, atol=1e-8), name


def test_revin_weight_gradient_near_zero_weight_includes_the_eps_squared_term():
    """At w = 1e-6 the output map divides by w + eps^2 = w (1 + 1e-4): the gradient must use that sum."""
    params = _params(21, channels=2)
    params["rv_w"][1] = 1e-6
    rng = np.random.default_rng(22)
    x, y = rng.normal(size=(4, L)), rng.normal(size=(4, P))
    pred, cache = model.forward(params, x, K, "revin")
    grad = model.backward(params, cache, model.mse_grad(pred, y)[1])["rv_w"][1]
    h = 1e-11                                   # the loss is smooth at this scale around w
    params["rv_w"][1] = 1e-6 + h
    up = _loss(params, x, y, "revin")
    params["rv_w"][1] = 1e-6 - h
    down = _loss(params, x, y, "revin")
    assert np.isclose(grad, (up - down) / (2 * h), rtol=1e-7, atol=0)


def test_revin_gradients_keep_the_parameter_dtype():
    params = _params(13, channels=2, dtype=np.float32)
    x = np.random.default_rng(14).normal(size=(4, L)).astype(np.float32)
    pred, cache = model.forward(params, x, K, "revin")
    grads = model.backward(params, cache, np.ones((4, P)))        # a float64 upstream gradient
    assert grads["rv_w"].dtype == np.float32 and grads["rv_b"].dtype == np.float32


def test_a_float32_revin_step_computes_in_float32_without_float64_copies(monkeypatch):
    """Training is float32 for speed and memory: every moving average of a float32 step (forward's
    trend, backward's L x L decomposition matrix) is taken of a float32 array, not a float64 one."""
    params = _params(13, channels=2, dtype=np.float32)
    x = np.random.default_rng(14).normal(size=(4, L)).astype(np.float32)
    seen, real = [], model.moving_average
    monkeypatch.setattr(model, "moving_average", lambda a, kernel: (seen.append(a.dtype), real(a, kernel))[1])
    pred, cache = model.forward(params, x, K, "revin")
    grads = model.backward(params, cache, np.ones((4, P), np.float32))
    assert len(seen) == 2 and set(seen) == {np.dtype(np.float32)}       # forward's trend, backward's matrix
    assert all(g.dtype == np.float32 for g in grads.values())

def test_mse_grad_is_the_element_mean_squared_error_and_its_gradient():
    pred = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    target = np.array([[0.0, 2.0, 1.0], [1.0, 1.0, 4.0]])
    loss, grad = model.mse_grad(pred, target)
    assert isinstance(loss, float) and loss == (1 + 0 + 4 + 1 + 4 + 0) / 6
    assert np.allclose(grad, 2.0 / 6 * (pred - target), rtol=0, atol=0)


# -- predict -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["none", "last", "mean"])
def test_predict_in_chunks_equals_one_forward(mode):
    params = _params(15)
    x = np.random.default_rng(16).normal(size=(11, L)) + 3.0
    whole = model.forward(params, x, K, mode)[0]
    for chunk in (1, 3, 4, 11, 50):
        assert np.allclose(model.predict(params, x, K, mode, chunk=chunk), whole, rtol=0, atol=1e-12), chunk
    assert np.allclose(model.predict(params, x, K, mode), whole, rtol=0, atol=1e-12)   # the default chunk


@pytest.mark.parametrize("chunk", [3, 4, 5, 7, 8, 100])
def test_predict_revin_chunks_hold_whole_windows(chunk):
    params = _params(17, channels=3)
    x = np.random.default_rng(18).normal(size=(15, L)) * 2 + 1     # 5 windows x 3 channels
    whole = model.forward(params, x, K, "revin")[0]
    assert np.allclose(model.predict(params, x, K, "revin", chunk=chunk), whole, rtol=0, atol=1e-12)
    assert np.allclose(model.predict(params, x, K, "revin"), whole, rtol=0, atol=1e-12)


# -- initialisation ----------------------------------------------------------------------------

def test_init_params_shapes_dtypes_and_zero_biases():
    params = model.init_params(L, H, P, np.random.default_rng(0))
    shapes = {"s_w1": (L, H), "s_b1": (H,), "s_w2": (H, P), "s_b2": (P,),
              "t_w1": (L, H), "t_b1": (H,), "t_w2": (H, P), "t_b2": (P,)}
    assert {k: v.shape for k, v in params.items()} == shapes
    assert all(v.dtype == np.float32 for v in params.values())       # float32 by default
    assert all(not params[k].any() for k in shapes if "_b" in k)
    assert all(v.dtype == np.float64 for v in model.init_params(L, H, P, np.random.default_rng(0),
                                                                 np.float64).values())


def test_init_params_are_centred_he_seasonal_and_small_trend():
    params = model.init_params(100, 400, 100, np.random.default_rng(1), np.float64)
    for name, std in (("s_w1", np.sqrt(2 / 100)), ("s_w2", np.sqrt(2 / 400)), ("t_w1", 0.01), ("t_w2", 0.01)):
        w = params[name]
        assert abs(w.mean()) < 4 * std / np.sqrt(w.size), name
        assert np.isclose(w.std(), std, rtol=0.02), name


def test_init_params_follow_the_seed():
    a = model.init_params(L, H, P, np.random.default_rng(5), np.float64)
    b = model.init_params(L, H, P, np.random.default_rng(5), np.float64)
    c = model.init_params(L, H, P, np.random.default_rng(6), np.float64)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.allclose(a["s_w1"], c["s_w1"]) and not np.allclose(a["t_w2"], c["t_w2"])
    # Draw order: seasonal w1, w2, then trend w1, w2.
    rng = np.random.default_rng(5)
    draws = [rng.normal(0, 1, size=s) for s in ((L, H), (H, P), (L, H), (H, P))]
    assert np.allclose(a["s_w1"], draws[0] * np.sqrt(2 / L)) and np.allclose(a["s_w2"], draws[1] * np.sqrt(2 / H))
    assert np.allclose(a["t_w1"], draws[2] * 0.01) and np.allclose(a["t_w2"], draws[3] * 0.01)


# -- the linear base (residual: linear) ---------------------------------------------------------

def test_linear_forecast_shared_and_per_channel_by_hand():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, L))                       # 3 windows x 2 channels, window-major
    shared = rng.normal(size=(L + 1, P))
    assert np.allclose(model.linear_forecast(shared, x), x @ shared[:-1] + shared[-1])
    per_channel = rng.normal(size=(2, L + 1, P))
    by_hand = np.stack([row @ per_channel[r % 2, :-1] + per_channel[r % 2, -1] for r, row in enumerate(x)])
    assert np.allclose(model.linear_forecast(per_channel, x), by_hand)


@pytest.mark.parametrize("mode", ["none", "last", "mean"])
def test_forward_with_a_base_adds_it_on_the_normalised_window(mode):
    rng = np.random.default_rng(4)
    params = {**_params(), "lin_w": rng.normal(size=(2, L + 1, P))}
    x = rng.normal(size=(4, L)) + 3.0
    offset = {"none": 0.0, "last": x[:, -1:], "mean": x.mean(1, keepdims=True)}[mode]
    u = x - offset
    expected = _decomposed(params, u) + model.linear_forecast(params["lin_w"], u) + offset
    assert np.allclose(model.forward(params, x, K, mode)[0], expected)
    # the base is fixed: backward gives no gradient for it, and the same gradients as without it
    pred, cache = model.forward(params, x, K, mode)
    grads = model.backward(params, cache, np.ones_like(pred))
    without = {k: v for k, v in params.items() if k != "lin_w"}
    assert "lin_w" not in grads
    ref = model.backward(without, model.forward(without, x, K, mode)[1], np.ones_like(pred))
    assert all(np.allclose(grads[k], ref[k]) for k in ref)


def test_predict_with_a_per_channel_base_chunks_whole_windows():
    rng = np.random.default_rng(5)
    params = {**_params(), "lin_w": rng.normal(size=(3, L + 1, P))}
    x = rng.normal(size=(30, L))
    assert np.allclose(model.predict(params, x, K, "last", chunk=8), model.forward(params, x, K, "last")[0])
