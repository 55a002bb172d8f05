"""Part 1: the assignment's small classifier in numpy, with the backward pass derived by hand.

For a batch X of shape (m, L, D) and one-hot labels Y (m, K):
  1. X^T                                   (m, D, L)
  2. A1 = X^T Θ1 + b1, Z1 = ReLU(A1)        Θ1: L×L, b1: L      (FC1 along time)
  3. Z1^T                                   (m, L, D)
  4. Z = Z1^T + X                           residual
  5. A2 = Z Θ2 + b2, Z2 = ReLU(A2)          Θ2: D×D, b2: D      (FC2 along features)
  6. Zm = mean_j Z2[:, :, j]                (m, L)
  7. A3 = Zm Θ3 + b3, Ŷ = softmax(A3)       Θ3: L×K, b3: K
  loss = (1/m) Σ_i -Σ_k Y_ik log Ŷ_ik
"""

from __future__ import annotations

import numpy as np

PARAM_NAMES = ("theta1", "b1", "theta2", "b2", "theta3", "b3")


def init_params(window: int, features: int, classes: int, rng: np.random.Generator, dtype=np.float64) -> dict:
    def he(fan_in, shape):
        return rng.normal(0, np.sqrt(2.0 / fan_in), size=shape).astype(dtype)

    return {"theta1": he(window, (window, window)), "b1": np.zeros(window, dtype),
            "theta2": he(features, (features, features)), "b2": np.zeros(features, dtype),
            "theta3": he(window, (window, classes)), "b3": np.zeros(classes, dtype)}


def softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def forward(params: dict, x: np.ndarray) -> tuple[np.ndarray, dict]:
    xt = x.transpose(0, 2, 1)                              # 1
    a1 = xt @ params["theta1"] + params["b1"]              # 2
    z1 = np.maximum(a1, 0)
    z = z1.transpose(0, 2, 1) + x                          # 3, 4
    a2 = z @ params["theta2"] + params["b2"]               # 5
    z2 = np.maximum(a2, 0)
    zm = z2.mean(axis=2)                                   # 6
    y_hat = softmax(zm @ params["theta3"] + params["b3"])  # 7
    return y_hat, {"xt": xt, "a1": a1, "z": z, "a2": a2, "zm": zm, "y_hat": y_hat}


def cross_entropy(y_hat: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.sum(y * np.log(np.clip(y_hat, 1e-300, None)), axis=1)))


def softmax_jacobian(y_hat: np.ndarray) -> np.ndarray:
    """dŶ/dA3 per sample: diag(Ŷ) - Ŷ Ŷ^T, shape (m, K, K)."""
    return np.einsum("mi,ij->mij", y_hat, np.eye(y_hat.shape[1])) - np.einsum("mi,mj->mij", y_hat, y_hat)


def backward(params: dict, cache: dict, y: np.ndarray) -> dict:
    """Gradients of the mean cross-entropy, step by step back through the forward pass."""
    m = len(y)
    y_hat = cache["y_hat"]
    d_yhat = -y / np.clip(y_hat, 1e-300, None) / m                      # dL/dŶ
    # Chain through the softmax Jacobian (symmetric). With cross-entropy and one-hot Y this equals
    # (Ŷ - Y) / m, the well-known simplification; the explicit form follows the derivation.
    d_a3 = np.einsum("mij,mj->mi", softmax_jacobian(y_hat), d_yhat)
    grads = {"theta3": cache["zm"].T @ d_a3, "b3": d_a3.sum(axis=0)}
    d_zm = d_a3 @ params["theta3"].T                                   # (m, L)
    d_z2 = np.repeat(d_zm[:, :, None] / cache["a2"].shape[2], cache["a2"].shape[2], axis=2)  # mean: 1/D each
    d_a2 = d_z2 * (cache["a2"] > 0)                                    # ReLU'
    grads["theta2"] = np.einsum("mld,mle->de", cache["z"], d_a2)
    grads["b2"] = d_a2.sum(axis=(0, 1))
    d_z = d_a2 @ params["theta2"].T                                    # (m, L, D)
    # Residual Z = Z1^T + X: dZ flows unchanged into both X and the FC1 branch (Z1^T).
    d_z1 = d_z.transpose(0, 2, 1)                                      # undo the transpose: (m, D, L)
    d_a1 = d_z1 * (cache["a1"] > 0)
    grads["theta1"] = np.einsum("mdl,mdk->lk", cache["xt"], d_a1)
    grads["b1"] = d_a1.sum(axis=(0, 1))
    return grads


def loss_and_grads(params: dict, x: np.ndarray, y: np.ndarray, backward_fn=backward) -> tuple[float, dict]:
    y_hat, cache = forward(params, x)
    return cross_entropy(y_hat, y), backward_fn(params, cache, y)


def sgd(params: dict, x: np.ndarray, y: np.ndarray, lr: float, batch_size: int, epochs: int,
        rng: np.random.Generator, on_step=None, on_epoch=None) -> dict:
    """Plain SGD: every epoch, random mini-batches; forward, loss, gradients, Θ ← Θ - η ∇Θ."""
    step = 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x))
        for i in range(0, len(x), batch_size):
            batch = order[i:i + batch_size]
            loss, grads = loss_and_grads(params, x[batch], y[batch])
            for name in PARAM_NAMES:
                params[name] -= lr * grads[name]
            step += 1
            if on_step:
                on_step(step, epoch, loss)
        if on_epoch:
            on_epoch(epoch, params)
    return params
