"""Stage for every CNN experiment (resnet18, densenet121, finetune, ablation@<name>): train with
the shared loop, keep the best-validation model, evaluate it once on the test split."""

from dataclasses import asdict

import numpy as np
import torch
from sklearn.metrics import confusion_matrix

from pipeline import figures, params as P
from pipeline.data import pathmnist
from pipeline.models import cnn
from pipeline.paths import METRICS, MODELS, pathmnist_npz
from pipeline.runtime import run_stage, seed_everything
from pipeline.outputs import write_csv, write_json
from pipeline.tracking import Tracker
from pipeline.train import cnn_loop


def main(argv):
    (name,) = argv
    params = P.load()
    cfg = params.cnn_experiment(name)
    data = pathmnist.load(pathmnist_npz(params.data.images.size))
    seed_everything(params.base.seed)   # before the model: its initial weights come from the seed
    cnn.check_image_size(cfg.model, data.size)
    model = cnn.build(cfg.model, data.n_classes, cfg.pretrained, cfg.weights_file, cfg.weights_sha256)
    device = cnn_loop.resolve_device(params.base.device)
    source = f"PathMNIST {data.size}px ({data.source})"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    with Tracker("cnn", name, data_source=source, extra_tags={"device": device_name}) as tracker:
        tracker.params({"experiment": name, "seed": params.base.seed, "image_size": data.size,
                        "n_train": len(data.labels["train"]), **asdict(cfg)})
        splits = cnn_loop.to_device(data, device)
        result = cnn_loop.train(model, splits, cfg, params.base.seed, tracker.metrics,
                                checkpoint=MODELS / "checkpoints" / f"{name}.pt", data_source=data.source,
                                label=f"{'ablation' if name in params.cnn['ablations'] else 'cnn'}@{name}")
        test, scores = cnn_loop.evaluate(model, splits["test"], cfg.eval_batch_size)
        metrics = {"test_auc": test["auc"], "test_acc": test["acc"], "best_val_auc": result.best_val["auc"],
                   "best_val_acc": result.best_val["acc"], "best_epoch": result.best_epoch}
        timing = {"train_seconds": round(result.train_seconds, 2),
                  "images_per_second": round(result.images_seen / max(result.train_seconds, 1e-9), 1)}
        tracker.metrics({**metrics, **timing})

        matrix = confusion_matrix(data.labels["test"], scores.argmax(axis=1), labels=range(data.n_classes))
        fig_path = figures.confusion(matrix, f"{name}: test confusion matrix", f"figures/cnn/{name}/confusion.png")
        tracker.artifact(fig_path, "figures")
        model_path = MODELS / "cnn" / f"{name}.pt"
        model_path.parent.mkdir(parents=True, exist_ok=True)
        model = model.cpu().to(memory_format=torch.contiguous_format).eval()
        torch.save(model.state_dict(), model_path)
        example = data.images["test"][:2].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
        tracker.torch_model(model, example)

    write_csv(METRICS / "cnn" / "curves" / f"{name}.csv", result.curve)
    write_csv(METRICS / "cnn" / "confusion" / f"{name}.csv",
              [{"actual": int(a), "predicted": int(p)} for a, p in zip(data.labels["test"], scores.argmax(axis=1))])
    write_json(METRICS / "cnn" / f"{name}.run.json", {**tracker.run_info(), "device": device_name})
    write_json(METRICS / "cnn" / f"{name}.timing.json", timing)   # apart: the results stay bit-identical
    write_json(METRICS / "cnn" / f"{name}.json", metrics)
    print(f"{name}: test AUC {test['auc']:.4f} ACC {test['acc']:.4f} (best epoch {result.best_epoch}, "
          f"{timing['images_per_second']:.0f} images/s on {device_name}, data {source})")


if __name__ == "__main__":
    run_stage(main)
