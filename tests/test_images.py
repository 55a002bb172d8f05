"""Any image set: MedMNIST-layout files (synthetic grayscale / multi-label sets, the user's own npz),
the per-task loss and metrics, grayscale stems and upsampling, and a real-image run (sklearn digits)."""

import json
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from conftest import make_repo_copy, run, small_params
from pipeline.data import images
from pipeline.errors import DataError
from pipeline.models import cnn
from pipeline.params import Cnn
from pipeline.paths import images_npz
from pipeline.train import cnn_loop, tasks

COUNTS = {"train": 28, "val": 14, "test": 14}
TASK_SETS = {"multi-class": "octmnist", "binary-class": "pneumoniamnist",
             "ordinal-regression": "retinamnist", "multi-label, binary-class": "chestmnist"}


def _synthetic(tmp_path, name, size=32, counts=COUNTS, seed=0) -> images.ImageSet:
    path = tmp_path / f"{name}_{size}.npz"
    images.save_npz(path, images.synthesize(size, counts, seed, name))
    return images.load(path)


# ---------------------------------------------------------------- data

@pytest.mark.parametrize("name, channels, outputs, task", [
    ("pathmnist", 3, 9, "multi-class"), ("chestmnist", 1, 14, "multi-label, binary-class"),
    ("pneumoniamnist", 1, 2, "binary-class"), ("retinamnist", 3, 5, "ordinal-regression"),
    ("octmnist", 1, 4, "multi-class")])
def test_synthetic_set_follows_the_medmnist_table(tmp_path, name, channels, outputs, task):
    a, b = (images.synthesize(16, COUNTS, 7, name) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)                       # deterministic by seed
    assert not np.array_equal(a["train_images"], images.synthesize(16, COUNTS, 8, name)["train_images"])
    # MedMNIST's own layout: grayscale without a channel axis, labels (N, 1) or (N, L)
    assert a["train_images"].shape == ((28, 16, 16) if channels == 1 else (28, 16, 16, 3))
    assert a["train_labels"].shape == (28, outputs if task == tasks.MULTI_LABEL else 1)
    data = _synthetic(tmp_path, name, 16)
    assert (data.name, data.task, data.channels, data.n_classes, data.size, data.source) == \
        (name, task, channels, outputs, 16, "synthetic")
    assert data.images["test"].shape == (14, 16, 16, channels) and data.images["test"].dtype == np.uint8
    if task == tasks.MULTI_LABEL:
        assert 0.15 < data.labels["train"].mean() < 0.45 and set(np.unique(data.labels["train"])) == {0, 1}
    else:
        assert np.bincount(data.labels["train"][:, 0]).min() >= 28 // outputs


def test_file_names_are_medmnist_own_and_name_the_set():
    assert images.medmnist_filename("chestmnist", 28) == "chestmnist.npz"
    assert images.medmnist_filename("chestmnist", 64) == "chestmnist_64.npz"
    assert str(images_npz("chestmnist", 128)) == "data/raw/chestmnist_128.npz"
    assert "organmnist3d" not in images.medmnist_flags() and len(images.medmnist_flags()) == 12
    with pytest.raises(DataError, match="not a 2-D MedMNIST set; choose one of: pathmnist, chestmnist"):
        images.synthesize(16, COUNTS, 0, "organmnist3d")


def test_a_medmnist_file_takes_name_and_task_from_its_file_name(tmp_path):
    arrays = images.synthesize(16, COUNTS, 0, "chestmnist")
    raw = {k: v for k, v in arrays.items() if k.split("_")[0] in images.SPLITS}   # as downloaded: no metadata
    np.savez(tmp_path / "chestmnist_16.npz", **raw)
    data = images.load(tmp_path / "chestmnist_16.npz")
    assert (data.name, data.task, data.source, data.title, data.n_classes) == \
        ("chestmnist", tasks.MULTI_LABEL, "medmnist", "ChestMNIST", 14)


def _bad_file(tmp_path, change):
    arrays = {k: v for k, v in images.synthesize(16, COUNTS, 0, "octmnist").items() if "_" in k}
    change(arrays)
    np.savez(tmp_path / "mine.npz", **arrays)
    return tmp_path / "mine.npz"


