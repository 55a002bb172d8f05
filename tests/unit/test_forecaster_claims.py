"""Claims about the numpy forecaster and its training loop: each optimiser option changes the
update as its formula says (computed here by hand from the gradients), the per-epoch lr decay,
early stopping and best-weights selection read validation only."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import StageError
from pipeline.models import mlp_forecaster as model
from pipeline.params import Mlp
from pipeline.train import forecaster
from pipeline.train.forecaster import ForecastData

L, P, H, K = 8, 3, 6, 3


def _cfg(**kw) -> Mlp:
    base = dict(input_len=L, pred_len=P, kernel=K, hidden=H, lr=0.05, weight_decay=0.0, batch_size=4, epochs=1,
                patience=3, lr_decay=1.0, clip_norm=0.0, window_norm="none", optimizer="sgd", momentum=0.9,
                dtype="float64", residual="none", lr_schedule="step")
    base.update(kw)
    return Mlp(**base)


def _data(n_windows=8, channels=2, seed=0, val_is_train=True) -> ForecastData:
    rng = np.random.default_rng(seed)
    t = np.arange(n_windows + L + P + 40)
    series = np.stack([np.sin(t / 3.0 + c) + 0.1 * rng.normal(size=len(t)) for c in range(channels)], axis=1)
    from pipeline.data.ett import windows
    x, y = windows(series[:n_windows + L + P - 1], L, P)
    xv, yv = (x, y) if val_is_train else (x, 0.5 * y)
    xt, yt = windows(series[-(n_windows + L + P - 1):], L, P)
    return ForecastData.from_windows({"train": (x, y), "val": (xv, yv), "test": (xt, yt)}, np.float64)


def _reference(data: ForecastData, cfg: Mlp, seed: int, epochs: int) -> dict:
    """The documented update, written out: per batch, grads of the element-mean MSE; clip the global
    norm to clip_norm; add weight_decay * w to the weight matrices; momentum v = m v + g; p -= lr g.
    After each epoch lr *= lr_decay."""
    rng = np.random.default_rng(seed)
    params = model.init_params(L, H, P, rng, np.float64)
    if cfg.window_norm == "revin":
        params.update(model.init_revin(data.n_channels, np.float64))
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    c = data.n_channels
    n = len(data.x_train) // c
    lr = cfg.lr
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n, cfg.batch_size):
            rows = np.concatenate([np.arange(w * c, w * c + c) for w in order[i:i + cfg.batch_size]])
            pred, cache = model.forward(params, data.x_train[rows], K, cfg.window_norm)
            grads = model.backward(params, cache, 2.0 * (pred - data.y_train[rows]) / pred.size)
            norm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
            if cfg.clip_norm and norm > cfg.clip_norm:
                grads = {k: g * (cfg.clip_norm / norm) for k, g in grads.items()}
            for name in params:
                g = grads[name] + (cfg.weight_decay * params[name] if name[-2:] in ("w1", "w2") else 0.0)
                if cfg.optimizer == "momentum":
                    velocity[name] = cfg.momentum * velocity[name] + g
                    g = velocity[name]
                params[name] = params[name] - lr * g
        lr *= cfg.lr_decay
    return params


def _assert_params_equal(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert np.allclose(a[k], b[k], rtol=1e-9, atol=1e-12), k


@pytest.mark.parametrize("options", [
    {},                                                   # plain SGD
    {"weight_decay": 0.3},                                # decay on weights, not biases
    {"clip_norm": 0.05},                                  # active clipping
    {"clip_norm": 1e6},                                   # clipping above the norm: no change
    {"optimizer": "momentum", "momentum": 0.7},
    {"optimizer": "momentum", "momentum": 0.7, "weight_decay": 0.1, "clip_norm": 0.05},
    {"window_norm": "last"},
    {"window_norm": "mean", "weight_decay": 0.1},
    {"window_norm": "revin", "weight_decay": 0.1},     # RevIN's affine map is trained, not decayed
])
def test_one_epoch_matches_the_update_formula(options):
    data, cfg = _data(), _cfg(**options)
    result = forecaster.fit(data, cfg, seed=3)
    assert result.best_epoch == 1
    _assert_params_equal(result.params, _reference(data, cfg, 3, 1))


def test_each_option_changes_the_update():
    data = _data()
    plain = forecaster.fit(data, _cfg(), seed=3).params
    for options in ({"weight_decay": 0.3}, {"clip_norm": 0.05}, {"optimizer": "momentum"}, {"lr": 0.07}):
        other = forecaster.fit(data, _cfg(**options), seed=3).params
        assert not np.allclose(other["s_w1"], plain["s_w1"], rtol=1e-9, atol=1e-12), options
    # Weight decay leaves the biases' update alone (same gradients in the first step).
    one = _data(n_windows=4)
    a = forecaster.fit(one, _cfg(), seed=3).params
    b = forecaster.fit(one, _cfg(weight_decay=0.3), seed=3).params
    assert np.allclose(a["s_b2"], b["s_b2"]) and np.allclose(a["t_b1"], b["t_b1"])
    assert not np.allclose(a["s_w2"], b["s_w2"])


def test_lr_decays_after_every_epoch_and_the_updates_use_it():
    data, cfg = _data(), _cfg(epochs=3, lr_decay=0.5, lr=0.02, patience=5)
    result = forecaster.fit(data, cfg, seed=3)
    assert [row["lr"] for row in result.history] == [0.02, 0.01, 0.005]
    assert result.best_epoch == 3          # val = train, small lr: the loss falls every epoch
    _assert_params_equal(result.params, _reference(data, cfg, 3, 3))
    assert [row["epoch"] for row in result.history] == [1, 2, 3]


def test_history_rows_report_the_train_and_validation_losses():
    data, cfg = _data(), _cfg(epochs=2, patience=5)
    seen = []
    result = forecaster.fit(data, cfg, seed=3, on_epoch=seen.append)
    assert seen == result.history and len(seen) == 2
    assert result.best_val_loss == min(r["valid_loss"] for r in result.history)
    final = forecaster.evaluate(result.params, data.x_val, data.y_val, cfg)["mse"]
    assert np.isclose(final, result.history[-1]["valid_loss"], rtol=1e-12)
    assert result.history[0]["train_loss"] > result.history[1]["train_loss"] > 0
    assert result.seconds > 0


def test_returned_weights_are_the_best_validation_ones_and_early_stopping_counts_patience():
    # Validation targets are half the training ones: validation loss goes down and up.
    data = _data(n_windows=16, val_is_train=False)
    cfg = _cfg(epochs=60, lr=0.3, patience=2, batch_size=4)
    result = forecaster.fit(data, cfg, seed=0)
    losses = [r["valid_loss"] for r in result.history]
    best = int(np.argmin(losses)) + 1
    assert 1 < result.best_epoch == best < len(losses)
    assert len(losses) == best + cfg.patience < cfg.epochs                 # stopped `patience` epochs after the best
    assert all(loss >= losses[best - 1] for loss in losses[best:])
    assert result.best_val_loss == losses[best - 1]
    assert np.isclose(forecaster.evaluate(result.params, data.x_val, data.y_val, cfg)["mse"], result.best_val_loss,
                      rtol=1e-12)
    assert losses[1] > losses[0] and losses[2] < losses[0]   # a worse epoch then a better one resets the count
    # More patience: the same epochs, then more of them.
    longer = forecaster.fit(data, _cfg(epochs=60, lr=0.3, patience=3, batch_size=4), seed=0)
    assert [r["valid_loss"] for r in longer.history[:len(losses)]] == losses and len(longer.history) > len(losses)


def test_test_data_never_influences_training_or_selection():
    data = _data(n_windows=16, val_is_train=False)
    cfg = _cfg(epochs=60, lr=0.3, patience=2, batch_size=4)
    a = forecaster.fit(data, cfg, seed=0)
    rng = np.random.default_rng(9)
    data.x_test = rng.normal(size=data.x_test.shape) * 10
    data.y_test = rng.normal(size=data.y_test.shape) * 10
    b = forecaster.fit(data, cfg, seed=0)
    assert a.best_epoch == b.best_epoch and len(a.history) == len(b.history)
    assert [r["valid_loss"] for r in a.history] == [r["valid_loss"] for r in b.history]
    _assert_params_equal(a.params, b.params)


def test_batches_hold_whole_windows_with_all_their_channels():
    # batch_size counts windows: 8 windows x 3 channels in batches of 3 windows -> 3 updates per epoch.
    data, cfg = _data(n_windows=8, channels=3), _cfg(batch_size=3)
    _assert_params_equal(forecaster.fit(data, cfg, seed=5).params, _reference(data, cfg, 5, 1))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_names_the_lr_param():
    with pytest.raises(StageError, match=r"diverged at epoch 1 .*with lr 1e\+150; lower this variant's lr"):
        forecaster.fit(_data(), _cfg(lr=1e150), seed=0)


def test_from_windows_orders_rows_window_major_with_channels_inside():
    x = np.arange(4 * 3 * 5, dtype=np.float64).reshape(4, 3, 5)
    y = -np.arange(4 * 3 * 2, dtype=np.float64).reshape(4, 3, 2)
    data = ForecastData.from_windows({"train": (x, y), "val": (x, y), "test": (x[:2], y[:2])}, np.float32)
    assert data.n_channels == 3 and data.x_train.shape == (12, 5) and data.y_test.shape == (6, 2)
    assert data.x_train.dtype == np.float32 and data.y_val.dtype == np.float32
    for n in range(4):
        for c in range(3):
            assert np.array_equal(data.x_train[n * 3 + c], x[n, c]) and np.array_equal(data.y_train[n * 3 + c], y[n, c])


def test_scores_are_the_mean_squared_and_absolute_errors():
    pred = np.array([[1.0, 2.0], [3.0, 5.0]], dtype=np.float32)
    y = np.array([[0.0, 2.0], [3.0, 3.0]])
    assert forecaster.scores(pred, y) == {"mse": 5.0 / 4, "mae": 3.0 / 4}


# -- the model ---------------------------------------------------------------------------------

def test_moving_average_is_centred_with_edge_padding():
    x = np.array([[1.0, 2.0, 6.0, 4.0, 10.0]])
    assert np.allclose(model.moving_average(x, 3), [[4 / 3, 3.0, 4.0, 20 / 3, 8.0]])
    assert np.allclose(model.moving_average(x, 1), x)
    assert model.moving_average(x.astype(np.float32), 5).dtype == np.float32
    assert np.allclose(model.moving_average(x, 5), [[(1 + 1 + 1 + 2 + 6) / 5, (1 + 1 + 2 + 6 + 4) / 5, 23 / 5,
                                                     (6 + 4 + 10 + 10 + 2) / 5, (6 + 4 + 10 + 10 + 10) / 5]])


def test_prediction_is_the_sum_of_the_seasonal_and_trend_mlps():
    rng = np.random.default_rng(0)
    params = model.init_params(L, H, P, rng, np.float64)
    params = {k: v + rng.normal(size=v.shape) * 0.1 for k, v in params.items()}
    x = rng.normal(size=(5, L))
    trend = model.moving_average(x, K)

    def mlp(part, inputs):
        return np.maximum(inputs @ params[f"{part}_w1"] + params[f"{part}_b1"], 0) @ params[f"{part}_w2"] + params[f"{part}_b2"]

    out, _ = model.forward(params, x, K)
    assert np.allclose(out, mlp("s", x - trend) + mlp("t", trend))
    assert np.allclose(model.predict(params, x, K, "none", chunk=2), out)
    # last / mean: the offset is subtracted from the inputs and added back to the prediction.
    for mode, offset in (("last", x[:, -1:]), ("mean", x.mean(axis=1, keepdims=True))):
        shifted = x - offset
        t = model.moving_average(shifted, K)
        assert np.allclose(model.forward(params, x, K, mode)[0], mlp("s", shifted - t) + mlp("t", t) + offset)


def test_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    params = model.init_params(L, H, P, rng, np.float64)
    params = {k: v + rng.normal(size=v.shape) * 0.1 for k, v in params.items()}
    x, y = rng.normal(size=(4, L)), rng.normal(size=(4, P))
    pred, cache = model.forward(params, x, K, "last")
    loss, d = model.mse_grad(pred, y)
    assert np.isclose(loss, np.mean((pred - y) ** 2))
    grads = model.backward(params, cache, d)
    eps = 1e-6
    for name, value in params.items():
        for idx in [(0,) * value.ndim, tuple(s - 1 for s in value.shape)]:
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            numeric = (model.mse_grad(model.forward(plus, x, K, "last")[0], y)[0]
                       - model.mse_grad(model.forward(minus, x, K, "last")[0], y)[0]) / (2 * eps)
            assert np.isclose(grads[name][idx], numeric, rtol=1e-5, atol=1e-8), (name, idx)


def test_initialisation_he_for_seasonal_small_for_trend_zero_biases():
    params = model.init_params(200, 300, 50, np.random.default_rng(0), np.float32)
    assert params["s_w1"].shape == (200, 300) and params["s_w2"].shape == (300, 50)
    assert params["t_w1"].shape == (200, 300) and params["t_w2"].shape == (300, 50)
    assert all(params[k].dtype == np.float32 for k in params)
    assert np.isclose(params["s_w1"].std(), np.sqrt(2 / 200), rtol=0.03)
    assert np.isclose(params["s_w2"].std(), np.sqrt(2 / 300), rtol=0.03)
    assert np.isclose(params["t_w1"].std(), 0.01, rtol=0.03) and np.isclose(params["t_w2"].std(), 0.01, rtol=0.03)
    for k in ("s_b1", "s_b2", "t_b1", "t_b2"):
        assert not params[k].any()
    assert params["s_b1"].shape == (300,) and params["t_b2"].shape == (50,)


def test_float32_training_keeps_float32_weights():
    result = forecaster.fit(_data(), _cfg(dtype="float32"), seed=3)
    assert all(v.dtype == np.float32 for v in result.params.values())
    assert all(v.dtype == np.float64 for v in forecaster.fit(_data(), _cfg(), seed=3).params.values())


def test_scores_accumulate_in_float64():
    pred, y = np.array([[0.1]], dtype=np.float32), np.array([[0.0]], dtype=np.float32)
    assert forecaster.scores(pred, y)["mse"] == float(np.float64(np.float32(0.1)) ** 2)


def test_without_a_finite_validation_loss_the_initial_weights_are_returned():
    data = _data()
    data.y_val = np.full_like(data.y_val, np.nan)
    result = forecaster.fit(data, _cfg(epochs=3, patience=2), seed=3)
    assert result.best_epoch == 0 and len(result.history) == 2
    _assert_params_equal(result.params, model.init_params(L, H, P, np.random.default_rng(3), np.float64))


def test_an_equal_validation_loss_does_not_replace_the_best_epoch():
    # lr so small that no weight moves: every epoch has the same validation loss.
    result = forecaster.fit(_data(), _cfg(epochs=10, patience=2, lr=1e-300), seed=3)
    assert len({r["valid_loss"] for r in result.history}) == 1
    assert result.best_epoch == 1 and len(result.history) == 3


def test_seconds_is_the_time_fit_took():
    import time
    start = time.perf_counter()
    result = forecaster.fit(_data(), _cfg(epochs=2), seed=3)
    assert 0 < result.seconds <= time.perf_counter() - start


# -- fit: what it reports while training -------------------------------------------------------

def test_fit_refuses_auto_and_revin_adds_the_per_channel_affine_map():
    with pytest.raises(ValueError, match="fit_auto"):
        forecaster.fit(_data(), _cfg(window_norm="auto"), seed=0)
    for dtype in ("float32", "float64"):
        params = forecaster.fit(_data(channels=3), _cfg(window_norm="revin", dtype=dtype, lr=1e-300), seed=0).params
        assert params["rv_w"].shape == (3,) and params["rv_w"].dtype == np.dtype(dtype)
        assert params["rv_b"].dtype == np.dtype(dtype)
        assert np.allclose(params["rv_w"], 1.0) and np.allclose(params["rv_b"], 0.0)
    assert "rv_w" not in forecaster.fit(_data(), _cfg(window_norm="mean"), seed=0).params


def test_float32_training_runs_the_backward_pass_in_float32(monkeypatch):
    seen = []
    backward = model.backward

    def recording(params, cache, d_out):
        seen.append(d_out.dtype)
        return backward(params, cache, d_out)

    monkeypatch.setattr(model, "backward", recording)
    data = _data()   # float64 windows, a float32 model: the loss gradient is cast to the model's dtype
    forecaster.fit(data, _cfg(dtype="float32"), seed=0)
    assert seen and all(d == np.float32 for d in seen)


def test_each_epoch_prints_one_line_with_label_losses_lr_and_seconds(capsys):
    result = forecaster.fit(_data(), _cfg(epochs=2, patience=5, lr=0.02, lr_decay=0.5), seed=3, label="mine")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, row in zip(lines, result.history):
        expected = (f"mine epoch {row['epoch']}/2  train_loss {row['train_loss']:.4f}  valid_loss "
                    f"{row['valid_loss']:.4f}  lr {row['lr']:.3g}  ")
        assert line.startswith(expected), (line, expected)
        assert line.endswith("s") and 0 <= float(line[len(expected):-1]) < 5
    forecaster.fit(_data(), _cfg(), seed=3)
    assert capsys.readouterr().out.startswith("mlp epoch 1/1  ")       # the default label


def test_the_progress_bar_counts_batches_of_windows_and_gets_every_batch_loss(monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total, desc, **kw):
            self.total, self.desc, self.kw, self.losses, self.closed = total, desc, kw, [], False
            bars.append(self)

        def step(self, loss=None):
            self.losses.append(loss)

        def close(self):
            self.closed = True

    monkeypatch.setattr(forecaster.progress, "bar", Bar)
    # 7 windows in batches of 3: 3 steps per epoch.
    result = forecaster.fit(_data(n_windows=7), _cfg(epochs=2, patience=5, batch_size=3), seed=1, label="lbl")
    assert [b.desc for b in bars] == ["lbl epoch 1/2", "lbl epoch 2/2"]
    for b, row in zip(bars, result.history):
        assert b.total == 3 and len(b.losses) == 3 and b.closed
        assert b.kw == {"items_per_step": 3, "item_unit": "windows"}
        assert np.isclose(np.mean(b.losses), row["train_loss"], rtol=1e-12)


# -- fit_auto ----------------------------------------------------------------------------------

def test_fit_auto_trains_every_normalisation_with_the_same_seed(capsys):
    data = _data(channels=2)
    cfg = _cfg(window_norm="auto", epochs=2, patience=5)
    chosen, results = forecaster.fit_auto(data, cfg, seed=4, label="run")
    assert list(results) == list(forecaster.NORMALISATIONS) == ["none", "last", "mean", "revin"]
    for norm, result in results.items():
        alone = forecaster.fit(data, _cfg(window_norm=norm, epochs=2, patience=5), seed=4)
        _assert_params_equal(result.params, alone.params)
        assert result.history == alone.history
    assert chosen == min(results, key=lambda n: results[n].best_val_loss)
    out = capsys.readouterr().out
    for norm in forecaster.NORMALISATIONS:
        assert f"run [{norm}, seed 4] epoch 2/2  " in out
    forecaster.fit_auto(data, _cfg(window_norm="auto"), seed=5)
    assert "mlp [revin, seed 5] epoch 1/1  " in capsys.readouterr().out     # the default label


@pytest.mark.parametrize("losses", [{"none": 0.5, "last": 0.2, "mean": 0.3, "revin": 0.4},
                                    {"none": 0.5, "last": 0.6, "mean": 0.3, "revin": 0.1},
                                    {"none": 0.1, "last": 0.6, "mean": 0.3, "revin": 0.2}])
def test_fit_auto_keeps_the_lowest_best_validation_loss(monkeypatch, losses):
    calls = []

    def fake_fit(data, cfg, seed, label="mlp"):
        calls.append((cfg.window_norm, seed, cfg.lr))
        # The final epoch's validation loss and the test split are not what decides.
        return forecaster.FitResult(params={}, best_val_loss=losses[cfg.window_norm],
                                    history=[{"valid_loss": 1.0 - losses[cfg.window_norm]}])

    monkeypatch.setattr(forecaster, "fit", fake_fit)
    chosen, results = forecaster.fit_auto(None, _cfg(window_norm="auto", lr=0.123), seed=7)
    assert chosen == min(losses, key=losses.get)
    assert calls == [(norm, 7, 0.123) for norm in ("none", "last", "mean", "revin")]
    assert {k: r.best_val_loss for k, r in results.items()} == losses


def test_fit_auto_with_a_fixed_window_norm_trains_only_that_one():
    data = _data()
    chosen, results = forecaster.fit_auto(data, _cfg(window_norm="mean"), seed=2)
    assert chosen == "mean" and list(results) == ["mean"]
    _assert_params_equal(results["mean"].params, forecaster.fit(data, _cfg(window_norm="mean"), seed=2).params)


def test_the_seed_decides_the_initial_weights_and_the_batch_order():
    data = _data()
    a, b = forecaster.fit(data, _cfg(), seed=1).params, forecaster.fit(data, _cfg(), seed=1).params
    c = forecaster.fit(data, _cfg(), seed=2).params
    _assert_params_equal(a, b)
    assert not np.allclose(a["s_w1"], c["s_w1"])


def test_from_windows_does_not_copy_windows_that_already_have_the_dtype():
    # ETT's windows are contiguous (N, C, L) arrays: the (N*C, L) rows are views, no second copy in memory.
    x = np.arange(4 * 3 * 5, dtype=np.float64).reshape(4, 3, 5)
    y = np.arange(4 * 3 * 2, dtype=np.float64).reshape(4, 3, 2)
    same = ForecastData.from_windows({"train": (x, y), "val": (x, y), "test": (x, y)}, np.float64)
    assert np.shares_memory(same.x_train, x) and np.shares_memory(same.y_val, y)
    other = ForecastData.from_windows({"train": (x, y), "val": (x, y), "test": (x, y)}, np.float32)
    assert not np.shares_memory(other.x_train, x) and np.array_equal(other.x_train, x.reshape(12, 5))


# -- the naive baselines and the ridge base (issue 22) ------------------------------------------

def _hand_windows() -> ForecastData:
    """Two test windows of two channels (L=3, P=2): row 2w + c is window w, channel c."""
    x_test = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0], [4.0, 4.0, 1.0], [2.0, -2.0, 0.0]])
    y_test = np.array([[3.0, 5.0], [6.0, 3.0], [0.0, 1.0], [1.0, -1.0]])
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(20, 3))
    y_train = np.stack([x_train.sum(1), x_train[:, 0] - x_train[:, 2] + 1], 1)   # an exact linear map + bias
    return ForecastData(x_train, y_train, x_train, y_train, x_test, y_test, n_channels=2)


def test_baselines_on_two_channels_worked_out_by_hand():
    got = forecaster.baselines(_hand_windows())["test"]
    # repeat-last [[3,3],[6,6],[1,1],[0,0]] - y: 0,-2, 0,3, 1,0, -1,1 -> MSE 16/8, MAE 8/8
    assert got["repeat_last"] == pytest.approx({"mse": 2.0, "mae": 1.0})
    # window mean [[2,2],[2,2],[3,3],[0,0]] - y: -1,-3, -4,-1, 3,2, -1,1 -> MSE 42/8, MAE 16/8
    assert got["window_mean"] == pytest.approx({"mse": 42 / 8, "mae": 2.0})
    # least squares recovers the exact map: forecasts [[6,-1],[6,-5],[9,4],[0,3]] - y: 3,-6, 0,-8, 9,3, -1,4
    assert got["linear"] == pytest.approx({"mse": (9 + 36 + 0 + 64 + 81 + 9 + 1 + 16) / 8,
                                           "mae": (3 + 6 + 0 + 8 + 9 + 3 + 1 + 4) / 8})


def test_ridge_path_is_lstsq_at_zero_the_augmented_problem_above_it_and_zero_at_inf():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 2))
    path = forecaster.ridge_path(x, y, [0.0, 0.5, float("inf")])
    design = np.hstack([x, np.ones((30, 1))])
    assert np.allclose(path[0.0], np.linalg.lstsq(design, y, rcond=None)[0])
    # ridge r: least squares on the design stacked with sqrt(r * n) * I rows (the intercept row not shrunk)
    shrink = np.hstack([np.sqrt(0.5 * 30) * np.eye(4), np.zeros((4, 1))])
    augmented = np.linalg.lstsq(np.vstack([design, shrink]), np.vstack([y, np.zeros((4, 2))]), rcond=None)[0]
    assert np.allclose(path[0.5], augmented)
    assert not np.allclose(path[0.5], path[0.0]) and np.array_equal(path[float("inf")], np.zeros((5, 2)))


def test_fit_base_fits_each_channel_in_the_normalised_space_and_chooses_on_validation():
    data = _data(n_windows=40, channels=2, val_is_train=False)
    base = forecaster.fit_base(data, "last", [0.0, 1.0])
    assert set(base.val_loss) == {0.0, 1.0, float("inf")} and base.weights.shape == (2, L + 1, P)
    assert base.val_loss[base.ridge] == min(base.val_loss.values())
    for ridge, loss in base.val_loss.items():   # each strength's validation MSE, recomputed per channel
        pred = np.zeros_like(data.y_val)
        for c in range(2):
            x, y = data.x_train[c::2], data.y_train[c::2]
            w = forecaster.ridge_path(x - x[:, -1:], y - x[:, -1:], [ridge])[ridge]
            xv = data.x_val[c::2]
            pred[c::2] = model.linear_forecast(w, xv - xv[:, -1:]) + xv[:, -1:]
        assert loss == pytest.approx(forecaster.scores(pred, data.y_val)["mse"], rel=1e-9)
    # inf is the zero map: under last that is repeat-last, so the base is never worse than it on validation
    repeat_last = forecaster.baselines(data, ("val",))["val"]["repeat_last"]["mse"]
    assert base.val_loss[float("inf")] == pytest.approx(repeat_last) and base.val_loss[base.ridge] <= repeat_last


def test_fit_base_keeps_the_strength_validation_prefers_even_when_it_is_the_strongest():
    # horizons that the windows do not predict: least squares fits train noise, the zero map (inf,
    # the train mean under none) is best on validation, and the base must pick it over ridge 0
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(24, L)), rng.normal(size=(24, P))
    data = ForecastData(x, y, rng.normal(size=(200, L)), rng.normal(size=(200, P)), x, y, n_channels=2)
    base = forecaster.fit_base(data, "none", [0.0, 0.1])
    assert base.ridge == float("inf") and base.val_loss[float("inf")] < base.val_loss[0.0]
    assert np.array_equal(base.weights, np.zeros((2, L + 1, P)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_linear_forecast_has_the_windows_dtype(per_channel):
    x = np.random.default_rng(4).normal(size=(4, L)).astype(np.float32)
    weights = np.ones((2, L + 1, P)) if per_channel else np.ones((L + 1, P))   # float64 weights
    out = model.linear_forecast(weights, x)
    assert out.dtype == np.float32 and out.shape == (4, P)
    assert np.allclose(out, x.astype(np.float64).sum(1, keepdims=True) + 1)


def test_the_residual_fit_starts_from_the_base_forecast_with_zero_mlp_output(monkeypatch):
    data = _data(n_windows=40, channels=2, val_is_train=False)
    cfg = _cfg(residual="linear", window_norm="mean", ridge=[0.0, 1.0], lr=1e-12, epochs=2)
    seen = []   # the weights of fit()'s first forward pass: epoch 0's validation, before any update
    real_forward = model.forward

    def spy(params, x, kernel, window_norm="none"):
        if not seen:
            seen.append({k: v.copy() for k, v in params.items()})
        return real_forward(params, x, kernel, window_norm)

    monkeypatch.setattr(model, "forward", spy)
    result = forecaster.fit(data, cfg, seed=0)
    start = seen[0]
    assert not start["s_w2"].any() and not start["t_w2"].any() and not start["s_b2"].any()   # MLP output 0
    offset = data.x_val.mean(axis=1, keepdims=True)
    by_hand = model.linear_forecast(result.base.weights, data.x_val - offset) + offset
    assert np.allclose(model.predict(start, data.x_val, K, "mean"), by_hand)   # epoch 0 is the base forecast
    # epoch 0 competes in early stopping: the best validation loss is at most the base's
    assert result.best_val_loss <= result.base.val_loss[result.base.ridge] * (1 + 1e-12)


def test_fit_auto_with_the_residual_skips_revin():
    assert forecaster.norm_candidates(_cfg(window_norm="auto", residual="linear")) == ("none", "last", "mean")
    assert forecaster.norm_candidates(_cfg(window_norm="auto")) == forecaster.NORMALISATIONS
    assert forecaster.norm_candidates(_cfg(window_norm="last", residual="linear")) == ("last",)
