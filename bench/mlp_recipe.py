"""Part 2's recipe, reproducibly: the choices tuned on ETTh1's validation split, then the chosen
recipe run unchanged on generated series (issue 22).

    python -m bench.mlp_recipe tune                 # validation MSE of each candidate (ETTh1, first seed)
    python -m bench.mlp_recipe probe                # variations of the adopted recipe (3 seeds), validation only
    python -m bench.mlp_recipe crosscheck           # per seed: the cross-check's numbers, validation only
    python -m bench.mlp_recipe evaluate --seeds 5   # test MSE/MAE per series: baselines, MLP before / after

The "after" recipe is params.yaml's mlp.defaults as it is now; "before" is the recipe this issue
replaced (BEFORE below). The test split is read only by `evaluate`, never by `tune`, `probe` or
`crosscheck`.
Series: ETTh1 (the real file, $DATA_MIRROR or /work/shared/data), a Gaussian random walk, and a
trend plus daily seasonality plus noise (3 channels, 6000 hourly steps, fixed seeds; the 70/10/20
split of a custom CSV).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import params as P
from pipeline.data import ett
from pipeline.train.forecaster import (ForecastData, baselines, cross_check, cross_checked, cross_fitted_loss, fit,
                                       fit_base, fit_seeds, scores)
from pipeline.models.mlp_forecaster import predict

# The defaults before issue 22: lr halved every epoch, 10 epochs, window_norm auto, no residual.
BEFORE = dict(lr=2.0, weight_decay=0.001, epochs=10, patience=3, lr_schedule="step", lr_decay=0.5,
              window_norm="auto", residual="none", cross_check=False)
# Candidates tried on ETTh1's validation split (first seed); each changes the "before" recipe.
# "residual ridge" is the recipe adopted (params.yaml's mlp.defaults): per-channel ridge base in the
# normalised window, ridge chosen on validation, the MLPs trained on what it misses.
CANDIDATES = {
    "before (auto norm)": {},
    "plain, cosine, 20 epochs, patience 5": dict(window_norm="none", lr_schedule="cosine", epochs=20, patience=5),
    "residual ridge, auto norm, step 0.5": dict(residual="linear"),
    "residual ridge, none, cosine, 20 epochs, patience 5 (adopted, auto norm)": dict(
        window_norm="none", residual="linear", lr_schedule="cosine", epochs=20, patience=5),
    "residual ridge, none, lr 0.4": dict(window_norm="none", residual="linear", lr=0.4),
    "residual ridge, none, lr 0.1": dict(window_norm="none", residual="linear", lr=0.1),
    "residual ridge, none, cosine, lr 0.4": dict(window_norm="none", residual="linear", lr_schedule="cosine", lr=0.4),
    "residual ridge, none, lr 0.4, weight decay 0.01": dict(window_norm="none", residual="linear", lr=0.4,
                                                            weight_decay=0.01),
}


# Variations of the adopted recipe (window_norm fixed at none, which auto chooses on ETTh1): does any
# change beat it on validation, averaged over 3 seeds? (`probe`; the ETTh1 target of issue 22.)
VARIATIONS = {
    "adopted": {},
    "weight decay 0.01": dict(weight_decay=0.01),
    "weight decay 0.03": dict(weight_decay=0.03),
    "hidden 128": dict(hidden=128),
    "lr 1.0": dict(lr=1.0),
    "lr 4.0": dict(lr=4.0),
    "10 epochs": dict(epochs=10),
    "batch 128": dict(batch_size=128),
}


def series(name: str) -> tuple[pd.DataFrame, str]:
    """(frame with a date column, split name): ETTh1's name selects the ETT split."""
    if name == "ETTh1":
        mirror = Path(os.environ.get("DATA_MIRROR") or Path(__file__).resolve().parents[2] / "shared" / "data")
        return ett.load_csv(mirror / "ETTh1.csv"), "ETTh1"
    rng = np.random.default_rng({"random_walk": 1, "trend_season": 2}[name])
    n, t = 6000, np.arange(6000)[:, None]
    if name == "random_walk":
        values = np.cumsum(rng.normal(size=(n, 3)), axis=0)
    else:
        values = 0.002 * t * np.array([1.0, -0.5, 2.0]) + np.sin(2 * np.pi * t / 24 + np.array([0, 1, 2])) \
            + 0.3 * rng.normal(size=(n, 3))
    frame = pd.DataFrame(values, columns=["a", "b", "OT"])
    frame.insert(0, "date", pd.date_range("2020-01-01", periods=n, freq="h").astype(str))
    return frame, name


