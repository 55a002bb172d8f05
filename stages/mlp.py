"""Stage mlp@<variant>: train the numpy decomposition MLP forecaster on an ETT file (or any
forecasting CSV) and evaluate it on every stride-1 test window (MSE/MAE over windows, steps and
channels, standardised units).

Seeds base.seed, base.seed+1, ... (mlp.seeds of them) each train the variant; the headline
test_mse/test_mae are their means, with the std and every seed's numbers alongside.
window_norm: auto trains every normalisation on the first seed and keeps the one with the lowest
validation loss; the other seeds train that one. With the residual's cross_check, the seeds keep
their ridge base unless the trained MLPs beat it on validation they were not picked on. Test
metrics are computed once per seed, for the selected model only, and choose nothing.
"""

from dataclasses import asdict

import numpy as np

from pipeline import figures, params as P, results as R
from pipeline.data import ett
from pipeline.models.mlp_forecaster import predict
from pipeline.outputs import write_csv, write_npz
from pipeline.paths import ett_csv
from pipeline.runtime import run_stage, seed_everything
from pipeline.tracking import Tracker
from pipeline.train.forecaster import ForecastData, baselines, fit_seeds, scores


def main(argv):
    (variant,) = argv
    params = P.load()
    cfg = params.mlp_variant(variant)
    name, target = params.data.ett.name, params.data.ett.target
    csv = ett_csv(name)
    frame = ett.load_csv(csv, target)   # first: a clear error when the file is missing or malformed
    sha256, pin = ett.check_pin(csv, name, params.data.ett.pins)   # an edited pinned file is refused
    if not pin:
        print(f"WARNING: data.ett.pins has no sha256 for {name}; using {csv} unverified "
              f"(sha256 {sha256}, recorded in the metrics).")
    splits = ett.standardised_splits(frame, name, cfg.input_len, pred_len=cfg.pred_len)
    windows = {s: ett.windows(getattr(splits, s), cfg.input_len, cfg.pred_len) for s in ("train", "val", "test")}
    data = ForecastData.from_windows(windows, np.dtype(cfg.dtype))
    n_test_windows = len(windows["test"][0])
    seeds = [params.base.seed + i for i in range(cfg.seeds)]
    seed_everything(seeds[0])

    out = R.mlp(variant)
    figure_dir = out.figures
    identity = {"name": name, "title": name, "source": "real", "sha256": sha256}
    with Tracker("mlp", f"mlp@{variant}", data_source=f"{name} (real)",
                 extra_tags={"data_sha256": sha256, **R.data_tags(identity)}) as tracker:
        tracker.params({"variant": variant, "dataset": name, "target": target, "seed": seeds[0],
                        "seed_list": seeds, "data_sha256": sha256, "data_pinned": bool(pin), **asdict(cfg)})
        tracker.dataset(name, str(csv.resolve()), sha256, {s: len(windows[s][0]) for s in windows})
        # The choice of normalisation (first seed) and of trained MLPs or base: validation loss only.
        fitted = fit_seeds(data, cfg, seeds, label=f"mlp@{variant}")
        chosen, candidates, results, check = fitted.window_norm, fitted.candidates, fitted.results, fitted.check
        first = results[seeds[0]]
        tracker.params({"window_norm_chosen": chosen, **({"ridge_chosen": first.base.ridge} if first.base else {}),
                        **({"cross_check_kept": check.kept} if check else {})})
        for row in first.history:
            tracker.metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

        per_seed, first_pred = {}, None
        for seed, result in results.items():
            pred = predict(result.params, data.x_test, cfg.kernel, chosen)   # (windows*channels, P)
            first_pred = pred if first_pred is None else first_pred
            test = scores(pred, data.y_test)
            per_seed[str(seed)] = {"test_mse": test["mse"], "test_mae": test["mae"],
                                   "best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch,
                                   "epochs_run": len(result.history)}
        mse = np.array([s["test_mse"] for s in per_seed.values()])
        mae = np.array([s["test_mae"] for s in per_seed.values()])
        ddof = 1 if len(seeds) > 1 else 0   # sample std over seeds
        # The seed means and spreads (the headline file takes the mean MSE), then the rest.
        metrics = {"test_mse": float(mse.mean()), "test_mae": float(mae.mean()),
                   "test_mse_std": float(mse.std(ddof=ddof)), "test_mae_std": float(mae.std(ddof=ddof))}
        # The naive forecasts of the same test windows: skill = MSE / the best naive MSE (< 1: better).
        naive_splits = baselines(data, ("test", "val"))
        naive = naive_splits["test"]
        metrics.update({f"{name}_{k}": v[k] for name, v in naive.items() for k in ("mse", "mae")})
        metrics["skill"] = metrics["test_mse"] / min(naive["repeat_last"]["mse"], naive["window_mean"]["mse"])
        details = {**metrics, "best_val_loss": float(np.mean([r.best_val_loss for r in results.values()])),
                   "best_epoch": first.best_epoch, "epochs_run": len(first.history),
                   "n_test_windows": n_test_windows, "n_seeds": len(seeds),
                   "window_norm": chosen,
                   "window_norm_val_loss": {norm: r.best_val_loss for norm, r in candidates.items()},
                   # residual: linear: the base's ridge strength, chosen on validation ("inf": the naive forecast)
                   **({"ridge": str(first.base.ridge),
                       "ridge_val_loss": {str(k): v for k, v in first.base.val_loss.items()}} if first.base else {}),
                   # the cross-check: seed means of the picks' losses on the half they were not picked on
                   **({"cross_check": {"trained": check.trained, "base": check.base, "kept": check.kept}}
                      if check else {}),
                   "per_seed": per_seed,
                   "baselines_val": naive_splits["val"],
                   "dataset": name, "data_sha256": sha256, "data_pinned": bool(pin)}
        trained = [*candidates.values(), *(results[s] for s in seeds[1:])]   # every fit, once
        timing = {"train_seconds": round(sum(r.seconds for r in trained), 2)}
        tracker.metrics({**{k: v for k, v in details.items() if not isinstance(v, (dict, bool, str))},
                         **({"cross_check_trained": check.trained, "cross_check_base": check.base} if check else {}),
                         **timing, **{f"val_loss_{norm}": v for norm, v in details["window_norm_val_loss"].items()},
                         **{f"test_mse_seed{s}": v["test_mse"] for s, v in per_seed.items()}})

        model_path = out.model   # the first seed's model
        write_npz(model_path, **first.params, window_norm=np.array(chosen))
        tracker.artifact(model_path, "model")

        # Good / median / bad test windows (first seed) by the target channel's MSE.
        col = splits.columns.index(target)
        x_col, y_col = windows["test"][0][:, col], windows["test"][1][:, col]
        pred_col = first_pred.reshape(n_test_windows, data.n_channels, -1)[:, col]
        errors = np.mean((pred_col - y_col) ** 2, axis=1)
        order = np.argsort(errors)
        for label, index in (("good", order[0]), ("median", order[len(order) // 2]), ("bad", order[-1])):
            path = figures.forecast(x_col[index], y_col[index], pred_col[index],
                                    f"mlp@{variant}: {label} test window #{index} ({target} MSE {errors[index]:.3f})",
                                    figure_dir / f"prediction_{label}.png")
            tracker.artifact(path, "figures")
        epochs = np.array([r["epoch"] for r in first.history])
        loss_fig = figures.curves({k: (epochs, np.array([r[k] for r in first.history]))
                                   for k in ("train_loss", "valid_loss")},
                                  f"mlp@{variant}: loss per epoch (seed {seeds[0]}, window_norm {chosen})",
                                  "epoch", "MSE (standardised)", figure_dir / "loss.png")
        tracker.artifact(loss_fig, "figures")

    write_csv(out.curves["curves"], first.history)
    R.write_results(out, details, timing, tracker.run_info(), identity)
    choice = ", ".join(f"{n} {v:.4g}" for n, v in details["window_norm_val_loss"].items())
    print(f"mlp@{variant}: window_norm {chosen} (validation loss: {choice})")
    if check:
        print(f"mlp@{variant}: cross-checked validation loss, trained MLPs {check.trained:.4f} vs base {check.base:.4f}: "
              f"kept: {check.kept}")
    print(f"mlp@{variant}: test MSE {metrics['test_mse']:.4f} ± {metrics['test_mse_std']:.2g} "
          f"MAE {metrics['test_mae']:.4f} ± {metrics['test_mae_std']:.2g} over seeds {seeds} "
          f"({n_test_windows} windows, {timing['train_seconds']:.1f}s)")


if __name__ == "__main__":
    run_stage(main)