@pytest.mark.parametrize("change, task, message", [
    (lambda a: a.pop("val_labels"), "", r"missing keys \['val_labels'\]"),
    (lambda a: a.update(train_images=a["train_images"].astype(np.float32)), "", "expected uint8 square images"),
    (lambda a: a.update(test_images=a["test_images"][:, :, :8]), "", "test_images has shape"),
    (lambda a: a.update(val_images=np.repeat(a["val_images"][..., None], 3, axis=3)), "", "different image shapes"),
    (lambda a: a.update(train_labels=a["train_labels"].astype(np.float32)), "", "expected integer labels"),
    (lambda a: a.update(train_labels=a["train_labels"][:5]), "", r"28 images but labels of shape \(5, 1\)"),
    (lambda a: a.update(train_labels=np.zeros((28, 3), np.uint8)), "", "set data.images.task"),
    (lambda a: a.update(val_labels=-a["val_labels"].astype(np.int64)), "", "negative values"),
    (lambda a: None, "binary-class", "binary-class set has labels 0 and 1, found 3"),
    (lambda a: None, "multi-label, binary-class", "must be 0 or 1 per label"),
    (lambda a: None, "regression", "not a MedMNIST task; choose one of"),
])
def test_a_bad_user_file_is_refused_with_the_reason(tmp_path, change, task, message):
    with pytest.raises(DataError, match=message):
        images.load(_bad_file(tmp_path, change), name="mine", task=task or None, source="file")


def test_a_user_file_in_the_medmnist_layout_loads(tmp_path):
    data = images.load(_bad_file(tmp_path, lambda a: a.update(train_labels=a["train_labels"][:, 0])),
                       name="mine", task="multi-class", source="file")   # (N,) labels are accepted too
    assert (data.name, data.channels, data.n_classes, data.title) == ("mine", 1, 4, "mine")
    assert data.labels["train"].shape == (28, 1) and data.labels["train"].dtype == np.int64


# ---------------------------------------------------------------- tasks

def test_each_task_through_loss_scores_and_metrics():
    torch.manual_seed(0)
    for task, n_out in [("multi-class", 4), ("ordinal-regression", 5), ("binary-class", 2)]:
        stored = (np.arange(6) % n_out)[:, None]   # every class present: each has an AUC
        logits = torch.randn(6, n_out)
        y = tasks.targets(stored, task)
        assert y.shape == (6,) and y.dtype == torch.int64
        expected = -torch.log_softmax(logits, 1)[torch.arange(6), y].mean()
        assert torch.allclose(tasks.loss(logits, y, task), expected)
        s = tasks.scores(logits, task)
        assert s.dtype == torch.float32 and torch.allclose(s.sum(1), torch.ones(6))
        perfect = np.eye(n_out)[stored[:, 0]] * 0.9 + 0.01
        assert tasks.evaluate(stored, perfect, task) == {"auc": 1.0, "acc": 1.0}
        summary = tasks.prediction_summary(stored, perfect, task, n_out)
        assert summary["kind"] == "confusion" and np.trace(summary["matrix"]) == 6
        assert summary["matrix"].shape == (n_out, n_out) and len(summary["pairs"]) == 6
    task = tasks.MULTI_LABEL
    stored = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]])
    logits = torch.randn(4, 3, dtype=torch.bfloat16)
    y = tasks.targets(stored, task)
    assert y.dtype == torch.float32 and y.shape == (4, 3)
    p = torch.sigmoid(logits.float())
    expected = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    assert torch.allclose(tasks.loss(logits.float(), y, task), expected, atol=1e-6)
    s = tasks.scores(logits, task)
    assert s.dtype == torch.float32 and torch.allclose(s, p)
    scores = np.where(stored == 1, 0.8, 0.3)
    scores[0, 0] = 0.25   # one positive missed, ranked below the negatives: label 0's ACC and AUC drop
    metrics = tasks.evaluate(stored, scores, task)
    assert metrics["acc"] == pytest.approx((3 / 4 + 1 + 1) / 3) and metrics["auc"] == pytest.approx((0.5 + 1 + 1) / 3)
    summary = tasks.prediction_summary(stored, scores, task, 3)
    assert summary["kind"] == "per_label" and [r["positives"] for r in summary["rows"]] == [2, 2, 2]
    assert [r["predicted_positives"] for r in summary["rows"]] == [1, 2, 2]
    assert summary["rows"][0]["auc"] == pytest.approx(0.5) and summary["rows"][0]["acc"] == 0.75
    with pytest.raises(ValueError, match="unknown task"):
        tasks.loss(logits, y, "regression")