def load(name: str, cfg) -> ForecastData:
    frame, split_name = series(name)
    splits = ett.standardised_splits(frame, split_name, cfg.input_len, pred_len=cfg.pred_len)
    windows = {s: ett.windows(getattr(splits, s), cfg.input_len, cfg.pred_len) for s in ("train", "val", "test")}
    return ForecastData.from_windows(windows, np.dtype(cfg.dtype))


def train(data: ForecastData, cfg, seeds: list[int]) -> list:
    """As the stage does (fit_seeds): [the config with the chosen normalisation, each seed's fit]."""
    fitted = fit_seeds(data, cfg, seeds, label="bench")
    return [replace(cfg, window_norm=fitted.window_norm), *fitted.results.values()]


def tune(defaults, seed: int, only: list[str]) -> None:
    data = load("ETTh1", defaults)
    data.x_test = data.y_test = None   # tuning never sees the test split
    val = baselines(data, ("val",))["val"]
    print("validation MSE, ETTh1:", ", ".join(f"{k} {v['mse']:.4f}" for k, v in val.items()))
    print("| candidate | validation MSE | window_norm | ridge | best epoch | CPU s |")
    for name, change in CANDIDATES.items():
        if only and name not in only:
            continue
        cfg = replace(defaults, **{**BEFORE, **change})
        start = time.process_time()
        chosen_cfg, result, *_ = train(data, cfg, [seed])
        ridge = "-" if result.base is None else f"{result.base.ridge:g} (base {result.base.val_loss[result.base.ridge]:.4f})"
        print(f"| {name} | {result.best_val_loss:.4f} | {chosen_cfg.window_norm} | {ridge} | {result.best_epoch} "
              f"| {time.process_time() - start:.0f} |", flush=True)


