"""Claims about part 1's numpy network: the forward pass computes the formula of the module
docstring (checked by hand and by an independent loop implementation), softmax / cross-entropy /
the softmax Jacobian are what they say, the hand-derived backward pass equals central finite
differences and torch autograd for every parameter, He initialisation, and plain SGD does exactly
params -= lr * grad per mini-batch in the order the code draws them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.models import backprop_net as net

NAMES = ("theta1", "b1", "theta2", "b2", "theta3", "b3")


# --- independent references -------------------------------------------------------------------

def _ref_forward(p: dict, x: np.ndarray) -> dict:
    """The docstring's steps 1-7 with explicit loops (no matrix products, no broadcasting)."""
    m, L, D = x.shape
    K = p["theta3"].shape[1]
    a1 = np.zeros((m, D, L))
    for i in range(m):
        for d in range(D):
            for k in range(L):
                a1[i, d, k] = sum(x[i, l, d] * p["theta1"][l, k] for l in range(L)) + p["b1"][k]
    z = np.zeros((m, L, D))
    for i in range(m):
        for l in range(L):
            for d in range(D):
                z[i, l, d] = max(a1[i, d, l], 0.0) + x[i, l, d]
    a2 = np.zeros((m, L, D))
    for i in range(m):
        for l in range(L):
            for e in range(D):
                a2[i, l, e] = sum(z[i, l, d] * p["theta2"][d, e] for d in range(D)) + p["b2"][e]
    zm = np.array([[sum(max(a2[i, l, e], 0.0) for e in range(D)) / D for l in range(L)] for i in range(m)])
    a3 = np.array([[sum(zm[i, l] * p["theta3"][l, k] for l in range(L)) + p["b3"][k] for k in range(K)]
                   for i in range(m)])
    y_hat = np.array([[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in a3])
    return {"a1": a1, "z": z, "a2": a2, "zm": zm, "a3": a3, "y_hat": y_hat}


def _ref_loss(p: dict, x: np.ndarray, y: np.ndarray) -> float:
    y_hat = _ref_forward(p, x)["y_hat"]
    return -float(np.mean([sum(y[i, k] * math.log(y_hat[i, k]) for k in range(y.shape[1]) if y[i, k])
                           for i in range(len(y))]))


def _autograd(p: dict, x: np.ndarray, y: np.ndarray) -> tuple[float, dict]:
    """The same network written in torch (float64), differentiated by autograd."""
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p.items()}
    xt = torch.tensor(x, dtype=torch.float64)
    a1 = torch.einsum("mld,lk->mdk", xt, t["theta1"]) + t["b1"]
    z = torch.relu(a1).permute(0, 2, 1) + xt
    zm = torch.relu(torch.einsum("mld,de->mle", z, t["theta2"]) + t["b2"]).mean(dim=2)
    logp = torch.log_softmax(zm @ t["theta3"] + t["b3"], dim=1)
    loss = -(torch.tensor(y, dtype=torch.float64) * logp).sum(dim=1).mean()
    loss.backward()
    return float(loss.detach()), {k: v.grad.numpy().copy() for k, v in t.items()}


