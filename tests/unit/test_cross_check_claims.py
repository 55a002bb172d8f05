"""Claims about the residual's cross-check (issue 22): early stopping's pick on each half of the
validation windows is scored on the other half, averaged over the seeds, and the seeds keep the
trained MLPs only when that beats the base scored the same way."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.models import mlp_forecaster as model
from pipeline.train import forecaster
from pipeline.train.forecaster import CrossCheck, FitResult

from tests.unit.test_forecaster_claims import K, _cfg, _data


@pytest.mark.parametrize("n_windows, channels, gap, expected", [
    (10, 2, 4, (slice(0, 6), slice(14, 20))),    # 3 windows each side, 4 windows apart
    (10, 1, 0, (slice(0, 5), slice(5, 10))),     # no gap: the two halves
    (11, 1, 0, (slice(0, 5), slice(6, 11))),     # odd: the middle window is in neither
    (3, 2, 288, (slice(0, 2), slice(4, 6))),     # too short for the gap: it shrinks to leave one each
    (2, 3, 288, (slice(0, 3), slice(3, 6))),
])
def test_validation_halves_are_the_first_and_last_blocks_of_whole_windows(n_windows, channels, gap, expected):
    assert forecaster.validation_halves(n_windows, channels, gap) == expected


def test_one_validation_window_has_no_halves():
    assert forecaster.validation_halves(1, 7, 0) is None


@pytest.mark.parametrize("losses, patience, pick", [
    ([1.0, 0.9, 0.95, 0.8, 0.85], 2, 3),
    ([1.0, 0.9, 0.95, 0.8, 0.85], 1, 1),    # stopped at epoch 2: epoch 3 is never seen
    ([1.0, 1.0, 1.1], 5, 0),                # an equal loss does not replace the earlier epoch
    ([1.0, 1.2, 1.1, 0.5], 2, 0),           # two epochs without improvement stop it before 0.5
    ([1.0, 1.2, 1.1, 0.5], 3, 3),
    ([1.0], 5, 0),
])
def test_early_stopping_pick_keeps_the_lowest_loss_seen_before_patience_runs_out(losses, patience, pick):
    assert forecaster.early_stopping_pick(losses, patience) == pick


def _result(a: list[float], b: list[float]) -> FitResult:
    """A fit whose validation blocks gave these losses at epochs 0, 1, ..."""
    rows = [{"valid_loss": (x + y) / 2, "valid_loss_a": x, "valid_loss_b": y} for x, y in zip(a, b)]
    return FitResult(params={"w": np.ones(1)}, history=[{"epoch": e, **r} for e, r in enumerate(rows) if e],
                     start_params={"w": np.zeros(1)}, start_losses=rows[0])


def test_each_halfs_pick_is_scored_on_the_other_half():
    result = _result(a=[1.0, 0.9, 0.95], b=[1.0, 1.1, 0.8])   # a picks epoch 1, b picks epoch 2
    assert forecaster.cross_fitted_loss(result, patience=5) == pytest.approx((1.1 + 0.95) / 2)
    assert forecaster.cross_fitted_loss(result, patience=5, trained=False) == pytest.approx(1.0)
    # with patience 1, a stops at its epoch 1 and b at its epoch 1 (no improvement): b keeps epoch 0
    assert forecaster.cross_fitted_loss(result, patience=1) == pytest.approx((1.1 + 1.0) / 2)


def test_no_halves_no_cross_fitted_loss():
    result = FitResult(params={}, start_losses={"valid_loss": 1.0})
    assert forecaster.cross_fitted_loss(result, patience=3) is None
    assert forecaster.cross_check([result], patience=3) is None


def test_the_check_averages_the_seeds_and_a_tie_keeps_the_base():
    helps = _result(a=[1.0, 0.5], b=[1.0, 0.5])       # cross-fitted 0.5, base 1.0
    hurts = _result(a=[1.0, 0.9, 2.0], b=[2.0, 1.0, 0.9])   # picks 1 and 2, cross (1.0 + 2.0) / 2 = 1.5, base 1.5
    check = forecaster.cross_check([helps, hurts], patience=5)
    assert check == CrossCheck(trained=pytest.approx(1.0), base=pytest.approx(1.25))
    assert check.keeps_trained and check.kept == "trained"
    assert not CrossCheck(trained=1.0, base=1.0).keeps_trained and CrossCheck(1.0, 1.0).kept == "base"
    assert not CrossCheck(trained=1.1, base=1.0).keeps_trained


def test_back_to_start_keeps_the_starting_weights_and_the_history():
    result = _result(a=[1.0, 0.5], b=[1.2, 0.5])
    result.best_epoch, result.best_val_loss = 1, 0.5
    back = forecaster.back_to_start(result)
    assert back.params is result.start_params and back.best_epoch == 0 and back.best_val_loss == pytest.approx(1.1)
    assert back.history == result.history and result.best_epoch == 1   # the original is left as it was


def test_fit_records_each_blocks_loss_at_the_start_and_after_every_epoch():
    data = _data(n_windows=40, channels=2, val_is_train=False)
    cfg = _cfg(residual="linear", ridge=[0.0], epochs=2)
    result = forecaster.fit(data, cfg, seed=0)
    a, b = forecaster.validation_halves(40, 2, cfg.input_len + cfg.pred_len)
    pred = model.predict(result.start_params, data.x_val, K, "none")
    start = result.start_losses
    assert start["valid_loss_a"] == pytest.approx(forecaster.scores(pred[a], data.y_val[a])["mse"])
    assert start["valid_loss_b"] == pytest.approx(forecaster.scores(pred[b], data.y_val[b])["mse"])
    assert start["valid_loss"] == pytest.approx(result.base.val_loss[result.base.ridge])
    assert not result.start_params["s_w2"].any()   # the start is the base: the MLPs' output is zero
    assert [set(row) >= {"valid_loss_a", "valid_loss_b"} for row in result.history] == [True, True]
    assert result.history[-1]["valid_loss_a"] != start["valid_loss_a"]   # measured after training, not copied


@pytest.mark.parametrize("trained, base, kept", [(0.5, 1.0, "trained"), (1.0, 1.0, "base"), (2.0, 1.0, "base")])
def test_fit_seeds_keeps_every_seeds_base_unless_the_check_favours_training(monkeypatch, trained, base, kept):
    data = _data(n_windows=40, channels=2, val_is_train=False)
    cfg = _cfg(residual="linear", ridge=[0.0], epochs=3, lr=0.5)
    calls = []

    def check(results, patience):
        calls.append((len(results), patience))
        return CrossCheck(trained, base)

    monkeypatch.setattr(forecaster, "cross_check", check)
    fitted = forecaster.fit_seeds(data, cfg, [0, 1], label="t")
    assert calls == [(2, cfg.patience)] and fitted.check == CrossCheck(trained, base)
    plain = {seed: forecaster.fit(data, cfg, seed) for seed in (0, 1)}
    for seed, result in fitted.results.items():
        expect = plain[seed] if kept == "trained" else forecaster.back_to_start(plain[seed])
        assert result.best_epoch == expect.best_epoch and result.best_val_loss == expect.best_val_loss
        for k in expect.params:
            assert np.array_equal(result.params[k], expect.params[k]), k


@pytest.mark.parametrize("change", [dict(cross_check=False), dict(residual="none")])
def test_fit_seeds_checks_only_the_residual_with_cross_check_on(monkeypatch, change):
    monkeypatch.setattr(forecaster, "cross_check", lambda *a: pytest.fail("cross_check called"))
    cfg = _cfg(**{"residual": "linear", "ridge": [0.0], "epochs": 1, **change})
    fitted = forecaster.fit_seeds(_data(n_windows=40, channels=2), cfg, [3], label="t")
    assert fitted.check is None and fitted.window_norm == "none" and list(fitted.results) == [3]


def test_fit_seeds_trains_the_first_seeds_choice_of_normalisation_on_the_other_seeds(monkeypatch):
    cfg = _cfg(residual="linear", ridge=[0.0], epochs=1, window_norm="auto", cross_check=False)
    trained = []
    real_fit = forecaster.fit

    def spy(data, cfg, seed, on_epoch=None, label="mlp"):
        trained.append((cfg.window_norm, seed))
        return real_fit(data, cfg, seed, label=label)

    monkeypatch.setattr(forecaster, "fit", spy)
    monkeypatch.setattr(forecaster, "fit_auto", lambda data, cfg, seed, label: (
        "last", {n: real_fit(data, replace(cfg, window_norm=n), seed) for n in ("none", "last")}))
    fitted = forecaster.fit_seeds(_data(n_windows=40, channels=2), cfg, [5, 6, 7], label="t")
    assert trained == [("last", 6), ("last", 7)]
    assert fitted.window_norm == "last" and fitted.results[5] is fitted.candidates["last"]


def test_fit_seeds_labels_every_seeds_lines_with_its_normalisation_and_seed(capsys):
    forecaster.fit_seeds(_data(n_windows=40, channels=2), _cfg(epochs=1), [0, 1], label="t")
    out = capsys.readouterr().out
    assert "t [none, seed 0] epoch 1/1" in out and "t [none, seed 1] epoch 1/1" in out
    forecaster.fit_seeds(_data(n_windows=40, channels=2), _cfg(epochs=1), [4])
    assert "mlp [none, seed 4] epoch 1/1" in capsys.readouterr().out   # the default label


@pytest.mark.parametrize("epoch, expected", [(1, 2.0), (6, 1.0 + np.cos(np.pi / 4)), (11, 1.0), (21, 0.0)])
def test_the_cosine_schedule_anneals_lr_to_zero_over_the_epochs(epoch, expected):
    cfg = _cfg(lr=2.0, epochs=20, lr_schedule="cosine", lr_decay=0.5)   # lr_decay is the step schedule's
    assert forecaster.learning_rate(cfg, epoch) == pytest.approx(expected, abs=1e-12)


def test_a_residual_fit_that_only_gets_worse_keeps_its_base_at_epoch_0():
    data = _data(n_windows=40, channels=2, val_is_train=False)
    cfg = _cfg(residual="linear", ridge=[0.0], epochs=2, lr=10.0, clip_norm=1.0)   # wild steps: worse every epoch
    result = forecaster.fit(data, cfg, seed=0)
    assert all(row["valid_loss"] > result.start_losses["valid_loss"] for row in result.history)
    assert result.best_epoch == 0 and result.best_val_loss == result.start_losses["valid_loss"]
    assert all(np.array_equal(result.params[k], result.start_params[k]) for k in result.params)


def test_the_base_map_takes_the_training_dtype():
    result = forecaster.fit(_data(n_windows=40, channels=2), _cfg(residual="linear", ridge=[0.0], dtype="float32"), 0)
    assert result.params["lin_w"].dtype == np.float32
