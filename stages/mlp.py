"""Stage mlp@<variant>: train the numpy decomposition MLP forecaster on ETT and evaluate it on
every stride-1 test window (MSE/MAE over windows, steps and channels, standardised units)."""

from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline import figures, params as P
from pipeline.data import ett
from pipeline.models.mlp_forecaster import predict
from pipeline.paths import METRICS, MODELS, ett_csv
from pipeline.runtime import run_stage, seed_everything
from pipeline.outputs import write_csv, write_json
from pipeline.tracking import Tracker
from pipeline.train.forecaster import ForecastData, fit, scores


def main(argv):
    (variant,) = argv
    params = P.load()
    cfg = params.mlp_variant(variant)
    seed_everything(params.base.seed)
    name = params.data.ett.name
    frame = ett.load_csv(ett_csv(name))
    splits = ett.standardised_splits(frame, name, cfg.input_len)
    windows = {s: ett.windows(getattr(splits, s), cfg.input_len, cfg.pred_len) for s in ("train", "val", "test")}
    data = ForecastData.from_windows(windows, np.dtype(cfg.dtype))
    n_test_windows = len(windows["test"][0])

    metrics_path, curve_path = METRICS / "mlp" / f"{variant}.json", METRICS / "mlp" / "curves" / f"{variant}.csv"
    figure_dir = Path("figures/mlp") / variant
    with Tracker("mlp", f"mlp@{variant}", data_source=f"{name} (real)") as tracker:
        tracker.params({"variant": variant, "dataset": name, "seed": params.base.seed, **asdict(cfg)})
        result = fit(data, cfg, params.base.seed,
                     on_epoch=lambda row: tracker.metrics({k: v for k, v in row.items() if k != "epoch"},
                                                          step=row["epoch"]),
                     label=f"mlp@{variant}")
        pred = predict(result.params, data.x_test, cfg.kernel, cfg.window_norm)   # (windows*channels, P)
        test = scores(pred, data.y_test)
        metrics = {"test_mse": test["mse"], "test_mae": test["mae"], "best_val_loss": result.best_val_loss,
                   "best_epoch": result.best_epoch, "epochs_run": len(result.history),
                   "n_test_windows": n_test_windows}
        timing = {"train_seconds": round(result.seconds, 2)}
        tracker.metrics({**metrics, **timing})

        model_path = MODELS / "mlp" / f"{variant}.npz"
        model_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(model_path, **result.params)
        tracker.artifact(model_path, "model")

        # Good / median / bad test windows by the OT channel's MSE.
        ot = splits.columns.index(ett.TARGET)
        x_ot, y_ot = windows["test"][0][:, ot], windows["test"][1][:, ot]
        pred_ot = pred.reshape(n_test_windows, data.n_channels, -1)[:, ot]
        errors = np.mean((pred_ot - y_ot) ** 2, axis=1)
        order = np.argsort(errors)
        for label, index in (("good", order[0]), ("median", order[len(order) // 2]), ("bad", order[-1])):
            path = figures.forecast(x_ot[index], y_ot[index], pred_ot[index],
                                    f"mlp@{variant}: {label} test window #{index} (OT MSE {errors[index]:.3f})",
                                    figure_dir / f"prediction_{label}.png")
            tracker.artifact(path, "figures")
        epochs = np.array([r["epoch"] for r in result.history])
        loss_fig = figures.curves({k: (epochs, np.array([r[k] for r in result.history]))
                                   for k in ("train_loss", "valid_loss", "test_loss")},
                                  f"mlp@{variant}: loss per epoch", "epoch", "MSE (standardised)",
                                  figure_dir / "loss.png")
        tracker.artifact(loss_fig, "figures")

    write_csv(curve_path, result.history)
    write_json(METRICS / "mlp" / f"{variant}.run.json", tracker.run_info())
    write_json(METRICS / "mlp" / f"{variant}.timing.json", timing)   # apart: the results stay bit-identical
    write_json(metrics_path, metrics)
    print(f"mlp@{variant}: test MSE {test['mse']:.4f} MAE {test['mae']:.4f} "
          f"({n_test_windows} windows, best epoch {result.best_epoch}, {result.seconds:.1f}s)")


if __name__ == "__main__":
    run_stage(main)
