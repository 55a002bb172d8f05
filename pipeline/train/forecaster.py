"""Training the numpy forecaster: mini-batch SGD (optionally momentum) with weight decay, the
learning rate multiplied by `lr_decay` after every epoch (or annealed by a cosine), early stopping
on validation loss with the best-validation weights kept. `residual: linear` starts the MLPs from a
closed-form per-channel ridge forecast (ridge chosen on validation) and trains only what it misses;
with `cross_check`, the trained MLPs replace that base only if early stopping's pick holds up on
validation windows it did not pick on. `window_norm: auto` trains every
normalisation and keeps the one with the lowest validation loss; the test split is never looked at
during training or choosing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from pipeline import progress
from pipeline.errors import StageError
from pipeline.models import mlp_forecaster as model
from pipeline.params import Mlp


@dataclass
class ForecastData:
    """Windows of the standardised series; rows are (window, channel), shapes (N*C, L) / (N*C, P)."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_channels: int

    @classmethod
    def from_windows(cls, splits: dict[str, tuple[np.ndarray, np.ndarray]], dtype) -> "ForecastData":
        rows = {}
        for split, (x, y) in splits.items():
            rows[f"x_{split}"] = x.reshape(-1, x.shape[-1]).astype(dtype, copy=False)
            rows[f"y_{split}"] = y.reshape(-1, y.shape[-1]).astype(dtype, copy=False)
        return cls(**rows, n_channels=splits["train"][0].shape[1])


@dataclass
class FitResult:
    params: dict
    history: list[dict] = field(default_factory=list)   # one row per epoch
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    seconds: float = 0.0
    base: "LinearBase | None" = None   # residual: linear: the closed-form forecast the MLPs start from
    start_params: dict = field(default_factory=dict)   # the weights before the first epoch (the base)
    start_losses: dict = field(default_factory=dict)   # their valid_loss (and _a, _b), as in a history row


def validation_halves(n_windows: int, n_channels: int, gap: int) -> tuple[slice, slice] | None:
    """Rows of the first and the last block of validation windows, `gap` windows apart (input_len +
    pred_len: no time step in both) or less when the split is too short to leave one; None below
    two windows. Row r of a split is channel r % C of window r // C."""
    gap = max(0, min(gap, n_windows - 2))
    half = (n_windows - gap) // 2
    if half < 1:
        return None
    return slice(0, half * n_channels), slice((n_windows - half) * n_channels, n_windows * n_channels)


def scores(pred: np.ndarray, y: np.ndarray) -> dict:
    """MSE and MAE averaged over every row and step (float64 accumulation)."""
    err = pred.astype(np.float64) - y
    return {"mse": float(np.mean(err ** 2)), "mae": float(np.mean(np.abs(err)))}


def naive_forecasts(x: np.ndarray, pred_len: int) -> dict[str, np.ndarray]:
    """The trivial forecasts of rows x (rows, L): repeat the last value, or the window's mean."""
    return {"repeat_last": np.repeat(x[:, -1:], pred_len, axis=1),
            "window_mean": np.repeat(x.mean(axis=1, keepdims=True), pred_len, axis=1)}


