"""Claims about the image sets (pipeline.data.images): MedMNIST's flags and file names, fetching a
set from a mirror folder (MD5 against the medmnist table), the synthetic stand-in (counts, shapes,
dtype, labels, seeds, the generator's recipe) and load(), which returns a file's arrays as they are
and refuses each kind of bad file with the reason. Tiny arrays in tmp_path only."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from medmnist import INFO

from pipeline.data import images
from pipeline.errors import DataError
from pipeline.params import MEDMNIST_FLAGS

MULTI_LABEL = "multi-label, binary-class"
COUNTS = {"train": 12, "val": 5, "test": 7}


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------- MedMNIST table, names

def test_the_flags_are_medmnists_twelve_2d_sets_in_table_order():
    assert images.medmnist_flags() == list(MEDMNIST_FLAGS)
    assert images.medmnist_info("dermamnist") is INFO["dermamnist"]
    for bad in ("organmnist3d", "mnist", ""):
        with pytest.raises(DataError, match="is not a 2-D MedMNIST set"):
            images.medmnist_info(bad)


def test_file_names_are_medmnists_own():
    assert images.medmnist_filename("chestmnist", 28) == "chestmnist.npz"
    assert images.medmnist_filename("chestmnist", 64) == "chestmnist_64.npz"
    assert images.medmnist_filename("pathmnist", 224) == "pathmnist_224.npz"


def test_the_way_out_names_the_mirror_file_and_the_synthetic_set():
    assert images.way_out("bloodmnist", 64) == (
        "set DATA_MIRROR to a folder holding bloodmnist_64.npz, or use the synthetic set: "
        "`dvc exp run -S data.images.source=synthetic`")


@pytest.mark.parametrize("path, name", [("data/raw/chestmnist_64.npz", "chestmnist"), ("chestmnist.npz", "chestmnist"),
                                        ("my_set.npz", "my_set"), ("my_set_2_28.npz", "my_set_2"),
                                        ("digits_x.npz", "digits_x"), ("set\n2.npz", "set\n2")])   # no match: the stem
def test_the_name_from_a_file_name_drops_only_a_trailing_size(path, name):
    from pathlib import Path
    assert images._name_from_path(Path(path)) == name


def test_default_task_is_the_tables_else_multi_class():
    assert images.default_task("chestmnist") == MULTI_LABEL
    assert images.default_task("pneumoniamnist") == "binary-class"
    assert images.default_task("retinamnist") == "ordinal-regression"
    assert images.default_task("digits") == "multi-class"


def test_check_task_accepts_medmnists_tasks_and_names_the_param():
    for task in ("multi-class", MULTI_LABEL, "binary-class", "ordinal-regression"):
        assert images.check_task(task) == task
    with pytest.raises(DataError, match=r"^data.images.task 'regression' is not a MedMNIST task"):
        images.check_task("regression")
    with pytest.raises(DataError, match=r"^my.key 'x' is not"):
        images.check_task("x", key="my.key")


# ---------------------------------------------------------------- fetch_medmnist

@pytest.fixture
def fake_table(monkeypatch):
    """Tiny stand-ins for BreastMNIST's 28 px and 64 px files, with their MD5s in the medmnist table."""
    files = {28: b"breast 28 px npz bytes", 64: b"breast 64 px npz bytes, another file"}
    for size, data in files.items():
        flag = "" if size == 28 else f"_{size}"
        monkeypatch.setitem(INFO["breastmnist"], f"MD5{flag}", _md5(data))
    return files


def test_fetch_medmnist_copies_the_mirror_file_checked_against_the_table(tmp_path, fake_table):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "breastmnist.npz").write_bytes(fake_table[28])
    (mirror / "breastmnist_64.npz").write_bytes(fake_table[64])
    raw = tmp_path / "data" / "raw"
    # 28 px: MedMNIST's file is breastmnist.npz, data/raw names it with its size.
    assert images.fetch_medmnist(raw / "breastmnist_28.npz", "breastmnist", 28, mirror) == "mirror"
    assert sorted(p.name for p in raw.iterdir()) == ["breastmnist_28.npz"]
    assert (raw / "breastmnist_28.npz").read_bytes() == fake_table[28]
    assert images.fetch_medmnist(raw / "breastmnist_64.npz", "breastmnist", 64, mirror) == "mirror"
    assert (raw / "breastmnist_64.npz").read_bytes() == fake_table[64]
    assert sorted(p.name for p in raw.iterdir()) == ["breastmnist_28.npz", "breastmnist_64.npz"]