# ---------------------------------------------------------------- models

@pytest.fixture(scope="module")
def local_weights(tmp_path_factory, local_densenet_weights):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18_imagenet.pt"
    torch.save(__import__("torchvision").models.resnet18().state_dict(), path)
    return {"resnet18": path, "densenet121": local_densenet_weights}


@pytest.mark.parametrize("name, pretrained", [("resnet18", False), ("densenet121", False), ("densenet121", True)],
                         ids=["resnet18", "densenet121", "finetune"])   # the three models of the cnn stage
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_trains_one_step_on_every_task(name, pretrained, channels, local_weights):
    torch.manual_seed(0)
    x = torch.rand(4, channels, 32, 32) * 2 - 1
    for task, n_out in [("multi-class", 4), ("binary-class", 2), ("ordinal-regression", 5), (tasks.MULTI_LABEL, 14)]:
        stored = (torch.rand(4, 14) < 0.3).long() if task == tasks.MULTI_LABEL else torch.tensor([[0], [1], [1], [0]])
        model = cnn.build(name, n_out, pretrained, str(local_weights[name]) if pretrained else "", in_channels=channels)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        logits = model(x)
        assert logits.shape == (4, n_out)
        loss = tasks.loss(logits, tasks.targets(stored, task), task)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        stem = "conv1.weight" if name == "resnet18" else "features.conv0.weight"
        assert model.state_dict()[stem].shape[1] == channels and not torch.equal(model.state_dict()[stem], before[stem])


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_grayscale_stem_sums_the_pretrained_rgb_kernels(name, local_weights):
    saved = torch.load(local_weights[name], weights_only=True)
    stem = "conv1.weight" if name == "resnet18" else "features.conv0.weight"
    gray = cnn.build(name, 3, pretrained=True, weights_file=str(local_weights[name]), in_channels=1).eval()
    rgb = cnn.build(name, 3, pretrained=True, weights_file=str(local_weights[name])).eval()
    assert torch.equal(gray.state_dict()[stem], saved[stem].sum(dim=1, keepdim=True))
    rgb.load_state_dict({k: v for k, v in gray.state_dict().items() if k != stem}, strict=False)   # same head
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():   # a grey image gives what the ImageNet network gave for it as RGB (x, x, x)
        assert torch.allclose(gray(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_small_images_are_refused_or_upsampled_on_request():
    with pytest.raises(cnn.ModelError, match=r"densenet121 needs images of at least 32 px.*upsample_to=32"):
        cnn.check_image_size("densenet121", 28)
    assert cnn.check_image_size("densenet121", 28, upsample_to=32) == 32
    assert cnn.check_image_size("resnet18", 28) == 28
    with pytest.raises(cnn.ModelError, match="below that"):
        cnn.check_image_size("densenet121", 16, upsample_to=24)
    with pytest.raises(cnn.ModelError, match="only enlarges"):
        cnn.check_image_size("resnet18", 64, upsample_to=32)
    x = torch.rand(3, 1, 28, 28)
    assert cnn.resize_batch(x, 28) is x
    big = cnn.resize_batch(x, 32)
    assert big.shape == (3, 1, 32, 32) and big.min() >= x.min() - 1e-6 and big.max() <= x.max() + 1e-6
    model = cnn.build("densenet121", 2, in_channels=1)
    assert model(big).shape == (3, 2)


# ---------------------------------------------------------------- the download stage

def test_download_stage_copies_a_user_file_and_makes_synthetic_multilabel_sets(tmp_path):
    digits = write_digits_npz(tmp_path / "digits.npz", size=28)
    params = small_params()
    params["data"]["images"].update(name="digits", source="file", size=28, path=str(digits))
    repo = make_repo_copy(tmp_path / "repo", params)
    out = run(["python", "-m", "stages.download_images"], repo, timeout=300).stdout
    data = images.load(repo / "data/raw/digits_28.npz")
    assert (data.name, data.task, data.source, data.channels, data.n_classes) == ("digits", "multi-class", "file", 1, 10)
    assert "digits_28.npz: digits" in out and "1 channel(s), 10 outputs" in out

    params["data"]["images"].update(name="chestmnist", source="synthetic", size=32, path="")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["python", "-m", "stages.download_images"], repo, timeout=300)
    data = images.load(repo / "data/raw/chestmnist_32.npz")
    assert (data.task, data.channels, data.n_classes, data.source) == (tasks.MULTI_LABEL, 1, 14, "synthetic")

    params["data"]["images"].update(name="digits", source="file", size=32, path="nowhere.npz")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["python", "-m", "stages.download_images"], repo, check=False, timeout=300)
    assert result.returncode == 2 and "data.images.path nowhere.npz: no such file" in result.stderr