def fit_linear(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Closed-form least squares y ~ [x, 1] @ W over the (window, channel) rows; W is (L+1, P)."""
    design = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
    return np.linalg.lstsq(design, y.astype(np.float64), rcond=None)[0]


def baselines(data: ForecastData, splits: tuple[str, ...] = ("test",)) -> dict[str, dict[str, dict]]:
    """Per split, MSE/MAE of repeat-last, window-mean and the train-fitted linear forecast (fitted once)."""
    weights = fit_linear(data.x_train, data.y_train)
    out = {}
    for split in splits:
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        preds = {**naive_forecasts(x, y.shape[1]), "linear": model.linear_forecast(weights, x)}
        out[split] = {name: scores(pred, y) for name, pred in preds.items()}
    return out


def ridge_path(x: np.ndarray, y: np.ndarray, ridges) -> dict[float, np.ndarray]:
    """Closed-form ridge least squares y ~ [x, 1] @ W for each strength r: minimises
    |[x, 1] W - y|^2 + r * len(x) * |W[:-1]|^2 (the intercept row is not shrunk; scaling by the row
    count makes r comparable across series lengths). r = 0 is plain least squares (lstsq), r = inf
    the zero map. W is (L+1, P), float64."""
    design = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
    target = y.astype(np.float64)
    gram, moment = design.T @ design, design.T @ target
    penalty = np.eye(len(gram)) * len(x)
    penalty[-1, -1] = 0.0
    out = {}
    for r in ridges:
        if r == 0:
            out[r] = np.linalg.lstsq(design, target, rcond=None)[0]
        elif np.isinf(r):
            out[r] = np.zeros_like(moment)
        else:
            out[r] = np.linalg.solve(gram + r * penalty, moment)
    return out


@dataclass
class LinearBase:
    weights: np.ndarray                  # (C, L+1, P): one map per channel, in the normalised space
    ridge: float                         # the chosen strength (inf: the zero map, the naive forecast)
    val_loss: dict[float, float]         # validation MSE of every strength tried


def fit_base(data: ForecastData, window_norm: str, ridges) -> LinearBase:
    """The residual's base: per channel, a ridge map from the normalised window (the one the MLPs
    see: minus its last value or mean, or as it is) to the horizon minus the same offset, fitted on
    the train windows; the strength is chosen on validation among `ridges` and inf. inf is the zero
    map, i.e. the normalisation's naive forecast (last: repeat-last, mean: window mean, none: the
    train mean), so the base is never worse on validation than that forecast. On a random walk
    (under last) a strong ridge leaves repeat-last; on ETTh1 the plain least-squares map is kept."""
    channels = data.n_channels

    def normalised(x, y):
        x_n, offset = model.normalise(x.astype(np.float64), window_norm)
        return x_n.reshape(-1, channels, x.shape[-1]), (y - offset).reshape(-1, channels, y.shape[-1])

    (x_tr, y_tr), (x_va, y_va) = normalised(data.x_train, data.y_train), normalised(data.x_val, data.y_val)
    strengths = sorted(set(map(float, ridges)) | {float("inf")})
    paths = [ridge_path(x_tr[:, c], y_tr[:, c], strengths) for c in range(channels)]
    weights = {r: np.stack([path[r] for path in paths]) for r in strengths}
    x_va, y_va = x_va.reshape(-1, x_va.shape[-1]), y_va.reshape(-1, y_va.shape[-1])   # back to window-major rows
    val_loss = {r: scores(model.linear_forecast(w, x_va), y_va)["mse"] for r, w in weights.items()}
    best = min(strengths, key=lambda r: val_loss[r])   # ties: the weaker ridge (sorted first)
    return LinearBase(weights[best], best, val_loss)


def evaluate(params: dict, x: np.ndarray, y: np.ndarray, cfg: Mlp) -> dict:
    return scores(model.predict(params, x, cfg.kernel, cfg.window_norm), y)


def validation_losses(params: dict, data: ForecastData, cfg: Mlp, halves) -> dict:
    """valid_loss on every validation window and, with halves, valid_loss_a / _b on each block."""
    pred = model.predict(params, data.x_val, cfg.kernel, cfg.window_norm)
    losses = {"valid_loss": scores(pred, data.y_val)["mse"]}
    if halves:
        for key, rows in zip(("valid_loss_a", "valid_loss_b"), halves):
            losses[key] = scores(pred[rows], data.y_val[rows])["mse"]
    return losses


def early_stopping_pick(losses: list[float], patience: int) -> int:
    """The epoch (index into losses; 0 = before training) early stopping keeps: the lowest loss
    seen before `patience` epochs in a row fail to improve on it (ties: the earlier)."""
    best, stale = 0, 0
    for epoch in range(1, len(losses)):
        if losses[epoch] < losses[best]:
            best, stale = epoch, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best


def learning_rate(cfg: Mlp, epoch: int) -> float:
    """The lr of an epoch (1-based): step multiplies it by lr_decay after every epoch; cosine
    anneals it from lr towards 0 over `epochs` (the value at each epoch's start)."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + np.cos(np.pi * (epoch - 1) / cfg.epochs))
    return cfg.lr * cfg.lr_decay ** (epoch - 1)


def fit(data: ForecastData, cfg: Mlp, seed: int, on_epoch: Callable[[dict], None] | None = None,
        label: str = "mlp") -> FitResult:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(cfg.dtype)
    if cfg.window_norm == "auto":
        raise ValueError("fit() trains one normalisation; use fit_auto() for window_norm: auto")
    params = model.init_params(cfg.input_len, cfg.hidden, cfg.pred_len, rng, dtype)
    if cfg.window_norm == "revin":
        params.update(model.init_revin(data.n_channels, dtype))
    result = FitResult(params={k: v.copy() for k, v in params.items()})
    if cfg.residual == "linear":
        # The MLPs learn what the base forecast misses: they start at zero output, so "epoch 0"
        # is the base itself and early stopping can never end worse than it on validation.
        result.base = fit_base(data, cfg.window_norm, cfg.ridge)
        params["lin_w"] = result.base.weights.astype(dtype)
        params["s_w2"][:] = 0
        params["t_w2"][:] = 0
        result.params = {k: v.copy() for k, v in params.items()}
    halves = validation_halves(len(data.x_val) // data.n_channels, data.n_channels, cfg.input_len + cfg.pred_len)
    result.start_params = result.params
    result.start_losses = validation_losses(params, data, cfg, halves)
    if cfg.residual == "linear":
        result.best_val_loss = result.start_losses["valid_loss"]
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    n_windows = len(data.x_train) // data.n_channels
    channel_offsets = np.arange(data.n_channels)
    stale, start = 0, time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        lr = learning_rate(cfg, epoch)
        order = rng.permutation(n_windows)
        losses = []
        epoch_start = time.perf_counter()
        bar = progress.bar(-(-n_windows // cfg.batch_size), f"{label} epoch {epoch}/{cfg.epochs}",
                           items_per_step=cfg.batch_size, item_unit="windows")
        for i in range(0, n_windows, cfg.batch_size):
            # A batch is `batch_size` windows with all their channels.
            rows = (order[i:i + cfg.batch_size, None] * data.n_channels + channel_offsets).reshape(-1)
            x, y = data.x_train[rows], data.y_train[rows]
            pred, cache = model.forward(params, x, cfg.kernel, cfg.window_norm)
            loss, d_pred = model.mse_grad(pred, y)
            grads = model.backward(params, cache, d_pred.astype(dtype, copy=False))
            if cfg.clip_norm:
                norm = np.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
                if norm > cfg.clip_norm:
                    for grad in grads.values():
                        grad *= cfg.clip_norm / norm
            for name, grad in grads.items():
                if name.endswith(("w1", "w2")) and cfg.weight_decay:
                    grad += cfg.weight_decay * params[name]
                if cfg.optimizer == "momentum":
                    velocity[name] *= cfg.momentum
                    velocity[name] += grad
                    grad = velocity[name]
                params[name] -= lr * grad
            losses.append(loss)
            bar.step(loss)
        bar.close()
        if not np.isfinite(losses[-1]):
            # A user's params can cause this: one message with the way out (exit 2), no traceback.
            raise StageError(f"{label}: training diverged at epoch {epoch} (loss {losses[-1]}) with lr {cfg.lr}; "
                             f"lower this variant's lr in params.yaml (mlp.variants.<variant>.lr or "
                             f"mlp.defaults.lr, e.g. 5x smaller) or clip gradients (mlp.defaults.clip_norm: 1.0)")
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)),
               **validation_losses(params, data, cfg, halves), "lr": lr}
        result.history.append(row)
        progress.epoch_line(epoch, cfg.epochs, time.perf_counter() - epoch_start, prefix=label,
                            train_loss=row["train_loss"], valid_loss=row["valid_loss"], lr=lr)
        if on_epoch:
            on_epoch(row)
        if row["valid_loss"] < result.best_val_loss:
            result.best_val_loss, result.best_epoch, stale = row["valid_loss"], epoch, 0
            result.params = {k: v.copy() for k, v in params.items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    result.seconds = time.perf_counter() - start
    return result


NORMALISATIONS = ("none", "last", "mean", "revin")   # the candidates of window_norm: auto
RESIDUAL_NORMALISATIONS = ("none", "last", "mean")   # with residual: linear (revin's base would be per-window scaled)


def norm_candidates(cfg: Mlp) -> tuple[str, ...]:
    """The normalisations window_norm: auto tries (one fit each on the first seed)."""
    if cfg.window_norm != "auto":
        return (cfg.window_norm,)
    return RESIDUAL_NORMALISATIONS if cfg.residual == "linear" else NORMALISATIONS


def fit_auto(data: ForecastData, cfg: Mlp, seed: int, label: str = "mlp") -> tuple[str, dict[str, FitResult]]:
    """Train one model per normalisation (same seed) and return the one with the lowest best
    validation loss, with every candidate's result. A fixed window_norm trains just that one."""
    candidates = norm_candidates(cfg)
    results = {norm: fit(data, replace(cfg, window_norm=norm), seed, label=f"{label} [{norm}, seed {seed}]")
               for norm in candidates}
    chosen = min(results, key=lambda norm: results[norm].best_val_loss)
    return chosen, results


def cross_fitted_loss(result: FitResult, patience: int, trained: bool = True) -> float | None:
    """Validation loss of early stopping's pick, measured where it did not pick: the epoch picked on
    block a scored on block b, and the other way round, averaged; trained=False scores the start
    (the base) the same way. None without halves (a validation split under two windows)."""
    rows = [result.start_losses, *result.history]
    if "valid_loss_a" not in result.start_losses:
        return None
    curve = {h: [row[f"valid_loss_{h}"] for row in rows] for h in "ab"}
    pick = {h: early_stopping_pick(curve[h], patience) if trained else 0 for h in "ab"}
    return (curve["b"][pick["a"]] + curve["a"][pick["b"]]) / 2


@dataclass
class CrossCheck:
    trained: float   # seed mean of the cross-fitted loss of the early-stopped MLPs
    base: float      # seed mean of the same for the starting forecast (the ridge base)

    @property
    def keeps_trained(self) -> bool:
        return self.trained < self.base   # ties keep the simpler model

    @property
    def kept(self) -> str:
        return "trained" if self.keeps_trained else "base"


def cross_check(results: list[FitResult], patience: int) -> CrossCheck | None:
    """Does training beat the base on validation once the pick's optimism is removed? Early
    stopping keeps the lowest point of a noisy validation curve, so its validation loss flatters
    it; scoring each half's pick on the other half does not. Averaged over the seeds (one seed's
    curve is too noisy to decide by). None when a split is too short to halve."""
    trained = [cross_fitted_loss(r, patience) for r in results]
    if any(v is None for v in trained):
        return None
    return CrossCheck(float(np.mean(trained)), float(np.mean([cross_fitted_loss(r, patience, False) for r in results])))


def back_to_start(result: FitResult) -> FitResult:
    """The fit with its starting weights kept (epoch 0, the base), history unchanged."""
    return replace(result, params=result.start_params, best_epoch=0,
                   best_val_loss=result.start_losses["valid_loss"])


@dataclass
class VariantFit:
    window_norm: str                    # the normalisation chosen on the first seed
    candidates: dict[str, FitResult]    # the first seed's fit under each normalisation tried
    results: dict[int, FitResult]       # seed -> the fit kept (after the cross-check)
    check: CrossCheck | None            # residual: linear with cross_check: the decision


def fit_seeds(data: ForecastData, cfg: Mlp, seeds: list[int], label: str = "mlp") -> VariantFit:
    """A variant as the stage trains it: window_norm: auto chooses on the first seed, the other seeds
    train the chosen one; then, with residual: linear and cross_check, every seed keeps its base
    unless the cross-check says the trained MLPs beat it."""
    chosen, candidates = fit_auto(data, cfg, seeds[0], label=label)
    results = {seeds[0]: candidates[chosen]}
    for seed in seeds[1:]:
        results[seed] = fit(data, replace(cfg, window_norm=chosen), seed, label=f"{label} [{chosen}, seed {seed}]")
    results, check = cross_checked(results, cfg)
    return VariantFit(chosen, candidates, results, check)


def cross_checked(results: dict[int, FitResult], cfg: Mlp) -> tuple[dict[int, FitResult], CrossCheck | None]:
    """The seeds' fits as the cross-check leaves them (all trained, or all back at their base) and
    the check; with residual: none or cross_check off, the fits as they are and no check."""
    check = cross_check(list(results.values()), cfg.patience) if cfg.residual == "linear" and cfg.cross_check else None
    if check and not check.keeps_trained:
        results = {seed: back_to_start(r) for seed, r in results.items()}
    return results, check
