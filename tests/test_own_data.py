"""Own inputs (issue 17.1): the mirror's CSV, the user's npz and the fine-tuning weights live outside
DVC's view; a changed byte in one must re-run exactly its readers, and never restore a result made
from the old bytes (real DVC in a repository copy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from conftest import SHARED_DATA, dvc, make_repo_copy, small_params
from pipeline.data import ett, images

pytestmark = pytest.mark.slow   # five small trainings: ResNet-18 only, 16 px, two steps an epoch

RAN = {"inputs", "download_ett", "download_images", "backprop", "cnn@resnet18", "cnn@finetune"}


def _stale(repo) -> set[str]:
    return set(json.loads(dvc(repo, "status", "--json").stdout)) & RAN - {"inputs"}   # inputs: always run


def _ran(result) -> set[str]:
    return {name for name in RAN if f"Running stage '{name}'" in result.stdout}


@pytest.fixture(scope="module")
def own_repo(tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    frame = ett.load_csv(SHARED_DATA / "ETTh1.csv").iloc[:3000]
    frame.rename(columns={"OT": "load"})[["date", "load", "HUFL", "MUFL"]].to_csv(outside / "grid.csv", index=False)
    arrays = images.synthesize(16, {"train": 64, "val": 27, "test": 27}, 0, "pathmnist")
    np.savez(outside / "mine.npz", **{k: v for k, v in arrays.items() if k.endswith(("_images", "_labels"))})
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), outside / "weights.pt")
    params = small_params()
    params["data"]["ett"].update(name="grid", target="load", pins={}, url="http://127.0.0.1:9/{name}.csv")
    params["data"]["images"].update(source="file", path=str(outside / "mine.npz"), name="mine", size=16)
    # What is tested is which stages re-run, not what they learn: the smallest trainings that still
    # load the weights (a ResNet-18 fine-tune reads its weights_file exactly as DenseNet121's does).
    params["cnn"]["defaults"].update(max_steps_per_epoch=2, batch_size=16, eval_batch_size=32)
    params["cnn"]["experiments"]["finetune"].update(model="resnet18", weights_file=str(outside / "weights.pt"))
    repo = make_repo_copy(tmp_path_factory.mktemp("repo"), params)
    dvc(repo, "repro", "backprop", "cnn@resnet18", "cnn@finetune", DATA_MIRROR=outside, timeout=1800)
    assert _stale_in(repo, outside) == set()
    return repo, outside


def _stale_in(repo, outside):
    dvc(repo, "repro", "inputs", DATA_MIRROR=outside)   # what every `dvc repro` / `dvc exp run` does first
    return _stale(repo)


def test_a_changed_byte_in_the_mirror_csv_retrains_exactly_its_readers(own_repo):
    repo, outside = own_repo
    csv = outside / "grid.csv"
    csv.write_bytes(csv.read_bytes().replace(b"5.827", b"5.828", 1))
    assert _stale_in(repo, outside) == {"download_ett"}
    dvc(repo, "repro", "download_ett", DATA_MIRROR=outside)
    assert _stale(repo) == {"backprop"}
    result = dvc(repo, "repro", "backprop", DATA_MIRROR=outside)
    assert _ran(result) == {"inputs", "backprop"} and "restored" not in result.stdout


def test_a_changed_byte_in_the_own_npz_retrains_exactly_its_readers(own_repo):
    repo, outside = own_repo
    with np.load(outside / "mine.npz") as npz:
        arrays = dict(npz)
    arrays["train_images"][0, 0, 0, 0] ^= 1
    np.savez(outside / "mine.npz", **arrays)
    assert _stale_in(repo, outside) == {"download_images"}
    dvc(repo, "repro", "download_images", DATA_MIRROR=outside)
    assert _stale(repo) == {"cnn@resnet18", "cnn@finetune"}
    result = dvc(repo, "repro", "cnn@resnet18", DATA_MIRROR=outside, timeout=1800)
    assert _ran(result) == {"inputs", "cnn@resnet18"} and "restored" not in result.stdout


@pytest.mark.parametrize("how", ["param", "env"])
def test_a_changed_byte_in_the_weights_retrains_exactly_the_fine_tuned_run(own_repo, how):
    repo, outside = own_repo
    state = torch.load(outside / "weights.pt", weights_only=True)
    state["fc.bias"][0] += 1.0
    extra = {}
    if how == "env":   # $FINETUNE_WEIGHTS wins over the param; DVC cannot see an environment variable
        torch.save(state, outside / "env_weights.pt")
        extra = {"FINETUNE_WEIGHTS": outside / "env_weights.pt"}
    else:
        torch.save(state, outside / "weights.pt")
    dvc(repo, "repro", "inputs", DATA_MIRROR=outside, **extra)
    assert _stale(repo) == {"cnn@finetune"}
    result = dvc(repo, "repro", "cnn@finetune", DATA_MIRROR=outside, timeout=1800, **extra)
    assert _ran(result) == {"inputs", "cnn@finetune"} and "restored" not in result.stdout
