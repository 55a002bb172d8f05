"""Part 3 on CPU: augmentations, model factory and weights loading, the training loop's learning,
resume and error paths."""

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.data import pathmnist
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
    assert cnn.head(cnn.build("resnet18", 5)).out_features == 5


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
    arrays = pathmnist.synthesize(size, {"train": n_train, "val": 90, "test": 90}, seed)
    return pathmnist.PathMnist({s: arrays[f"{s}_images"] for s in pathmnist.SPLITS},
                               {s: arrays[f"{s}_labels"].reshape(-1).astype(np.int64) for s in pathmnist.SPLITS},
                               9, size, "synthetic")


def test_resnet18_learns_an_easy_synthetic_set_on_cpu():
    data = _dataset(720)
    cfg = Cnn(model="resnet18", epochs=3, batch_size=32, log_every=10, eval_batch_size=256)
    model = cnn.build("resnet18", 9)
    result = cnn_loop.train(model, cnn_loop.to_device(data, torch.device("cpu")), cfg, seed=0, log=lambda m, s: None)
    test, _ = cnn_loop.evaluate(model, cnn_loop.to_device(data, torch.device("cpu"))["test"], 256)
    assert test["acc"] >= 0.6, test      # chance is 1/9
    assert result.best_val["auc"] > 0.8 and result.curve[-1]["step"] == 3 * (720 // 32 + 1)


def test_resumed_run_ends_with_the_same_metrics(tmp_path):
    data = _dataset(96)   # 3 steps per epoch at batch 32
    cfg = Cnn(model="resnet18", epochs=2, batch_size=32, log_every=2, eval_batch_size=256, augment=["hflip"])
    device = torch.device("cpu")

    def run(cfg, checkpoint, log=lambda m, s: None):
        torch.manual_seed(0)
        model = cnn.build("resnet18", 9)
        result = cnn_loop.train(model, cnn_loop.to_device(data, device), cfg, seed=0, log=log, checkpoint=checkpoint)
        return result, cnn_loop.evaluate(model, cnn_loop.to_device(data, device)["test"], 256)[0]

    straight, straight_test = run(cfg, tmp_path / "a.pt")

    def interrupt_in_epoch_2(metrics, step):
        if step > 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "b.pt", interrupt_in_epoch_2)
    resumed, resumed_test = run(replace(cfg, resume=True), tmp_path / "b.pt")
    assert resumed.resumed_from == 1
    assert resumed_test == straight_test
    assert resumed.best_val == straight.best_val
    assert [r["train_loss"] for r in resumed.curve] == [r["train_loss"] for r in straight.curve]


def test_cuda_out_of_memory_names_the_batch_size(monkeypatch):
    data = _dataset(64)
    model = cnn.build("resnet18", 9)

    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(StageError, match="cnn.batch_size=32.*cnn.defaults.batch_size=16"):
        cnn_loop.train(model, cnn_loop.to_device(data, torch.device("cpu")), Cnn(batch_size=32, epochs=1), 0,
                       lambda m, s: None)


def test_stage_refuses_images_too_small_for_densenet_before_training(tmp_path):
    from conftest import make_repo_copy, run, small_params

    params = small_params()
    params["data"]["images"]["size"] = 16
    repo = make_repo_copy(tmp_path, params)
    run(["python", "-m", "stages.download_pathmnist"], repo)
    result = run(["python", "-m", "stages.cnn", "densenet121"], repo, check=False)
    assert result.returncode == 2 and "densenet121 needs images of at least 32 px" in result.stderr
    assert "Traceback" not in result.stderr and not (repo / "models/checkpoints").exists()
