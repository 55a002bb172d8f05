"""Data stage: sources, checksums, and every way bad input must fail (clearly, leaving nothing)."""

import hashlib

import numpy as np
import pytest
import yaml

from conftest import SHARED_DATA, make_repo_copy, run, small_params
from pipeline.data import ett
from pipeline.data.fetch import fetch
from pipeline.errors import DataError

ETTH1_SHA256 = "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066"
CLOSED_PORT_URL = "http://127.0.0.1:9/{name}.csv"   # refused at once: an offline network, quickly


def test_mirror_copy_is_verified_and_atomic(tmp_path):
    dest = tmp_path / "raw" / "ETTh1.csv"
    assert fetch(dest, CLOSED_PORT_URL, ETTH1_SHA256, "sha256", SHARED_DATA) == "mirror"
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == ETTH1_SHA256
    assert not list(dest.parent.glob("*.partial"))


def test_offline_without_mirror_says_what_was_tried(tmp_path):
    dest = tmp_path / "ETTh1.csv"
    with pytest.raises(DataError) as caught:
        fetch(dest, CLOSED_PORT_URL.format(name="ETTh1"), ETTH1_SHA256, "sha256", tmp_path / "empty",
              "set DATA_MIRROR")
    message = str(caught.value)
    assert "mirror" in message and "download http://127.0.0.1:9" in message and "set DATA_MIRROR" in message
    assert not dest.exists() and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("damage", ["truncated", "wrong bytes"])
def test_bad_checksum_keeps_nothing(tmp_path, damage):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    data = (SHARED_DATA / "ETTh1.csv").read_bytes()
    (mirror / "ETTh1.csv").write_bytes(data[: len(data) // 2] if damage == "truncated" else data.replace(b"1", b"2", 1))
    dest = tmp_path / "raw" / "ETTh1.csv"
    with pytest.raises(DataError, match="truncated or corrupt"):
        fetch(dest, CLOSED_PORT_URL, ETTH1_SHA256, "sha256", mirror, "fix the mirror")
    assert not dest.exists() and not list(dest.parent.glob("*"))


@pytest.fixture
def broken_csvs(tmp_path):
    frame = ett.load_csv(SHARED_DATA / "ETTh1.csv")
    cases = {}
    cases["missing_ot"] = frame.drop(columns="OT")
    with_nan = frame.copy()
    with_nan.loc[100:104, "HUFL"] = np.nan
    cases["nan"] = with_nan
    cases["short"] = frame.iloc[:5000]
    for name, table in cases.items():
        table.to_csv(tmp_path / f"{name}.csv", index=False)
    (tmp_path / "garbage.csv").write_bytes(b"\x00\xff\x00 not a csv")
    return tmp_path


@pytest.mark.parametrize("name,message", [("missing_ot", "'OT' column"), ("nan", "5 rows have missing values"),
                                          ("garbage", "expected a 'date' column|not a readable CSV")])
def test_malformed_csv_is_refused(broken_csvs, name, message):
    with pytest.raises(DataError, match=message):
        ett.load_csv(broken_csvs / f"{name}.csv")


def test_too_short_csv_is_refused(broken_csvs):
    frame = ett.load_csv(broken_csvs / "short.csv")
    with pytest.raises(DataError, match="standard split needs 14400"):
        ett.split_borders("ETTh1", len(frame), 96)


def test_download_stage_offline_without_mirror_fails_fast_with_one_message(tmp_path):
    params = small_params()
    params["data"]["ett"]["url"] = CLOSED_PORT_URL
    repo = make_repo_copy(tmp_path, params)
    result = run(["python", "-m", "stages.download_ett"], repo, check=False, timeout=120, DATA_MIRROR="")
    assert result.returncode == 2
    assert "could not get ETTh1.csv" in result.stderr and "DATA_MIRROR" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (repo / "data/raw/ETTh1.csv").exists()


def test_download_stage_refuses_a_csv_with_nans_from_an_unpinned_mirror(tmp_path, broken_csvs):
    params = small_params()
    params["data"]["ett"].update(pins={}, url=CLOSED_PORT_URL)
    repo = make_repo_copy(tmp_path / "repo", params)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "ETTh1.csv").write_bytes((broken_csvs / "nan.csv").read_bytes())
    result = run(["python", "-m", "stages.download_ett"], repo, check=False, DATA_MIRROR=mirror)
    assert result.returncode == 2 and "missing values" in result.stderr
    assert not (repo / "data/raw/ETTh1.csv").exists()


def test_pathmnist_download_offline_names_both_ways_out(tmp_path):
    params = small_params()
    params["data"]["images"]["source"] = "medmnist"
    params["data"]["images"]["size"] = 64
    repo = make_repo_copy(tmp_path, params)
    result = run(["python", "-m", "stages.download_pathmnist"], repo, check=False, timeout=120, DATA_MIRROR="")
    assert result.returncode == 2, result.stderr
    assert "pathmnist_64.npz" in result.stderr and "synthetic" in result.stderr and "DATA_MIRROR" in result.stderr
    assert not list((repo / "data/raw").glob("*"))


def test_standard_split_and_windows():
    frame = ett.load_csv(SHARED_DATA / "ETTh1.csv")
    splits = ett.standardised_splits(frame, "ETTh1", 96)
    assert np.allclose(splits.train.mean(axis=0), 0, atol=1e-9) and np.allclose(splits.train.std(axis=0), 1)
    x, y = ett.windows(splits.test, 96, 192)
    assert x.shape == (2689, 7, 96) and y.shape == (2689, 7, 192)
    assert np.array_equal(x[1, :, :95], x[0, :, 1:]) and np.array_equal(y[0, :, 0], splits.test[96])