def test_fetch_medmnist_checks_the_md5_of_the_size_asked_for(tmp_path, fake_table):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "breastmnist_64.npz").write_bytes(fake_table[28])   # the 28 px bytes under the 64 px name
    raw = tmp_path / "raw"
    with pytest.raises(DataError) as caught:
        images.fetch_medmnist(raw / "breastmnist_64.npz", "breastmnist", 64, mirror)
    message = str(caught.value)
    assert f"md5 is {_md5(fake_table[28])}, expected {_md5(fake_table[64])}" in message
    assert message.endswith(images.way_out("breastmnist", 64))
    assert list(raw.iterdir()) == []


def test_fetch_medmnist_downloads_the_url_of_the_size_asked_for(tmp_path, fake_table, monkeypatch):
    served = tmp_path / "zenodo"
    served.mkdir()
    for size, data in fake_table.items():
        (served / f"{size}.npz").write_bytes(data)
        monkeypatch.setitem(INFO["breastmnist"], "url" if size == 28 else f"url_{size}", (served / f"{size}.npz").as_uri())
    raw = tmp_path / "raw"
    assert images.fetch_medmnist(raw / "breastmnist_64.npz", "breastmnist", 64, None) == "download"
    assert (raw / "breastmnist_64.npz").read_bytes() == fake_table[64]
    empty = tmp_path / "empty_mirror"
    empty.mkdir()
    assert images.fetch_medmnist(raw / "breastmnist_28.npz", "breastmnist", 28, empty) == "download"
    assert (raw / "breastmnist_28.npz").read_bytes() == fake_table[28]
    assert sorted(p.name for p in raw.iterdir()) == ["breastmnist_28.npz", "breastmnist_64.npz"]


@pytest.mark.parametrize("size", [128, 224])
def test_fetch_medmnist_takes_the_large_sizes_too(tmp_path, monkeypatch, size):
    data = f"breast {size} px".encode()
    monkeypatch.setitem(INFO["breastmnist"], f"MD5_{size}", _md5(data))
    (tmp_path / f"breastmnist_{size}.npz").write_bytes(data)
    dest = tmp_path / "raw" / f"breastmnist_{size}.npz"
    assert images.fetch_medmnist(dest, "breastmnist", size, tmp_path) == "mirror" and dest.read_bytes() == data