def probe(defaults, seeds: list[int]) -> None:
    """Validation only: each variation over `seeds`; whether the adopted MLP's gain over its ridge base
    holds on both halves of the validation windows (is early stopping's pick optimistic?); and a
    channel-mixing ridge base (every channel's window -> every channel's horizon) against the
    per-channel one."""
    cfg = replace(defaults, window_norm="none")
    data = load("ETTh1", cfg)
    data.x_test = data.y_test = None
    print("| variation | validation MSE per seed | mean | best epochs | CPU s |")
    adopted = None
    for name, change in VARIATIONS.items():
        start = time.process_time()
        results = [fit(data, replace(cfg, **change), seed, label=f"probe {name}") for seed in seeds]
        adopted = adopted or results
        losses = [r.best_val_loss for r in results]
        print(f"| {name} | {' '.join(f'{v:.4f}' for v in losses)} | {np.mean(losses):.4f} "
              f"| {[r.best_epoch for r in results]} | {time.process_time() - start:.0f} |", flush=True)
    channels, n = data.n_channels, len(data.x_val) // data.n_channels
    for seed, result in zip(seeds, adopted):
        base = {**result.params, **{k: np.zeros_like(result.params[k]) for k in ("s_w2", "t_w2", "s_b2", "t_b2")}}
        for half, (a, b) in (("first", (0, n // 2)), ("second", (n // 2, n))):
            x, y = data.x_val[a * channels:b * channels], data.y_val[a * channels:b * channels]
            print(f"seed {seed} (best epoch {result.best_epoch}), {half} half of validation: "
                  f"MLP {scores(predict(result.params, x, cfg.kernel, 'none'), y)['mse']:.4f}, "
                  f"its ridge base {scores(predict(base, x, cfg.kernel, 'none'), y)['mse']:.4f}")
    by_window = lambda x: np.hstack([x.reshape(len(x) // channels, -1), np.ones((len(x) // channels, 1))])
    x_tr, y_tr = by_window(data.x_train.astype(np.float64)), data.y_train.reshape(len(data.x_train) // channels, -1)
    x_va, y_va = by_window(data.x_val.astype(np.float64)), data.y_val.reshape(n, -1)
    gram, cross = x_tr.T @ x_tr, x_tr.T @ y_tr
    mixing = {r: float(np.mean((x_va @ np.linalg.solve(gram + r * np.eye(len(gram)), cross) - y_va) ** 2))
              for r in (1.0, 100.0, 1e3, 1e4, 1e5)}
    per_channel = fit_base(data, "none", cfg.ridge)
    print("channel-mixing ridge base, validation MSE:", ", ".join(f"ridge {r:g} {v:.4f}" for r, v in mixing.items()),
          f"| per-channel base: ridge {per_channel.ridge:g} {per_channel.val_loss[per_channel.ridge]:.4f}")


def crosscheck(defaults, seeds: list[int], names: list[str]) -> None:
    """Validation only: the cross-check's numbers per seed (early stopping's pick on each half of the
    validation windows, scored on the other half) against the base scored the same way."""
    for name in names:
        data = load(name, defaults)
        data.x_test = data.y_test = None
        fitted = fit_seeds(data, replace(defaults, cross_check=False), seeds, label="bench")
        print(f"{name}: window_norm {fitted.window_norm}; per seed: full-validation pick, cross-fitted loss "
              f"of the trained MLPs / of the base", flush=True)
        for seed, result in fitted.results.items():
            print(f"  seed {seed}: best epoch {result.best_epoch} (validation {result.best_val_loss:.4f}, base "
                  f"{result.start_losses['valid_loss']:.4f}), cross-fitted {cross_fitted_loss(result, defaults.patience):.5g}"
                  f" / {cross_fitted_loss(result, defaults.patience, trained=False):.5g}", flush=True)
        check = cross_check(list(fitted.results.values()), defaults.patience)
        print(f"  mean: trained {check.trained:.5g}, base {check.base:.5g}: kept: {check.kept}", flush=True)


def _test_cell(cfg, results, data) -> str:
    test = [scores(predict(r.params, data.x_test, cfg.kernel, cfg.window_norm), data.y_test) for r in results]
    mse, mae = np.array([t["mse"] for t in test]), np.array([t["mae"] for t in test])
    ddof = min(1, len(results) - 1)
    return f"{mse.mean():.4f} ± {mse.std(ddof=ddof):.4f} / {mae.mean():.4f} ± {mae.std(ddof=ddof):.4f}"


def evaluate(defaults, seeds: list[int], names: list[str]) -> None:
    """Test MSE/MAE: the baselines, the recipe before issue 22, the adopted recipe without its
    cross-check (the same fits) and with it (params.yaml's mlp.defaults)."""
    print("| series | repeat-last | window mean | linear | MLP before | MLP, no cross-check | MLP after "
          "| CPU s before / after |")
    for name in names:
        data = load(name, defaults)
        cells = [f"{v['mse']:.4f} / {v['mae']:.4f}" for v in baselines(data)["test"].values()]
        start = time.process_time()
        before_cfg, *before = train(data, replace(defaults, **BEFORE), seeds)
        cpu = [f"{time.process_time() - start:.0f}"]
        start = time.process_time()
        fitted = fit_seeds(data, replace(defaults, cross_check=False), seeds, label="bench")
        trained = list(fitted.results.values())
        after, check = cross_checked(fitted.results, defaults)   # the same fits, as the stage keeps them
        cpu.append(f"{time.process_time() - start:.0f}")
        after_cfg = replace(defaults, window_norm=fitted.window_norm)
        cells += [_test_cell(before_cfg, before, data), _test_cell(after_cfg, trained, data),
                  _test_cell(after_cfg, after.values(), data)]
        print(f"| {name} | " + " | ".join(cells) + f" | {' / '.join(cpu)} |", flush=True)
        print(f"  {name}: after chose window_norm {fitted.window_norm}"
              + ("" if trained[0].base is None else f", ridge {trained[0].base.ridge:g}")
              + f", best epochs {[r.best_epoch for r in trained]}"
              + ("" if check is None else f"; cross-check trained {check.trained:.4f} vs base {check.base:.4f}"),
              flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["tune", "probe", "crosscheck", "evaluate"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--candidates", nargs="*", default=[], help="tune: only these (default: all)")
    parser.add_argument("--series", nargs="*", default=["ETTh1", "random_walk", "trend_season"])
    args = parser.parse_args(argv)
    params = P.load()
    defaults = params.mlp.defaults
    if args.what == "tune":
        tune(defaults, params.base.seed, args.candidates)
    elif args.what == "probe":
        probe(defaults, [params.base.seed + i for i in range(3)])
    elif args.what == "crosscheck":
        crosscheck(defaults, [params.base.seed + i for i in range(args.seeds)], args.series)
    else:
        evaluate(defaults, [params.base.seed + i for i in range(args.seeds)], args.series)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