def _central_differences(p: dict, x: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> dict:
    grads = {}
    for name in NAMES:
        g = np.zeros_like(p[name])
        for idx in np.ndindex(p[name].shape):
            up = {k: v.copy() for k, v in p.items()}
            down = {k: v.copy() for k, v in p.items()}
            up[name][idx] += eps
            down[name][idx] -= eps
            g[idx] = (_ref_loss(up, x, y) - _ref_loss(down, x, y)) / (2 * eps)
        grads[name] = g
    return grads


# --- fixtures ---------------------------------------------------------------------------------

def _hand_case():
    """m=1, L=2, D=2, K=2 with small integers; the values below are worked out by hand."""
    x = np.array([[[1.0, -2.0], [3.0, 0.0]]])
    p = {"theta1": np.array([[1.0, -1.0], [0.0, 1.0]]), "b1": np.array([0.0, 1.0]),
         "theta2": np.array([[1.0, 0.0], [1.0, -1.0]]), "b2": np.array([0.0, -1.0]),
         "theta3": np.array([[2.0, 0.0], [0.0, 1.0]]), "b3": np.array([0.0, -4.0])}
    return p, x


def _random_case(m=3, L=4, D=5, K=2, seed=0, integers=False):
    """All sizes different, so a mixed-up axis cannot go unnoticed. With `integers`, ReLU inputs
    are often exactly 0 (where the derivative is taken as 0, as torch does)."""
    rng = np.random.default_rng(seed)
    if integers:
        draw = lambda *shape: rng.integers(-2, 3, shape).astype(np.float64)  # noqa: E731
    else:
        draw = lambda *shape: rng.normal(0, 0.7, shape)  # noqa: E731
    p = {"theta1": draw(L, L), "b1": draw(L), "theta2": draw(D, D), "b2": draw(D),
         "theta3": draw(L, K) * (0.3 if integers else 1.0), "b3": draw(K)}
    x = draw(m, L, D)
    y = np.eye(K)[rng.integers(0, K, m)]
    return p, x, y


# --- forward ----------------------------------------------------------------------------------

def test_forward_on_a_tiny_input_gives_the_values_worked_out_by_hand():
    p, x = _hand_case()
    y_hat, cache = net.forward(p, x)
    # X^T = [[1, 3], [-2, 0]]; A1 = X^T Θ1 + b1 = [[1, 3], [-2, 3]]; Z1 = [[1, 3], [0, 3]]
    assert np.array_equal(cache["xt"], [[[1, 3], [-2, 0]]])
    assert np.array_equal(cache["a1"], [[[1, 3], [-2, 3]]])
    # Z = Z1^T + X = [[1, 0], [3, 3]] + [[1, -2], [3, 0]] = [[2, -2], [6, 3]]
    assert np.array_equal(cache["z"], [[[2, -2], [6, 3]]])
    # A2 = Z Θ2 + b2 = [[0, 1], [9, -4]]; Z2 = [[0, 1], [9, 0]]; Zm = [0.5, 4.5]
    assert np.array_equal(cache["a2"], [[[0, 1], [9, -4]]])
    assert np.array_equal(cache["zm"], [[0.5, 4.5]])
    # A3 = Zm Θ3 + b3 = [1, 0.5]; Ŷ = softmax
    e = math.exp(-0.5)
    assert np.allclose(y_hat, [[1 / (1 + e), e / (1 + e)]], rtol=0, atol=1e-15)
    assert cache["y_hat"] is y_hat


def test_forward_equals_an_independent_loop_implementation():
    p, x, _ = _random_case(m=3, L=4, D=5, K=3, seed=1)
    y_hat, cache = net.forward(p, x)
    ref = _ref_forward(p, x)
    assert (ref["a1"] < 0).any() and (ref["a1"] > 0).any() and (ref["a2"] < 0).any() and (ref["a2"] > 0).any()
    for key in ("a1", "z", "a2", "zm", "y_hat"):
        assert np.allclose(cache[key], ref[key], rtol=1e-12, atol=1e-12), key
    assert np.allclose(cache["xt"], x.transpose(0, 2, 1), rtol=0, atol=0)
    assert np.allclose(y_hat, ref["y_hat"], rtol=1e-12, atol=1e-14)


# --- softmax, cross-entropy, Jacobian ---------------------------------------------------------

def test_softmax_is_the_normalised_exponential_row_by_row():
    a = np.array([[0.0, 1.0, 2.0], [-1.0, 3.0, 0.5]])
    expected = np.exp(a) / np.exp(a).sum(axis=1, keepdims=True)
    out = net.softmax(a)
    assert np.allclose(out, expected, rtol=1e-14, atol=0)
    assert np.allclose(out.sum(axis=1), 1.0, rtol=0, atol=1e-15)


def test_softmax_is_stable_for_large_logits_and_shift_invariant_per_row():
    a = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1002.0, -1001.0]])
    out = net.softmax(a)
    assert np.isfinite(out).all()
    base = np.array([[0.0, 1.0, -1.0], [0.0, -2.0, -1.0]])
    assert np.allclose(out, np.exp(base) / np.exp(base).sum(axis=1, keepdims=True), rtol=1e-13, atol=0)
    # square input: a per-column shift would change the rows
    sq = np.array([[800.0, 0.0], [0.0, 800.0]])
    assert np.allclose(net.softmax(sq), [[1.0, 0.0], [0.0, 1.0]], rtol=0, atol=1e-300)
    assert np.allclose(net.softmax(np.array([[5.0, 3.0], [1.0, 2.0]])),
                       net.softmax(np.array([[2.0, 0.0], [-7.0, -6.0]])), rtol=1e-14, atol=0)


def test_cross_entropy_is_the_mean_over_samples_of_minus_log_the_true_class_probability():
    y_hat = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    y = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert net.cross_entropy(y_hat, y) == pytest.approx(-(math.log(0.7) + math.log(0.5)) / 2, rel=1e-15)
    assert isinstance(net.cross_entropy(y_hat, y), float)


def test_cross_entropy_of_a_zero_probability_is_finite_minus_log_1e_300():
    y_hat = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([[0.0, 1.0], [0.0, 1.0]])
    assert net.cross_entropy(y_hat, y) == pytest.approx(-math.log(1e-300) / 2, rel=1e-14)
    # a zero probability on a wrong class contributes nothing (no 0 * -inf = nan)
    assert net.cross_entropy(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]])) == 0.0