# ---------------------------------------------------------------- real images

def write_digits_npz(path, size=32, seed=0):
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes), enlarged to
    `size` px (bilinear) and written as a grayscale MedMNIST-layout npz, split 60/20/20 stratified."""
    digits = load_digits()
    pixels = (digits.images * (255 / 16)).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in pixels])
    index = np.arange(len(big))
    train, rest = train_test_split(index, test_size=0.4, stratify=digits.target, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=seed)
    arrays = {}
    for split, rows in zip(images.SPLITS, (train, val, test)):
        arrays[f"{split}_images"] = big[rows]                                   # (N, S, S): grayscale
        arrays[f"{split}_labels"] = digits.target[rows].astype(np.uint8)[:, None]
    np.savez(path, **arrays)
    return path


@pytest.mark.slow
def test_resnet18_reaches_095_on_real_digits_from_a_user_file(tmp_path):
    data = images.load(write_digits_npz(tmp_path / "digits_32.npz"), name="digits", task="multi-class", source="file")
    assert (data.channels, data.n_classes, data.size) == (1, 10, 32)
    assert {s: len(y) for s, y in data.labels.items()} == {"train": 1078, "val": 359, "test": 360}
    cfg = Cnn(model="resnet18", epochs=6, batch_size=64, log_every=1000, eval_batch_size=512)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = cnn.build("resnet18", data.n_classes, in_channels=data.channels)
    tick = time.perf_counter()
    splits = cnn_loop.to_device(data, device)
    result = cnn_loop.train(model, splits, cfg, seed=0, log=lambda m, s: None)
    test, scores = cnn_loop.evaluate(model, splits["test"], cfg.eval_batch_size)
    print(f"digits, ResNet-18 32px CPU: test ACC {test['acc']:.4f} AUC {test['auc']:.4f}, best epoch "
          f"{result.best_epoch}, {time.perf_counter() - tick:.1f} s")
    assert tasks.evaluate(data.labels["test"], scores, data.task) == test
    assert test["acc"] >= 0.95, test


def test_cnn_stage_on_a_multilabel_grayscale_set_names_it_and_summarises_per_label(tmp_path):
    params = small_params()
    params["data"]["images"].update(name="chestmnist", source="synthetic", size=32, synthetic_train=64,
                                    synthetic_val=32, synthetic_test=32)
    params["cnn"]["defaults"].update(max_steps_per_epoch=2)
    repo = make_repo_copy(tmp_path / "repo", params)
    run(["python", "-m", "stages.download_images"], repo)
    out = run(["python", "-m", "stages.cnn", "resnet18"], repo, timeout=600).stdout
    assert "data ChestMNIST 32px (synthetic)" in out
    metrics = json.loads((repo / "metrics/cnn/resnet18.details.json").read_text())
    assert 0 <= metrics["test_auc"] <= 1 and 0 <= metrics["test_acc"] <= 1
    data = json.loads((repo / "metrics/cnn/resnet18.run.json").read_text())["data"]
    assert (data["title"], data["task"], data["size"]) == ("ChestMNIST", "multi-label, binary-class", 32)
    rows = json.loads((repo / "metrics/cnn/resnet18.details.json").read_text())["per_label"]
    assert [r["label"] for r in rows] == list(range(14)) and all(r["positives_of"] == 32 for r in rows)
    pairs = (repo / "metrics/cnn/confusion/resnet18.csv").read_text().splitlines()
    assert pairs[0] == "actual,predicted" and len(pairs) == 1 + 32 * 14        # a 2x2 block per label
    assert all(a.split(":")[0] == p.split(":")[0] for a, p in (line.split(",") for line in pairs[1:]))
    state = torch.load(repo / "models/cnn/resnet18.pt", weights_only=True)
    assert state["conv1.weight"].shape[1] == 1 and state["fc.weight"].shape[0] == 14   # grayscale in, 14 labels out
