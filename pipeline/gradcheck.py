"""Proving hand-written gradients: central finite differences and torch autograd."""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.models import backprop_net


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """Relative error of one parameter's gradient, ||a - b|| / (||a|| + ||b||).

    Per tensor rather than per element: an element-wise ratio is dominated by entries near zero,
    where finite differences only carry rounding noise. Two all-zero gradients agree (0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(a) + np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0


def finite_differences(loss: Callable[[dict], float], params: dict, eps: float = 1e-6) -> dict:
    """Central differences of `loss` for every element of every parameter (float64)."""
    grads = {}
    for name, value in params.items():
        grad = np.zeros_like(value, dtype=np.float64)
        flat, gflat = value.reshape(-1), grad.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + eps
            up = loss(params)
            flat[i] = old - eps
            down = loss(params)
            flat[i] = old
            gflat[i] = (up - down) / (2 * eps)
        grads[name] = grad
    return grads


def backprop_net_autograd(params: dict, x: np.ndarray, y: np.ndarray) -> dict:
    """The part-1 network written in torch, differentiated by autograd (float64)."""
    import torch

    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    xt = torch.tensor(x, dtype=torch.float64)
    z1 = torch.relu(xt.transpose(1, 2) @ t["theta1"] + t["b1"])
    z = z1.transpose(1, 2) + xt
    zm = torch.relu(z @ t["theta2"] + t["b2"]).mean(dim=2)
    log_probs = torch.log_softmax(zm @ t["theta3"] + t["b3"], dim=1)
    loss = -(torch.tensor(y, dtype=torch.float64) * log_probs).sum(dim=1).mean()
    loss.backward()
    return {k: v.grad.numpy() for k, v in t.items()}


def check_backprop_net(params: dict, x: np.ndarray, y: np.ndarray,
                       backward_fn=backprop_net.backward) -> dict[str, dict[str, float]]:
    """Largest relative error per parameter of the hand-written gradients against finite
    differences and against torch autograd."""
    params = {k: v.astype(np.float64) for k, v in params.items()}
    x = x.astype(np.float64)
    _, analytic = backprop_net.loss_and_grads(params, x, y, backward_fn)
    numeric = finite_differences(lambda p: backprop_net.cross_entropy(backprop_net.forward(p, x)[0], y), params)
    autograd = backprop_net_autograd(params, x, y)
    return {"finite_differences": {k: relative_error(analytic[k], numeric[k]) for k in analytic},
            "autograd": {k: relative_error(analytic[k], autograd[k]) for k in analytic}}