def test_softmax_jacobian_is_diag_y_minus_y_y_transpose_per_sample():
    y_hat = np.array([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    jac = net.softmax_jacobian(y_hat)
    assert jac.shape == (2, 3, 3)
    for i in range(2):
        yi = y_hat[i]
        expected = [[(yi[a] if a == b else 0.0) - yi[a] * yi[b] for b in range(3)] for a in range(3)]
        assert np.allclose(jac[i], expected, rtol=0, atol=1e-16)


def test_softmax_jacobian_equals_the_numerical_derivative_of_softmax():
    a = np.array([[0.3, -1.2, 2.0, 0.1]])
    y_hat = net.softmax(a)
    eps = 1e-6
    numeric = np.zeros((4, 4))
    for j in range(4):
        up, down = a.copy(), a.copy()
        up[0, j] += eps
        down[0, j] -= eps
        numeric[:, j] = (net.softmax(up)[0] - net.softmax(down)[0]) / (2 * eps)
    assert np.allclose(net.softmax_jacobian(y_hat)[0], numeric, atol=1e-9)


# --- backward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["hand", "random", "integers"])
def test_backward_equals_torch_autograd_for_every_parameter(case):
    if case == "hand":
        p, x = _hand_case()
        y = np.array([[0.0, 1.0]])
    else:
        p, x, y = _random_case(m=3, L=4, D=5, K=3, seed=2, integers=case == "integers")
    y_hat, cache = net.forward(p, x)
    if case != "random":
        assert (cache["a2"] == 0).any() or (cache["a1"] == 0).any()     # ReLU at exactly 0
    grads = net.backward(p, cache, y)
    loss, expected = _autograd(p, x, y)
    assert set(grads) == set(NAMES)
    for name in NAMES:
        assert grads[name].shape == p[name].shape, name
        assert np.allclose(grads[name], expected[name], rtol=1e-10, atol=1e-13), name
    assert net.cross_entropy(y_hat, y) == pytest.approx(loss, rel=1e-12)


def test_backward_equals_central_finite_differences_for_every_parameter():
    p, x, y = _random_case(m=2, L=3, D=4, K=2, seed=3)
    grads = net.backward(p, net.forward(p, x)[1], y)
    numeric = _central_differences(p, x, y)
    for name in NAMES:
        assert np.abs(grads[name]).max() > 1e-4, name          # a gradient that is there
        assert np.allclose(grads[name], numeric[name], rtol=1e-6, atol=1e-8), name


def test_backward_stays_finite_when_the_true_class_probability_underflows_to_zero():
    p, x = _hand_case()
    p["b3"] = np.array([0.0, -2000.0])              # softmax gives exactly 0 to class 1
    y = np.array([[0.0, 1.0]])
    y_hat, cache = net.forward(p, x)
    assert y_hat[0, 1] == 0.0
    grads = net.backward(p, cache, y)              # -1/Ŷ is clipped at -1e300: no inf, no 0 * inf
    assert all(np.isfinite(grads[name]).all() for name in NAMES)
    assert net.cross_entropy(y_hat, y) == pytest.approx(-math.log(1e-300), rel=1e-14)


def test_loss_and_grads_returns_the_loss_and_the_given_backward_functions_grads():
    p, x, y = _random_case(seed=4)
    loss, grads = net.loss_and_grads(p, x, y)
    ref_loss, ref_grads = _autograd(p, x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for name in NAMES:
        assert np.allclose(grads[name], ref_grads[name], rtol=1e-10, atol=1e-13)
    seen = []

    def spy(params, cache, labels):
        seen.append((params, cache, labels))
        return {"marker": 1}

    assert net.loss_and_grads(p, x, y, backward_fn=spy) == (pytest.approx(ref_loss, rel=1e-12), {"marker": 1})
    (params, cache, labels), = seen
    assert params is p and labels is y and np.allclose(cache["y_hat"], net.forward(p, x)[0])


# --- init -------------------------------------------------------------------------------------

def test_init_params_is_he_normal_with_zero_biases_drawn_in_order():
    w, f, k = 6, 4, 3
    params = net.init_params(w, f, k, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    expected = {"theta1": rng.normal(0, math.sqrt(2 / w), (w, w)),
                "theta2": rng.normal(0, math.sqrt(2 / f), (f, f)),
                "theta3": rng.normal(0, math.sqrt(2 / w), (w, k))}
    assert list(params) == list(NAMES)
    for name, value in expected.items():
        assert params[name].dtype == np.float64
        assert np.array_equal(params[name], value), name
    for name, n in (("b1", w), ("b2", f), ("b3", k)):
        assert params[name].dtype == np.float64 and np.array_equal(params[name], np.zeros(n)), name


def test_init_params_scale_is_sqrt_2_over_fan_in_and_dtype_is_honoured():
    params = net.init_params(200, 50, 3, np.random.default_rng(0), dtype=np.float32)
    assert all(v.dtype == np.float32 for v in params.values())
    assert params["theta1"].std() == pytest.approx(math.sqrt(2 / 200), rel=0.02)
    assert params["theta2"].std() == pytest.approx(math.sqrt(2 / 50), rel=0.05)
    assert params["theta3"].std() == pytest.approx(math.sqrt(2 / 200), rel=0.2)
    assert abs(params["theta1"].mean()) < 0.01


# --- SGD --------------------------------------------------------------------------------------

def _ref_sgd(p, x, y, lr, batch_size, epochs, seed):
    """Plain SGD written out: each epoch one permutation from rng, consecutive batches of it,
    p <- p - lr * (autograd gradient of the batch's mean cross-entropy)."""
    p = {k: v.copy() for k, v in p.items()}
    rng = np.random.default_rng(seed)
    steps, snapshots = [], []
    step = 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            loss, grads = _autograd(p, x[batch], y[batch])
            for name in NAMES:
                p[name] = p[name] - lr * grads[name]
            step += 1
            steps.append((step, epoch, loss))
        snapshots.append((epoch, {k: v.copy() for k, v in p.items()}))
    return p, steps, snapshots


def test_sgd_does_params_minus_lr_grad_per_batch_in_the_drawn_order():
    p, x, y = _random_case(m=7, L=4, D=3, K=2, seed=5)
    start = {k: v.copy() for k, v in p.items()}
    steps, snapshots = [], []
    out = net.sgd(p, x, y, lr=0.3, batch_size=3, epochs=2, rng=np.random.default_rng(11),
                  on_step=lambda *a: steps.append(a),
                  on_epoch=lambda e, cur: snapshots.append((e, {k: v.copy() for k, v in cur.items()})))
    ref, ref_steps, ref_snapshots = _ref_sgd(start, x, y, 0.3, 3, 2, 11)
    assert out is p                                     # updated in place and returned
    for name in NAMES:
        assert np.allclose(p[name], ref[name], rtol=1e-10, atol=1e-12), name
        assert not np.allclose(p[name], start[name]), name
    # ceil(7 / 3) = 3 steps per epoch, 2 epochs; the loss of each batch before its update
    assert [(s, e) for s, e, _ in steps] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert np.allclose([l for *_, l in steps], [l for *_, l in ref_steps], rtol=1e-12)
    assert [e for e, _ in snapshots] == [1, 2]
    for (_, got), (_, want) in zip(snapshots, ref_snapshots):
        for name in NAMES:
            assert np.allclose(got[name], want[name], rtol=1e-10, atol=1e-12)


def test_sgd_steps_are_epochs_times_ceil_n_over_batch_size():
    p, x, y = _random_case(m=8, L=3, D=2, K=2, seed=6)
    for batch_size, epochs, expected in ((4, 3, 6), (3, 1, 3), (8, 2, 2), (20, 1, 1)):
        steps = []
        net.sgd({k: v.copy() for k, v in p.items()}, x, y, 0.01, batch_size, epochs, np.random.default_rng(0),
                on_step=lambda *a: steps.append(a))
        assert [s for s, *_ in steps] == list(range(1, expected + 1)), (batch_size, epochs)


def test_sgd_without_callbacks_gives_the_same_params_and_lr_zero_changes_nothing():
    p, x, y = _random_case(m=5, L=3, D=2, K=2, seed=8)
    ref, _, _ = _ref_sgd(p, x, y, 0.5, 2, 1, 3)
    got = net.sgd({k: v.copy() for k, v in p.items()}, x, y, 0.5, 2, 1, np.random.default_rng(3))
    for name in NAMES:
        assert np.allclose(got[name], ref[name], rtol=1e-10, atol=1e-12)
    still = net.sgd({k: v.copy() for k, v in p.items()}, x, y, 0.0, 2, 2, np.random.default_rng(3))
    assert all(np.array_equal(still[k], p[k]) for k in NAMES)
    # a larger lr moves further along the same first step
    one = net.sgd({k: v.copy() for k, v in p.items()}, x, y, 0.1, 5, 1, np.random.default_rng(3))
    two = net.sgd({k: v.copy() for k, v in p.items()}, x, y, 0.2, 5, 1, np.random.default_rng(3))
    for name in NAMES:
        assert np.allclose(two[name] - p[name], 2 * (one[name] - p[name]), rtol=1e-10, atol=1e-14)