def test_fetch_medmnist_refuses_sizes_and_sets_medmnist_does_not_have(tmp_path):
    for size in (32, 27, 0):
        with pytest.raises(DataError, match=f"MedMNIST has no {size} px files"):
            images.fetch_medmnist(tmp_path / "x.npz", "breastmnist", size, tmp_path)
    with pytest.raises(DataError, match="not a 2-D MedMNIST set"):
        images.fetch_medmnist(tmp_path / "x.npz", "organmnist3d", 28, tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- synthesize

def _reference_synthesis(size, counts, seed, name):
    """The generator's recipe, written out from its docstring: per-class (or per-label) colour from
    U(60, 200), stripe angle k*pi/L and frequency 2, 4, 6, 2, ...; per-image phase U(0, 2 pi),
    brightness U(0.8, 1.2), amplitude 40 (single-label) or 30 per positive label (multi-label,
    each label positive with probability 0.3, on the labels' mean colour), N(0, 20) pixel noise,
    clipped to 0..255. The random draws in the generator's order."""
    info = INFO[name]
    n_labels, channels = len(info["label"]), info["n_channels"]
    rng = np.random.default_rng(seed)
    grid = np.arange(size, dtype=np.float32) / size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    palette = rng.uniform(60, 200, size=(n_labels, channels)).astype(np.float32)
    angles = [k * (np.pi / n_labels) for k in range(n_labels)]
    freqs = [(2.0, 4.0, 6.0)[k % 3] for k in range(n_labels)]
    out = {}
    for split in ("train", "val", "test"):
        n = counts[split]
        imgs = np.empty((n, size, size, channels), np.float32)
        if info["task"] == MULTI_LABEL:
            labels = (rng.random((n, n_labels)) < 0.3).astype(np.uint8)
            phase = rng.uniform(0, 2 * np.pi, size=(n, n_labels, 1, 1)).astype(np.float32)
            bright = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
            for i in range(n):
                texture = np.zeros((size, size), np.float32)
                for k in range(n_labels):
                    if labels[i, k]:
                        texture += np.sin(2 * np.pi * freqs[k] * (xx * np.cos(angles[k]) + yy * np.sin(angles[k]))
                                          + phase[i, k])
                imgs[i] = palette.mean(axis=0) * bright[i] + 30 * texture[..., None]
        else:
            classes = np.arange(n) % n_labels
            rng.shuffle(classes)
            phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
            bright = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
            for i, c in enumerate(classes):
                stripes = np.sin(2 * np.pi * freqs[c] * (xx * np.cos(angles[c]) + yy * np.sin(angles[c])) + phase[i])
                imgs[i] = palette[c] * bright[i] + 40 * stripes[..., None]
            labels = classes.astype(np.uint8)[:, None]
        imgs += rng.normal(0, 20, size=imgs.shape).astype(np.float32)
        pixels = np.clip(imgs, 0, 255).astype(np.uint8)
        out[f"{split}_images"] = pixels[..., 0] if channels == 1 else pixels
        out[f"{split}_labels"] = labels
    return out


@pytest.mark.parametrize("name", ["pathmnist", "octmnist", "chestmnist", "retinamnist"])
def test_synthesize_follows_its_documented_recipe(name):
    arrays = images.synthesize(12, COUNTS, 5, name)
    reference = _reference_synthesis(12, COUNTS, 5, name)
    for key, expected in reference.items():
        got = arrays[key]
        assert got.shape == expected.shape and got.dtype == expected.dtype, key
        # float32 rounding of sin/cos may move a pixel by one grey level, never more
        assert np.abs(got.astype(np.int16) - expected.astype(np.int16)).max() <= 1, key
        assert np.mean(got != expected) < 0.01, key
        if key.endswith("labels"):
            assert np.array_equal(got, expected), key


@pytest.mark.parametrize("name", ["pathmnist", "octmnist", "chestmnist", "pneumoniamnist"])
def test_synthesize_gives_the_counts_sizes_dtype_and_label_range_of_the_named_set(name):
    info = INFO[name]
    n_labels, channels = len(info["label"]), info["n_channels"]
    arrays = images.synthesize(10, COUNTS, 0, name)
    assert set(arrays) == {"source", "name", "task"} | {f"{s}_{k}" for s in COUNTS for k in ("images", "labels")}
    assert (str(arrays["source"]), str(arrays["name"]), str(arrays["task"])) == ("synthetic", name, info["task"])
    for split, n in COUNTS.items():
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        assert x.shape == ((n, 10, 10) if channels == 1 else (n, 10, 10, 3)) and x.dtype == np.uint8
        assert y.dtype == np.uint8
        if info["task"] == MULTI_LABEL:
            assert y.shape == (n, n_labels) and set(np.unique(y)) <= {0, 1}
        else:
            assert y.shape == (n, 1)
            # every class equally often (up to one): np.arange(n) % L, shuffled
            assert sorted(np.bincount(y[:, 0], minlength=n_labels)) == sorted(np.bincount(np.arange(n) % n_labels, minlength=n_labels))


def test_synthesize_is_fixed_by_its_seed_and_defaults_to_pathmnist():
    a, b = images.synthesize(8, COUNTS, 3), images.synthesize(8, COUNTS, 3, "pathmnist")
    assert all(np.array_equal(a[k], b[k]) for k in a) and str(a["name"]) == "pathmnist"
    c = images.synthesize(8, COUNTS, 4)
    assert not np.array_equal(a["train_images"], c["train_images"])
    assert not np.array_equal(a["test_labels"], c["test_labels"])


def test_synthetic_classes_differ_in_colour_and_multi_labels_are_about_30_percent_positive():
    arrays = images.synthesize(16, {"train": 300, "val": 9, "test": 9}, 0, "bloodmnist")   # 8 classes, RGB
    x, y = arrays["train_images"].astype(np.float64), arrays["train_labels"][:, 0]
    means = np.array([x[y == c].mean(axis=(0, 1, 2)) for c in range(8)])   # (8, 3): each class its own colour
    assert np.all(means > 50) and np.all(means < 215)
    gaps = np.linalg.norm(means[:, None] - means[None], axis=2) + np.eye(8) * 1e9
    assert gaps.min() > 5
    multi = images.synthesize(8, {"train": 400, "val": 3, "test": 3}, 0, "chestmnist")["train_labels"]
    assert 0.27 < multi.mean() < 0.33


@pytest.mark.parametrize("name", ["chestmnist", "pathmnist"])
def test_synthesizing_peaks_under_30_bytes_per_pixel_so_224_px_sets_fit(name):
    # Memory is what limits a synthetic set at 224 px (hence one label at a time). The multi-label
    # texture, colours, brightness and noise are float32: about 28 bytes per output pixel at the peak
    # (the sines are float64). A float64 texture or image array would need 32 or more.
    import tracemalloc

    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        arrays = images.synthesize(64, {"train": 40, "val": 1, "test": 1}, 0, name)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        if started:
            tracemalloc.stop()
    assert peak / arrays["train_images"].size < 30


# ---------------------------------------------------------------- save_npz, load

def _layout(n=(6, 3, 4), size=5, rgb=False, labels_of=None, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(images.SPLITS, n):
        shape = (count, size, size, 3) if rgb else (count, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (labels_of(count) if labels_of else (np.arange(count) % 3)[:, None]).astype(np.uint8)
    return arrays


def _write(tmp_path, arrays, file="mine.npz"):
    path = tmp_path / file
    np.savez(path, **arrays)
    return path


def test_save_npz_writes_the_arrays_atomically(tmp_path):
    arrays = _layout()
    images.save_npz(tmp_path / "sub" / "set_5.npz", arrays)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["set_5.npz"]   # no temporary file left
    with np.load(tmp_path / "sub" / "set_5.npz") as saved:
        assert set(saved.files) == set(arrays) and all(np.array_equal(saved[k], v) for k, v in arrays.items())


def test_load_returns_exactly_the_files_arrays_with_a_channel_axis_for_grayscale(tmp_path):
    arrays = _layout()
    data = images.load(_write(tmp_path, arrays), name="mine", task="multi-class", source="file")
    for split in images.SPLITS:
        assert np.array_equal(data.images[split], arrays[f"{split}_images"][..., None])
        assert data.images[split].dtype == np.uint8
        assert np.array_equal(data.labels[split], arrays[f"{split}_labels"]) and data.labels[split].dtype == np.int64
    assert (data.size, data.channels, data.n_classes, data.source, data.name, data.task) == \
        (5, 1, 3, "file", "mine", "multi-class")
    assert not data.multi_label and data.title == "mine"


def test_load_keeps_rgb_images_as_they_are(tmp_path):
    arrays = _layout(rgb=True, size=4)
    data = images.load(_write(tmp_path, arrays), name="mine", task="multi-class", source="file")
    for split in images.SPLITS:
        assert np.array_equal(data.images[split], arrays[f"{split}_images"])
    assert (data.channels, data.size) == (3, 4)


def test_load_takes_name_task_and_source_from_the_arguments_then_the_file_then_the_file_name(tmp_path):
    labels = _layout(labels_of=lambda n: np.arange(n)[:, None] % 2)
    # No metadata: the file name and the medmnist table; source "medmnist".
    data = images.load(_write(tmp_path, labels, "pneumoniamnist_5.npz"))
    assert (data.name, data.task, data.source, data.n_classes, data.title) == \
        ("pneumoniamnist", "binary-class", "medmnist", 2, "PneumoniaMNIST")
    # Metadata in the file wins over the file name.
    meta = dict(labels, name=np.array("breastmnist"), task=np.array("multi-class"), source=np.array("synthetic"))
    data = images.load(_write(tmp_path, meta, "pneumoniamnist_5.npz"))
    assert (data.name, data.task, data.source, data.n_classes) == ("breastmnist", "multi-class", "synthetic", 2)
    # Arguments win over both.
    data = images.load(_write(tmp_path, meta, "pneumoniamnist_5.npz"), name="mine", task="ordinal-regression",
                       source="file")
    assert (data.name, data.task, data.source, data.n_classes) == ("mine", "ordinal-regression", "file", 2)
    # A name outside the table and no task anywhere: multi-class.
    data = images.load(_write(tmp_path, labels, "digits_5.npz"))
    assert (data.name, data.task) == ("digits", "multi-class")
    # The file's name entry chooses the default task.
    data = images.load(_write(tmp_path, dict(labels, name=np.array("pneumoniamnist")), "x.npz"))
    assert (data.name, data.task) == ("pneumoniamnist", "binary-class")


def test_a_medmnist_name_takes_its_class_count_from_the_table(tmp_path):
    arrays = _layout()   # labels 0..2 only
    data = images.load(_write(tmp_path, arrays), name="octmnist")   # a MedMNIST file lacking a class
    assert (data.task, data.n_classes) == ("multi-class", 4)
    with pytest.raises(DataError, match="the file has 3 classes but data.images.name is 'octmnist'"):
        images.load(_write(tmp_path, arrays), name="octmnist", source="file")   # the user's own: never padded
    with pytest.raises(DataError, match="breastmnist has 2 classes in the medmnist table, the file has 3"):
        images.load(_write(tmp_path, arrays), name="breastmnist", task="multi-class")


def test_the_class_count_is_the_largest_label_of_any_split_plus_one(tmp_path):
    arrays = _layout()
    arrays["test_labels"][0, 0] = 6           # only the test split has class 6
    assert images.load(_write(tmp_path, arrays), name="mine", task="multi-class").n_classes == 7
    arrays = _layout()
    arrays["train_labels"][:] = 0
    arrays["val_labels"][:] = 1               # every split needed to see two classes
    arrays["test_labels"][:] = 0
    assert images.load(_write(tmp_path, arrays), name="mine", task="multi-class").n_classes == 2
    arrays["val_labels"][:] = 0
    with pytest.raises(DataError, match="every label is 0; a classifier needs at least 2 classes"):
        images.load(_write(tmp_path, arrays), name="mine", task="multi-class")


def test_binary_sets_have_two_outputs_and_labels_0_or_1(tmp_path):
    arrays = _layout(labels_of=lambda n: np.zeros((n, 1)))
    arrays["val_labels"][0, 0] = 1
    assert images.load(_write(tmp_path, arrays), name="mine", task="binary-class").n_classes == 2
    arrays["val_labels"][:] = 0    # all 0: still a 2-way softmax
    assert images.load(_write(tmp_path, arrays), name="mine", task="binary-class").n_classes == 2
    arrays["test_labels"][1, 0] = 2
    path = _write(tmp_path, arrays)
    with pytest.raises(DataError, match="binary-class set has labels 0 and 1, found 2") as caught:
        images.load(path, name="mine", task="binary-class")
    assert str(caught.value).startswith(f"{path}: ")   # the message names the file


def test_multi_label_sets_have_one_output_per_label(tmp_path):
    arrays = _layout(labels_of=lambda n: np.arange(n * 4).reshape(n, 4) % 2)
    data = images.load(_write(tmp_path, arrays), name="mine", task=MULTI_LABEL)
    assert data.n_classes == 4 and data.multi_label and data.labels["val"].shape == (3, 4)
    assert np.array_equal(data.labels["train"], arrays["train_labels"])
    # chestmnist has 14 labels in the table: a 4-label file under its name is refused
    with pytest.raises(DataError, match="chestmnist has 14 labels in the medmnist table, the file has 4"):
        images.load(_write(tmp_path, arrays), name="chestmnist", task=MULTI_LABEL)
    arrays = _layout(labels_of=lambda n: np.arange(n * 14).reshape(n, 14) % 2)
    data = images.load(_write(tmp_path, arrays), name="chestmnist")
    assert (data.task, data.n_classes) == (MULTI_LABEL, 14)
    arrays["train_labels"][:] = 0   # every label 0 in train: still 14 outputs
    assert images.load(_write(tmp_path, arrays), name="chestmnist").n_classes == 14


def test_single_label_files_may_store_labels_as_a_vector(tmp_path):
    arrays = _layout()
    arrays["train_labels"] = arrays["train_labels"][:, 0]
    data = images.load(_write(tmp_path, arrays), name="mine", task="multi-class")
    assert data.labels["train"].shape == (6, 1) and np.array_equal(data.labels["train"][:, 0], arrays["train_labels"])


def _refused(tmp_path, arrays, match, task="multi-class", name="mine"):
    with pytest.raises(DataError, match=match):
        images.load(_write(tmp_path, arrays), name=name, task=task, source="file")


def test_load_refuses_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(DataError, match="not found: run `dvc repro download_images`"):
        images.load(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not an npz archive"):
        images.load(tmp_path / "junk.npz")


@pytest.mark.parametrize("key", ["train_images", "val_labels", "test_images", "test_labels"])
def test_load_refuses_a_file_missing_a_key_and_names_it(tmp_path, key):
    arrays = _layout()
    del arrays[key]
    _refused(tmp_path, arrays, rf"missing keys \['{key}'\]")


@pytest.mark.parametrize("split", images.SPLITS)
def test_load_refuses_images_that_are_not_uint8_square_gray_or_rgb(tmp_path, split):
    key = f"{split}_images"
    bad = {
        "float": lambda x: x.astype(np.float32),
        "int64": lambda x: x.astype(np.int64),
        "not square": lambda x: x[:, :, :4],
        "two channels": lambda x: np.stack([x, x], axis=3),
        "four channels": lambda x: np.stack([x] * 4, axis=3),
        "flat": lambda x: x.reshape(len(x), -1),
        "5-D": lambda x: x[..., None, None],
    }
    for change in bad.values():
        arrays = _layout()
        arrays[key] = change(arrays[key])
        _refused(tmp_path, arrays, f"{key} has shape .*expected uint8 square images")
    arrays = _layout()
    arrays[key] = arrays[key][:0]
    arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:0]
    _refused(tmp_path, arrays, f"the {split} split is empty")


@pytest.mark.parametrize("split", images.SPLITS)
def test_load_refuses_labels_of_the_wrong_kind_shape_or_range(tmp_path, split):
    key = f"{split}_labels"
    arrays = _layout()
    arrays[key] = arrays[key].astype(np.float64)
    _refused(tmp_path, arrays, f"{key} has dtype float64; expected integer labels")
    arrays = _layout()
    n = len(arrays[key])
    arrays[key] = arrays[key][1:]
    _refused(tmp_path, arrays, rf"{split} has {n} images but labels of shape \({n - 1}, 1\)")
    arrays = _layout()
    arrays[key] = arrays[key][:, :, None]
    _refused(tmp_path, arrays, rf"{split} has {n} images but labels of shape \({n}, 1, 1\)")
    arrays = _layout()
    arrays[key] = np.zeros((n, 2), np.uint8)
    _refused(tmp_path, arrays, rf"{key} has shape \({n}, 2\), i.e. 2 labels per image, but the task is 'multi-class'")
    arrays = _layout()
    arrays[key] = arrays[key].astype(np.int64)
    arrays[key][-1, 0] = -1
    _refused(tmp_path, arrays, f"{key} has negative values")
    arrays = _layout(labels_of=lambda c: np.ones((c, 3)))
    arrays[key][0, 1] = 2
    _refused(tmp_path, arrays, f"{key} of a multi-label set must be 0 or 1 per label", task=MULTI_LABEL)


def test_load_refuses_splits_that_disagree(tmp_path):
    arrays = _layout()
    arrays["test_images"] = np.zeros((4, 6, 6), np.uint8)
    _refused(tmp_path, arrays, r"different image shapes \[\(5, 5, 1\), \(6, 6, 1\)\]")
    arrays = _layout()
    arrays["val_images"] = np.repeat(arrays["val_images"][..., None], 3, axis=3)
    _refused(tmp_path, arrays, "different image shapes")
    arrays = _layout(labels_of=lambda c: np.ones((c, 3)))
    arrays["val_labels"] = np.ones((3, 2), np.uint8)
    _refused(tmp_path, arrays, r"different numbers of labels \[2, 3\]", task=MULTI_LABEL)


def test_load_refuses_an_unknown_task(tmp_path):
    _refused(tmp_path, _layout(), "data.images.task 'regression' is not a MedMNIST task", task="regression")
    arrays = dict(_layout(), task=np.array("segmentation"))
    with pytest.raises(DataError, match="'segmentation' is not a MedMNIST task"):
        images.load(_write(tmp_path, arrays))


def test_a_split_of_one_image_is_enough(tmp_path):
    arrays = _layout(n=(6, 1, 1))
    data = images.load(_write(tmp_path, arrays), name="mine", task="multi-class")
    assert data.images["val"].shape == (1, 5, 5, 1) and data.labels["test"].shape == (1, 1)


# ---------------------------------------------------------------- files that are not what they claim (18.10-18.12)

def _user_arrays(n_classes=2, size=16):
    rng = np.random.default_rng(0)
    return {f"{s}_{k}": (rng.integers(0, 256, (6, size, size, 3), dtype=np.uint8) if k == "images"
                         else (np.arange(6) % n_classes).astype(np.uint8)[:, None])
            for s in images.SPLITS for k in ("images", "labels")}


def test_a_two_class_file_under_the_default_pathmnist_name_is_refused_not_made_9_way(tmp_path):
    np.savez(tmp_path / "mine.npz", **_user_arrays(2))
    with pytest.raises(DataError, match=r"the file has 2 classes but data.images.name is 'pathmnist', whose "
                                        r"medmnist table entry has 9; give your set its own name"):
        images.load(tmp_path / "mine.npz", name="pathmnist", task="multi-class", source="file")
    assert images.load(tmp_path / "mine.npz", name="mine", source="file").n_classes == 2


def test_an_object_array_npz_is_one_clear_message_and_never_unpickled(tmp_path):
    arrays = _user_arrays()
    arrays["train_labels"] = np.array([[1], "two", None] * 2, dtype=object)
    np.savez(tmp_path / "obj.npz", **arrays)
    with pytest.raises(DataError, match=r"train_images or train_labels is an object array .* never loaded"):
        images.load(tmp_path / "obj.npz", name="mine", source="file")


@pytest.mark.parametrize("kind", ["npy", "text", "cut"])
def test_a_file_that_is_not_an_npz_archive_says_so(tmp_path, kind):
    path = tmp_path / "mine.npz"
    if kind == "npy":
        np.save(tmp_path / "a.npy", np.zeros((3, 8, 8), np.uint8))
        (tmp_path / "a.npy").rename(path)
    elif kind == "text":
        path.write_text("train_images,train_labels\n1,2\n")
    else:
        np.savez(tmp_path / "full.npz", **_user_arrays())
        path.write_bytes((tmp_path / "full.npz").read_bytes()[:200])
    with pytest.raises(DataError, match=r"not an npz archive .*numpy.savez"):
        images.load(path, name="mine", source="file")


def test_images_below_the_minimum_size_name_it_and_the_models_needs(tmp_path):
    from types import SimpleNamespace

    from stages.download_images import copy_user_file

    np.savez(tmp_path / "tiny.npz", **_user_arrays(2, size=4))
    data = SimpleNamespace(path=str(tmp_path / "tiny.npz"), task="", name="mine", size=8)
    with pytest.raises(DataError, match=r"images are 4 px; the minimum is 8 px .*resnet18 needs 16 and densenet121 "
                                        r"needs 32 unless cnn.defaults.upsample_to"):
        copy_user_file(data, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


def test_images_of_exactly_the_minimum_size_are_taken():
    images.check_size(Path("mine.npz"), images.MIN_SIZE)   # the floor itself is allowed
    with pytest.raises(DataError, match=f"the minimum is {images.MIN_SIZE} px"):
        images.check_size(Path("mine.npz"), images.MIN_SIZE - 1)


def test_a_label_beyond_any_sensible_class_count_is_refused(tmp_path):
    arrays = _user_arrays()
    arrays["test_labels"] = np.array([[0], [1], [0], [1], [0], [123456]], np.int64)
    np.savez(tmp_path / "ids.npz", **arrays)
    with pytest.raises(DataError, match=r"test_labels has the value 123456; .* below 1000"):
        images.load(tmp_path / "ids.npz", name="mine", source="file")


def test_a_file_that_is_not_an_npz_archive_is_told_how_to_remake_it(tmp_path):
    # the whole remedy, word for word: how to save the layout, or how to get the set made again
    path = tmp_path / "mine.npz"
    path.write_text("train_images,train_labels\n1,2\n")
    with pytest.raises(DataError) as caught:
        images.load(path, name="mine", source="file")
    assert str(caught.value).endswith(
        "; save it with numpy.savez(path, train_images=..., train_labels=..., ...) "
        "(or delete it and re-run `dvc repro download_images`)")


def test_labels_up_to_999_are_taken_and_1000_is_the_first_refused(tmp_path):
    # MAX_CLASSES = 1000 is the most classes a set may have: labels 0..999, a 1000-way head
    arrays = _user_arrays()
    arrays["test_labels"] = np.array([[0], [1], [0], [1], [0], [999]], np.int64)
    np.savez(tmp_path / "top.npz", **arrays)
    assert images.load(tmp_path / "top.npz", name="mine", source="file").n_classes == images.MAX_CLASSES == 1000
    arrays["test_labels"][-1, 0] = 1000
    np.savez(tmp_path / "over.npz", **arrays)
    with pytest.raises(DataError, match=r"test_labels has the value 1000; .* below 1000"):
        images.load(tmp_path / "over.npz", name="mine", source="file")
