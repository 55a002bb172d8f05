"""Part 3 on CPU: augmentations, model factory and weights loading, the training loop's learning,
resume and error paths."""

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import images
from pipeline.models import cnn
from pipeline.params import Cnn
from pipeline.errors import StageError
from pipeline.train import augment, cnn_loop


def _images(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_hflip_is_exactly_a_flip_or_nothing():
    x = _images()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment.hflip(x, g, p=1.0), x.flip(-1))
    assert torch.equal(augment.hflip(x, g, p=0.0), x)
    mixed = augment.hflip(x, torch.Generator().manual_seed(1), p=0.5)
    for i in range(len(x)):
        assert torch.equal(mixed[i], x[i]) or torch.equal(mixed[i], x[i].flip(-1))


def test_rotation_by_zero_is_the_identity_and_by_90_degrees_a_rot90():
    x = _images()
    assert torch.allclose(augment.rotate_by(x, torch.zeros(len(x))), x, atol=1e-5)
    quarter = augment.rotate_by(x, torch.full((len(x),), np.pi / 2))
    assert torch.allclose(quarter, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-4) or \
        torch.allclose(quarter, torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-4)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_quarter_turn_is_a_rot90_in_both_modes(interpolation):
    x = _images()
    quarter = augment.rotate_by(x, torch.full((len(x),), np.pi / 2), interpolation)
    assert torch.allclose(quarter, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-4) or \
        torch.allclose(quarter, torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-4)


def test_nearest_rotation_keeps_the_input_pixel_values_and_bilinear_interpolates():
    # Real inputs: uint8 pixels normalised to [-1, 1]; the fill outside the image is black (-1).
    pixels = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = augment.to_input(pixels)
    angles = torch.full((len(x),), np.radians(30.0))
    allowed = torch.cat([x.flatten(), torch.tensor([-1.0])])
    nearest = augment.rotate_by(x, angles, "nearest")
    bilinear = augment.rotate_by(x, angles, "bilinear")
    assert torch.isin(nearest.flatten(), allowed).all()      # exactly the input's values (or the fill)
    assert not torch.isin(bilinear.flatten(), allowed).all()   # blends of neighbours
    assert (nearest == -1).any()                               # the corners are filled with black
    # The default (torchvision's RandomRotation and the params default) is nearest.
    g = torch.Generator().manual_seed(5)
    assert torch.equal(augment.apply(x, ["rotation"], 30.0, g), augment.apply(
        x, ["rotation"], 30.0, torch.Generator().manual_seed(5), "nearest"))
    assert Cnn().rotation_interpolation == "nearest"
    with pytest.raises(ValueError, match="choose from nearest, bilinear"):
        augment.rotate_by(x, angles, "bicubic")


def test_augmentations_keep_shape_dtype_and_are_seeded():
    x = _images()
    a = augment.apply(x, ["rotation", "hflip"], 15.0, torch.Generator().manual_seed(3))
    b = augment.apply(x, ["rotation", "hflip"], 15.0, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="choose from hflip, rotation"):
        augment.apply(x, ["jitter"], 15.0, torch.Generator())


def test_normalisation_is_mean_half_std_half():
    u8 = torch.tensor([0, 127, 255], dtype=torch.uint8)
    assert torch.allclose(augment.to_input(u8), torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))


def test_model_factory_errors_name_the_way_out():
    with pytest.raises(cnn.ModelError, match="choose one of: resnet18, densenet121"):
        cnn.build("vgg16", 9)
    with pytest.raises(cnn.ModelError, match="densenet121 needs images of at least 32 px"):
        cnn.check_image_size("densenet121", 28)
    assert cnn.head(cnn.build("resnet18", 5), "resnet18").out_features == 5


def test_finetune_loads_a_local_checkpoint(local_densenet_weights):
    saved = torch.load(local_densenet_weights, weights_only=True)
    model = cnn.build("densenet121", 9, pretrained=True, weights_file=str(local_densenet_weights))
    state = model.state_dict()
    body = [k for k in saved if not k.startswith("classifier")]
    assert all(torch.equal(state[k], saved[k]) for k in body)
    assert tuple(model.classifier.weight.shape) == (9, 1024)
    digest = hashlib.sha256(local_densenet_weights.read_bytes()).hexdigest()
    cnn.build("densenet121", 9, pretrained=True, weights_file=str(local_densenet_weights), weights_sha256=digest)
    with pytest.raises(cnn.ModelError, match="refusing to load it"):
        cnn.build("densenet121", 9, pretrained=True, weights_file=str(local_densenet_weights),
                  weights_sha256="0" * 64)


