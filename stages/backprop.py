"""Stage backprop: prove the hand-derived gradients of the part-1 network (finite differences and
torch autograd), then train it with plain SGD on ETT direction labels and compare with the
majority-class baseline."""

import time
from dataclasses import asdict

import numpy as np

from pipeline import figures, params as P, results as R
from pipeline.data import ett
from pipeline.gradcheck import check_backprop_net
from pipeline.models import backprop_net as net
from pipeline.paths import ett_csv
from pipeline.errors import StageError
from pipeline.runtime import run_stage, seed_everything
from pipeline.outputs import write_csv
from pipeline.tracking import Tracker

FD_THRESHOLD, AUTOGRAD_THRESHOLD = 1e-5, 1e-8


def accuracy(params, x, y) -> float:
    return float(np.mean(net.forward(params, x)[0].argmax(axis=1) == y))


def main(argv):
    params = P.load()
    cfg = params.backprop
    name = params.data.ett.name
    target_name = params.data.ett.target
    sha256, pinned = ett.check_pin(ett_csv(name), name, params.data.ett.pins)
    frame = ett.load_csv(ett_csv(name), target_name)
    borders = ett.split_borders(name, len(frame), 0)
    period = borders["test"][1] - borders["test"][0]   # rows of the validation/test period
    if cfg.window + cfg.horizon > period:
        raise StageError(f"backprop.window + backprop.horizon = {cfg.window + cfg.horizon} exceeds the "
                         f"{period} rows of {name}'s validation period; use smaller values")
    seed_everything(params.base.seed)
    rng = np.random.default_rng(params.base.seed)
    splits = ett.standardised_splits(frame, name, cfg.window)
    target = splits.columns.index(target_name)
    data = {s: ett.direction_labels(getattr(splits, s), target, cfg.window, cfg.horizon, cfg.threshold,
                                    cfg.classes, cfg.stride if s == "train" else 1) for s in ("train", "val", "test")}
    n_features = data["train"][0].shape[2]

    out = R.backprop()
    identity = {"name": name, "title": name, "source": "real", "sha256": sha256}
    with Tracker("backprop", "backprop", data_source=f"{name} (real)", extra_tags=R.data_tags(identity)) as tracker:
        tracker.params({"dataset": name, "target": target_name, "seed": params.base.seed, "data_pinned": pinned,
                        **asdict(cfg)})
        tracker.dataset(name, str(ett_csv(name).resolve()), sha256, {s: len(data[s][1]) for s in data})
        # 1. Gradient checks on a random batch (small L so finite differences stay cheap).
        check_params = net.init_params(cfg.check_window, n_features, cfg.classes, rng)
        for key in ("b1", "b2", "b3"):   # non-zero biases so every term of the derivation is exercised
            check_params[key] = rng.normal(0, 0.1, check_params[key].shape)
        x_check = rng.normal(size=(cfg.check_batch, cfg.check_window, n_features))
        y_check = np.eye(cfg.classes)[rng.integers(0, cfg.classes, cfg.check_batch)]
        errors = check_backprop_net(check_params, x_check, y_check)
        tracker.metrics({f"gradcheck_fd_{k}": v for k, v in errors["finite_differences"].items()})
        tracker.metrics({f"gradcheck_autograd_{k}": v for k, v in errors["autograd"].items()})
        failed = [f"{k} (finite differences {v:.2e})" for k, v in errors["finite_differences"].items() if v > FD_THRESHOLD]
        failed += [f"{k} (autograd {v:.2e})" for k, v in errors["autograd"].items() if v > AUTOGRAD_THRESHOLD]
        if failed:
            raise StageError("gradient check failed for " + ", ".join(failed))

        # 2. Plain SGD on the direction task.
        (x_train, y_train), (x_val, y_val), (x_test, y_test) = data["train"], data["val"], data["test"]
        model = net.init_params(cfg.window, n_features, cfg.classes, rng)
        loss_rows, val_rows = [], []

        def on_step(step, epoch, loss):
            loss_rows.append({"step": step, "epoch": epoch, "train_loss": loss})

        def on_epoch(epoch, current):
            val_rows.append({"epoch": epoch, "val_accuracy": accuracy(current, x_val, y_val)})
            tracker.metrics({"val_accuracy": val_rows[-1]["val_accuracy"]}, step=epoch)

        started = time.perf_counter()
        net.sgd(model, x_train, np.eye(cfg.classes)[y_train], cfg.lr, cfg.batch_size, cfg.epochs, rng,
                on_step, on_epoch)
        for row in loss_rows[:: max(1, len(loss_rows) // 1000)]:
            tracker.metrics({"train_loss": row["train_loss"]}, step=row["step"])
        timing = {"train_seconds": round(time.perf_counter() - started, 2)}
        counts = np.bincount(y_test, minlength=cfg.classes)
        # Every number (the report and MLflow); the headline file takes its own from these.
        details = {
            "test_accuracy": accuracy(model, x_test, y_test),
            # the best constant prediction on the test split itself (the strictest majority baseline)
            "majority_baseline": float(counts.max() / counts.sum()),
            "gradcheck_max_rel_error": max(errors["finite_differences"].values()),
            "fd_max_rel_error": errors["finite_differences"], "autograd_max_rel_error": errors["autograd"],
            "fd_threshold": FD_THRESHOLD, "autograd_threshold": AUTOGRAD_THRESHOLD,
            "val_accuracy": val_rows[-1]["val_accuracy"],
            "final_train_loss": float(np.mean([r["train_loss"] for r in loss_rows[-20:]])),
            "classes": cfg.classes, "window": cfg.window, "epochs": cfg.epochs,
            "n_train": len(y_train), "n_test": len(y_test),
            "test_class_counts": {str(k): int(v) for k, v in enumerate(counts)},
        }
        tracker.metrics({k: v for k, v in {**details, **timing}.items() if not isinstance(v, dict)})
        write_csv(out.curves["train_loss"], loss_rows)
        write_csv(out.curves["val_accuracy"], val_rows)
        fig = figures.curves({"train loss": (np.array([r["step"] for r in loss_rows]),
                                             np.array([r["train_loss"] for r in loss_rows]))},
                             "backprop: training loss", "step", "cross-entropy", out.figures / "loss.png",
                             smoothing=0.6)
        tracker.artifact(fig, "figures")

    R.write_results(out, details, timing, tracker.run_info(), identity)
    print(f"backprop: gradients ok (max fd {max(errors['finite_differences'].values()):.2g}, autograd "
          f"{max(errors['autograd'].values()):.2g}); test accuracy {details['test_accuracy']:.4f} vs majority "
          f"{details['majority_baseline']:.4f}")


if __name__ == "__main__":
    run_stage(main)
