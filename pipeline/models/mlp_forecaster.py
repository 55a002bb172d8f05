"""Part 2: the decomposition MLP forecaster in numpy with a hand-written backward pass.

input x (rows, L) -> trend = moving average of x (kernel k, edge padding), seasonal = x - trend
prediction = MLP_s(seasonal) + MLP_t(trend), each MLP = Linear(L, H) -> ReLU -> Linear(H, P).
Rows are (window, channel) pairs: the two MLPs are shared across the channels.
"""

from __future__ import annotations

import numpy as np


def moving_average(x: np.ndarray, kernel: int) -> np.ndarray:
    """Centred moving average along the last axis, edges padded with the end values; via cumsum."""
    pad = (kernel - 1) // 2
    padded = np.concatenate([np.repeat(x[..., :1], pad, axis=-1), x, np.repeat(x[..., -1:], pad, axis=-1)], axis=-1)
    csum = np.cumsum(padded, axis=-1, dtype=np.float64)
    csum = np.concatenate([np.zeros_like(csum[..., :1]), csum], axis=-1)
    return ((csum[..., kernel:] - csum[..., :-kernel]) / kernel).astype(x.dtype)


def init_params(input_len: int, hidden: int, pred_len: int, rng: np.random.Generator, dtype=np.float32) -> dict:
    """Seasonal MLP: He initialisation; trend MLP: small random values (N(0, 0.01^2))."""
    def he(fan_in, fan_out):
        return rng.normal(0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out)).astype(dtype)

    def small(fan_in, fan_out):
        return rng.normal(0, 0.01, size=(fan_in, fan_out)).astype(dtype)

    return {"s_w1": he(input_len, hidden), "s_b1": np.zeros(hidden, dtype), "s_w2": he(hidden, pred_len),
            "s_b2": np.zeros(pred_len, dtype),
            "t_w1": small(input_len, hidden), "t_b1": np.zeros(hidden, dtype), "t_w2": small(hidden, pred_len),
            "t_b2": np.zeros(pred_len, dtype)}


def init_revin(n_channels: int, dtype=np.float32) -> dict:
    """RevIN's learnable per-channel affine map, starting as the identity."""
    return {"rv_w": np.ones(n_channels, dtype), "rv_b": np.zeros(n_channels, dtype)}


REVIN_EPS = 1e-5


