"""Claims of pipeline.data.inputs (the records of inputs DVC cannot see) and of ett.check_pin: each
record names the file a stage will read and its sha256, a changed byte changes it, and unchanged
inputs give identical records."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline import params as P
from pipeline.data import ett, inputs
from pipeline.errors import DataError
from pipeline.models import cnn
from pipeline.paths import main_repo_root

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_user_env(monkeypatch):
    for name in ("DATA_MIRROR", "FINETUNE_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)


def params(**sections):
    """params.yaml with `sections` merged in: {"ett": {...}} goes to data.ett, and so on."""
    raw = P.load_yaml((REPO / "params.yaml").read_text())
    for key, change in sections.items():
        target = {"ett": raw["data"]["ett"], "images": raw["data"]["images"], "data": raw["data"],
                  "finetune": raw["cnn"]["experiments"]["finetune"]}[key]
        target.update(change)
    return P.parse(raw)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_record_is_its_path_and_sha256_or_missing(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"date,OT\n")
    assert inputs._file(path) == {"file": str(path), "sha256": sha256(path)}
    assert inputs._file(tmp_path / "none.csv") == {"file": str(tmp_path / "none.csv"), "sha256": "missing"}


def test_the_ett_record_names_the_mirrors_csv_and_changes_with_one_byte(tmp_path, monkeypatch):
    csv = tmp_path / "ETTh2.csv"
    csv.write_bytes(b"date,OT\n2016-07-01 00:00:00,1.0\n")
    monkeypatch.setenv("DATA_MIRROR", str(tmp_path))
    cfg = params(ett={"name": "ETTh2"})
    record = inputs.ett_record(cfg)
    assert record == {"mirror": {"file": str(csv), "sha256": sha256(csv)}}
    assert inputs.ett_record(cfg) == record   # no time stamp: unchanged bytes, the same record
    csv.write_bytes(b"date,OT\n2016-07-01 00:00:00,1.5\n")
    assert inputs.ett_record(cfg)["mirror"]["sha256"] == sha256(csv) != record["mirror"]["sha256"]


def test_the_mirror_param_is_used_when_the_environment_names_none(tmp_path):
    (tmp_path / "ETTh1.csv").write_bytes(b"x")
    record = inputs.ett_record(params(data={"mirror_dir": str(tmp_path)}))
    assert record == {"mirror": {"file": str(tmp_path / "ETTh1.csv"), "sha256": sha256(tmp_path / "ETTh1.csv")}}


def test_without_the_csv_in_the_mirror_the_record_is_the_download_and_its_pin(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_MIRROR", str(tmp_path))   # a mirror without this file
    cfg = params(ett={"name": "ETTh2"})
    assert inputs.ett_record(cfg) == {
        "download": "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/ETTh2.csv",
        "pin": cfg.data.ett.pins["ETTh2"]}
    assert inputs.ett_record(params(ett={"name": "ETTm1"}))["pin"] == ""   # no pin: an empty one


def test_the_images_record_hashes_the_users_npz_read_from_the_repository(tmp_path):
    npz = tmp_path / "mine.npz"
    npz.write_bytes(b"PK")
    assert inputs.images_record(params(images={"source": "file", "path": str(npz)})) == {
        "source": "file", "file": str(npz), "sha256": sha256(npz)}
    relative = inputs.images_record(params(images={"source": "file", "path": "no_such_images.npz"}))
    assert relative == {"source": "file", "file": str(main_repo_root() / "no_such_images.npz"), "sha256": "missing"}
    for source in ("medmnist", "synthetic"):   # pinned downloads and generated sets: their params say it all
        assert inputs.images_record(params(images={"source": source})) == {"source": source}


def test_the_weights_record_is_the_file_the_fine_tune_loads(tmp_path, monkeypatch):
    assert inputs.weights_record(params(finetune={"pretrained": False}), "finetune") == {"pretrained": False}
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    cfg = params(finetune={"weights_file": str(weights)})
    assert inputs.weights_record(cfg, "finetune") == {"pretrained": True, "file": str(weights), "sha256": sha256(weights)}
    other = tmp_path / "other.pt"
    other.write_bytes(b"other weights")
    monkeypatch.setenv("FINETUNE_WEIGHTS", str(other))   # the environment wins over the param
    assert inputs.weights_record(cfg, "finetune")["sha256"] == sha256(other)


def test_without_a_weights_file_the_record_is_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    record = inputs.weights_record(params(), "finetune")
    hub = cnn.hub_file("densenet121")
    assert hub.is_relative_to(tmp_path)
    assert record == {"pretrained": True, "hub": True, "file": str(hub), "sha256": "missing"}
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"cached")
    assert inputs.weights_record(params(), "finetune")["sha256"] == sha256(hub)


def test_check_pin_gives_the_digest_and_whether_it_is_pinned(tmp_path):
    path = tmp_path / "ETTh1.csv"
    path.write_bytes(b"rows")
    digest = sha256(path)
    assert ett.check_pin(path, "ETTh1", {"ETTh1": digest}) == (digest, True)
    assert ett.check_pin(path, "mine", {"ETTh1": "0" * 64}) == (digest, False)
    assert ett.check_pin(path, "mine", {"mine": ""}) == (digest, False)


def test_check_pin_refuses_an_edited_file_naming_both_digests_and_the_ways_out(tmp_path):
    path = tmp_path / "ETTh1.csv"
    path.write_bytes(b"edited rows")
    with pytest.raises(DataError) as error:
        ett.check_pin(path, "ETTh1", {"ETTh1": "f" * 64})
    said = str(error.value)
    assert str(path) in said and sha256(path) in said and "f" * 64 in said
    assert "data.ett.pins.ETTh1" in said and "dvc repro download_ett" in said