def test_finetune_without_weights_offline_says_exactly_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv("FINETUNE_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))           # an empty hub cache
    with pytest.raises(cnn.ModelError) as caught:
        cnn.build("densenet121", 9, pretrained=True)
    assert "weights_file" in str(caught.value) and "FINETUNE_WEIGHTS" in str(caught.value)
    assert "densenet121-a639ec97.pth" in str(caught.value)


def _dataset(n_train, size=32, seed=0):
    arrays = images.synthesize(size, {"train": n_train, "val": 90, "test": 90}, seed)
    return images.ImageSet({s: arrays[f"{s}_images"] for s in images.SPLITS},
                               {s: arrays[f"{s}_labels"].reshape(-1).astype(np.int64) for s in images.SPLITS},
                               9, size, "synthetic")


def test_resnet18_learns_an_easy_synthetic_set_on_cpu():
    data = _dataset(720)
    cfg = Cnn(model="resnet18", epochs=3, batch_size=32, log_every=10, eval_batch_size=256)
    model = cnn.build("resnet18", 9)
    result = cnn_loop.train(model, cnn_loop.to_device(data, torch.device("cpu")), cfg, seed=0, log=lambda m, s: None)
    test, _ = cnn_loop.evaluate(model, cnn_loop.to_device(data, torch.device("cpu"))["test"], 256)
    assert test["acc"] >= 0.6, test      # chance is 1/9
    assert result.best_val["auc"] > 0.8 and result.curve[-1]["step"] == 3 * (720 // 32 + 1)


def test_evaluation_changes_neither_the_mode_nor_the_weights():
    data = _dataset(32)
    split = cnn_loop.to_device(data, torch.device("cpu"))["val"]
    model = cnn.build("resnet18", 9)
    for training in (True, False):
        model.train(training)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        cnn_loop.evaluate(model, split, 64)
        assert model.training is training
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # incl. BN statistics


def test_splits_kept_in_host_memory_score_like_splits_on_the_device():
    data = _dataset(64)
    cfg = Cnn(model="resnet18", epochs=1, batch_size=32, log_every=1, eval_batch_size=40, augment=["hflip"])
    results = []
    for keep_on_host in (False, True):
        splits = cnn_loop.to_device(data, torch.device("cpu"), keep_on_host=keep_on_host)
        assert all(s.on_host is keep_on_host for s in splits.values())
        torch.manual_seed(0)
        model = cnn.build("resnet18", 9)
        result = cnn_loop.train(model, splits, cfg, seed=0, log=lambda m, s: None)
        test, scores = cnn_loop.evaluate(model, splits["test"], cfg.eval_batch_size)
        results.append((result.curve, test, scores))
    (curve_a, test_a, scores_a), (curve_b, test_b, scores_b) = results
    assert curve_a == curve_b and test_a == test_b and np.array_equal(scores_a, scores_b)


def test_checkpoint_fingerprint_covers_code_and_device(tmp_path):
    data = _dataset(32)
    cfg = Cnn(model="resnet18")
    splits = cnn_loop.to_device(data, torch.device("cpu"))
    code = tmp_path / "stage.py"
    code.write_text("x = 1\n")
    key = cnn_loop.fingerprint(cfg, 0, splits, "synthetic", [code])
    assert cnn_loop.fingerprint(cfg, 0, splits, "synthetic", [code]) == key
    code.write_text("x = 2\n")
    assert cnn_loop.fingerprint(cfg, 0, splits, "synthetic", [code]) != key
    code.write_text("x = 1\n")
    on_cuda = {s: replace(split, device=torch.device("cuda")) for s, split in splits.items()}   # no CUDA call
    assert cnn_loop.fingerprint(cfg, 0, on_cuda, "synthetic", [code]) != key
    assert cnn_loop.fingerprint(replace(cfg, rotation_interpolation="bilinear"), 0, splits, "synthetic",
                                [code]) != key
    # The loop's own files are always covered.
    assert {p.name for p in cnn_loop.LOOP_SOURCES} == {"cnn_loop.py", "augment.py"}


def test_changed_code_does_not_resume_an_old_checkpoint_and_a_final_one_keeps_the_full_curve(tmp_path):
    data = _dataset(96)   # 3 steps per epoch at batch 32
    cfg = Cnn(model="resnet18", epochs=1, batch_size=32, log_every=2, eval_batch_size=256)
    code = tmp_path / "stage.py"
    code.write_text("x = 1\n")

    def run(cfg, resume=False):
        torch.manual_seed(0)
        model = cnn.build("resnet18", 9)
        return cnn_loop.train(model, cnn_loop.to_device(data, torch.device("cpu")), cfg, seed=0,
                              log=lambda m, s: None, checkpoint_dir=tmp_path / "ckpt", code_files=[code],
                              resume=resume)

    first = run(cfg)
    assert first.checkpoint.exists() and [r["step"] for r in first.curve] == [1, 2, 3]   # every step: < 4 in an epoch
    resumed = run(cfg, resume=True)            # from the final checkpoint: nothing left to train
    assert resumed.resumed_from == 1 and resumed.curve == first.curve and resumed.best_val == first.best_val
    code.write_text("x = 2\n")                          # e.g. a fixed augment.py
    fresh = run(cfg, resume=True)
    assert fresh.resumed_from == 0 and fresh.checkpoint != first.checkpoint
    assert fresh.curve == first.curve                    # trained again, same result


def test_resumed_run_ends_with_the_same_metrics(tmp_path):
    data = _dataset(96)   # 3 steps per epoch at batch 32
    cfg = Cnn(model="resnet18", epochs=2, batch_size=32, log_every=2, eval_batch_size=256, augment=["hflip"])
    device = torch.device("cpu")

    def run(cfg, checkpoint, log=lambda m, s: None, resume=False):
        torch.manual_seed(0)
        model = cnn.build("resnet18", 9)
        result = cnn_loop.train(model, cnn_loop.to_device(data, device), cfg, seed=0, log=log,
                                checkpoint_dir=checkpoint, resume=resume)
        return result, cnn_loop.evaluate(model, cnn_loop.to_device(data, device)["test"], 256)[0]

    straight, straight_test = run(cfg, tmp_path / "a")

    def interrupt_in_epoch_2(metrics, step):
        if step > 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "b", interrupt_in_epoch_2)
    resumed, resumed_test = run(cfg, tmp_path / "b", resume=True)
    assert resumed.resumed_from == 1
    assert resumed_test == straight_test
    assert resumed.best_val == straight.best_val
    assert [r["train_loss"] for r in resumed.curve] == [r["train_loss"] for r in straight.curve]


def test_cuda_out_of_memory_anywhere_in_the_stage_names_the_batch_sizes(monkeypatch):
    data = _dataset(64)
    cfg = Cnn(batch_size=32, eval_batch_size=100, epochs=1)
    model = cnn.build("resnet18", 9)

    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    advice = "cnn.batch_size=32 and cnn.eval_batch_size=100.*cnn.defaults.batch_size=16"
    with pytest.raises(StageError, match=advice):   # moving the splits to the device
        with cnn_loop.out_of_memory_advice(cfg):
            monkeypatch.setattr(torch.Tensor, "to", boom)
            cnn_loop.to_device(data, torch.device("cpu"))
    monkeypatch.undo()
    splits = cnn_loop.to_device(data, torch.device("cpu"))
    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(StageError, match=advice):   # training
        with cnn_loop.out_of_memory_advice(cfg):
            cnn_loop.train(model, splits, cfg, 0, lambda m, s: None)
    with pytest.raises(StageError, match=advice):   # the final test evaluation
        with cnn_loop.out_of_memory_advice(cfg):
            cnn_loop.evaluate(model, splits["test"], cfg.eval_batch_size)
    stage_source = Path(__file__).resolve().parent.parent / "stages" / "cnn.py"
    assert "with cnn_loop.out_of_memory_advice(cfg):" in stage_source.read_text()


def test_stage_refuses_images_too_small_for_densenet_before_training(tmp_path):
    from conftest import make_repo_copy, run, small_params

    params = small_params()
    params["data"]["images"]["size"] = 16
    repo = make_repo_copy(tmp_path, params)
    run(["python", "-m", "stages.download_images"], repo)
    result = run(["python", "-m", "stages.cnn", "densenet121"], repo, check=False)
    assert result.returncode == 2 and "densenet121 needs images of at least 32 px" in result.stderr
    assert "Traceback" not in result.stderr and not (repo / ".dvc/tmp/checkpoints").exists()


def _strict_json(path: Path):
    """Standard JSON only: NaN, Infinity or -Infinity in the file fail here."""
    import json

    def refuse(name):
        raise AssertionError(f"{path}: {name} is not standard JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _runs(repo: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("part3-classification")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_a_resumed_stage_run_carries_the_whole_curve_and_a_resumed_from_tag(tmp_path):
    from conftest import make_repo_copy, run, small_params

    params = small_params()
    params["cnn"]["defaults"].update(epochs=2)
    repo = make_repo_copy(tmp_path, params)
    run(["python", "-m", "stages.download_images"], repo)
    (repo / "models/cnn/resnet18.pt").mkdir(parents=True)   # the model write fails after all the training
    failed = run(["python", "-m", "stages.cnn", "resnet18"], repo, check=False)
    assert failed.returncode != 0
    (repo / "models/cnn/resnet18.pt").rmdir()
    checkpoints = repo / ".dvc/tmp/checkpoints/resnet18"
    (left,) = checkpoints.glob("*.pt")
    resumed = run(["python", "-m", "stages.cnn", "resnet18"], repo, PIPELINE_RESUME="1")
    assert f"resuming from {left} after epoch 2" in resumed.stdout
    client, (first, second) = _runs(repo)
    assert first.info.status == "FAILED" and second.info.status == "FINISHED"
    assert second.data.tags["resumed_from"] == "2" and "resumed_from" not in first.data.tags
    for key in ("train_loss", "val_auc", "epoch_val_auc", "lr"):
        history = [[(m.step, m.value) for m in client.get_metric_history(r.info.run_id, key)] for r in (first, second)]
        assert history[0] and history[1] == history[0], key
    assert not list(checkpoints.iterdir())   # removed on success, no temp files either
    # The environment variable is not a param: params.yaml and the stage's params are untouched.
    assert "resume" not in (repo / "params.yaml").read_text()


def test_a_split_missing_a_class_keeps_a_model_and_writes_null_not_nan(tmp_path):
    from conftest import make_repo_copy, run, small_params

    rng = np.random.default_rng(0)
    labels = {"train": np.arange(60) % 3, "val": np.arange(24) % 2, "test": np.arange(24) % 2}   # class 2: train only
    arrays = {}
    for split, y in labels.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = y.reshape(-1, 1).astype(np.int64)
    np.savez(tmp_path / "mine.npz", **arrays)
    params = small_params()
    params["data"]["images"].update(source="file", path=str(tmp_path / "mine.npz"), name="mine", size=32)
    params["cnn"]["defaults"].update(epochs=2)
    repo = make_repo_copy(tmp_path / "repo", params)
    run(["python", "-m", "stages.download_images"], repo)
    result = run(["python", "-m", "stages.cnn", "resnet18"], repo)
    assert "no epoch had a finite validation auc" in result.stdout and "Traceback" not in result.stderr
    headline = _strict_json(repo / "metrics/cnn/resnet18.json")
    details = _strict_json(repo / "metrics/cnn/resnet18.details.json")
    assert headline == {"resnet18": None} and details["test_auc"] is None and 0 <= details["test_acc"] <= 1
    assert details["best_val_auc"] is None and details["best_epoch"] == 2
    assert any("test_auc is null" in note for note in details["notes"])
    assert (repo / "models/cnn/resnet18.pt").exists()


def test_resume_is_asked_by_an_environment_variable_and_a_bad_value_is_refused(monkeypatch):
    from stages import cnn as stage

    for value, wanted in (("", False), ("0", False), ("1", True), ("true", True), ("no", False)):
        monkeypatch.setenv("PIPELINE_RESUME", value)
        assert stage.resume_requested() is wanted
    monkeypatch.delenv("PIPELINE_RESUME")
    assert stage.resume_requested() is False
    monkeypatch.setenv("PIPELINE_RESUME", "please")
    with pytest.raises(StageError, match="PIPELINE_RESUME='please': set it to 1 to resume"):
        stage.resume_requested()


def test_devices_beyond_the_machine_are_refused_with_the_value_that_fits(monkeypatch):
    import os

    from stages import cnn as stage

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    stage.check_devices(2)
    with pytest.raises(StageError, match=r"devices=3 but this machine has 2 CPU core\(s\); "
                                         r"set `-S cnn.defaults.devices=2`"):
        stage.check_devices(3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    stage.check_devices(4)
    with pytest.raises(StageError, match=r"has 4 GPU\(s\)"):
        stage.check_devices(5)


def test_undefined_scores_become_null_with_a_note():
    import json

    from stages import cnn as stage

    values = {"test_auc": float("nan"), "test_acc": 0.5, "best_val_auc": float("nan"), "best_epoch": 2}
    clean = stage.finite(values)
    assert clean == {"test_auc": None, "test_acc": 0.5, "best_val_auc": None, "best_epoch": 2}
    json.dumps(clean, allow_nan=False)
    notes = stage.nan_notes(values, "auc")
    assert notes == ["test_auc is null: undefined on the test split (a class missing from it?)",
                     "best_val_auc is null: undefined on the validation split (a class missing from it?)",
                     "no epoch had a finite validation auc: the last epoch's weights were kept"]
    assert stage.nan_notes(values, "acc")[-1].startswith("best_val_auc")