def normalise(x: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-window normalisation: subtract the window's last value or mean (added back later)."""
    if mode == "none":
        return x, np.zeros_like(x[..., :1])
    offset = x[..., -1:] if mode == "last" else x.mean(axis=-1, keepdims=True)
    return x - offset, offset


def _decomposed_mlps(params: dict, x: np.ndarray, kernel: int, cache: dict):
    trend = moving_average(x, kernel)
    out = 0.0
    for part, inputs in (("s", x - trend), ("t", trend)):
        pre = inputs @ params[f"{part}_w1"] + params[f"{part}_b1"]
        hidden = np.maximum(pre, 0)
        out = out + hidden @ params[f"{part}_w2"] + params[f"{part}_b2"]
        cache[part] = (inputs, hidden)
    return out


def linear_forecast(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[x, 1] @ W: a least-squares linear forecast fitted in closed form. W is (L+1, P), shared by
    the channels, or (C, L+1, P), one map per channel (rows window-major: row r is channel r % C,
    so x must hold whole windows)."""
    if weights.ndim == 2:
        return (x @ weights[:-1] + weights[-1]).astype(x.dtype, copy=False)
    channels = len(weights)
    by_channel = x.reshape(-1, channels, x.shape[-1]).transpose(1, 0, 2)          # (C, windows, L)
    out = np.matmul(by_channel, weights[:, :-1]) + weights[:, -1:]                # (C, windows, P)
    return out.transpose(1, 0, 2).reshape(len(x), -1).astype(x.dtype, copy=False)


def forward(params: dict, x: np.ndarray, kernel: int, window_norm: str = "none"):
    """Prediction (rows, P) and the cache the backward pass needs.

    revin (Kim et al., 2022): each row is standardised by its own mean/std, then mapped by a learnt
    per-channel affine (rv_w, rv_b); the output goes through the inverse map. Rows are (window,
    channel) pairs in window-major order, so x must hold whole windows (rows % channels == 0).
    With a fixed linear base in params (lin_w, residual: linear) the MLPs add to it: the base maps
    the normalised window (the same one the MLPs see) and the offset is added back to their sum;
    lin_w is not trained, so backward has no gradient for it.
    """
    cache = {"window_norm": window_norm, "kernel": kernel}
    if window_norm != "revin":
        x, offset = normalise(x, window_norm)
        out = _decomposed_mlps(params, x, kernel, cache)
        if "lin_w" in params:
            out = out + linear_forecast(params["lin_w"], x)
        return (out + offset if window_norm != "none" else out), cache
    channels = len(params["rv_w"])
    weight = np.tile(params["rv_w"], len(x) // channels)[:, None]   # (rows, 1)
    bias = np.tile(params["rv_b"], len(x) // channels)[:, None]
    mean = x.mean(axis=-1, keepdims=True)
    std = np.sqrt(x.var(axis=-1, keepdims=True) + REVIN_EPS)
    x_hat = (x - mean) / std
    z = _decomposed_mlps(params, x_hat * weight + bias, kernel, cache)
    scale = std / (weight + REVIN_EPS ** 2)
    cache["revin"] = (x_hat, z, bias, scale)
    return (z - bias) * scale + mean, cache


def _moving_average_matrix(length: int, kernel: int, dtype) -> np.ndarray:
    """M with moving_average(x) == x @ M (the decomposition is linear in its input)."""
    return moving_average(np.eye(length, dtype=dtype), kernel)


def backward(params: dict, cache: dict, d_out: np.ndarray) -> dict:
    """Gradients of the loss for every parameter, given d loss / d prediction (rows, P)."""
    grads = {}
    revin = cache["window_norm"] == "revin"
    if revin:
        x_hat, z, bias, scale = cache["revin"]
        d_z = d_out * scale
        channels = len(params["rv_w"])
        # Output side: y = (z - b) * std / (w + eps^2) + mean.
        d_w_rows = -np.sum(d_out * (z - bias) * scale, axis=-1) / (np.tile(params["rv_w"], len(z) // channels)
                                                                   + REVIN_EPS ** 2)
        d_b_rows = -np.sum(d_z, axis=-1)
        d_out = d_z
    d_inputs = {}
    for part in ("s", "t"):
        inputs, hidden = cache[part]
        grads[f"{part}_w2"] = hidden.T @ d_out
        grads[f"{part}_b2"] = d_out.sum(axis=0)
        d_pre = (d_out @ params[f"{part}_w2"].T) * (hidden > 0)   # ReLU'
        grads[f"{part}_w1"] = inputs.T @ d_pre
        grads[f"{part}_b1"] = d_pre.sum(axis=0)
        if revin:
            d_inputs[part] = d_pre @ params[f"{part}_w1"].T
    if revin:
        # Input side: the MLPs see u = x_hat * w + b through seasonal = u - MA(u), trend = MA(u).
        ma = _moving_average_matrix(x_hat.shape[-1], cache["kernel"], x_hat.dtype)
        d_u = d_inputs["s"] + (d_inputs["t"] - d_inputs["s"]) @ ma.T
        d_w_rows = d_w_rows + np.sum(d_u * x_hat, axis=-1)
        d_b_rows = d_b_rows + np.sum(d_u, axis=-1)
        grads["rv_w"] = d_w_rows.reshape(-1, channels).sum(axis=0).astype(params["rv_w"].dtype)
        grads["rv_b"] = d_b_rows.reshape(-1, channels).sum(axis=0).astype(params["rv_b"].dtype)
    return grads


def mse_grad(pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Element-mean MSE (over rows and steps) and its gradient for the prediction."""
    err = pred - target
    return float(np.mean(err * err)), (2.0 / err.size) * err


def predict(params: dict, x: np.ndarray, kernel: int, window_norm: str, chunk: int = 8192) -> np.ndarray:
    """Predictions for many rows, in chunks (of whole windows) to bound memory."""
    per_channel = [len(params["rv_w"])] if window_norm == "revin" else []
    if "lin_w" in params and params["lin_w"].ndim == 3:
        per_channel.append(len(params["lin_w"]))
    for channels in per_channel:   # both are the same channel count
        chunk -= chunk % channels
    return np.concatenate([forward(params, x[i:i + chunk], kernel, window_norm)[0]
                           for i in range(0, len(x), chunk)])
