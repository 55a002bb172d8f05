"""Claims about the ETT data: where each split starts and ends, standardisation from train rows
only, the windows and their count. Small synthetic frames, no files except a tmp CSV."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.data import ett
from pipeline.errors import DataError

HOUR_MONTH = 30 * 24          # ETTh rows per "month" of the standard split
MINUTE_MONTH = 4 * HOUR_MONTH  # ETTm: 15-minute rows


def _frame(n_rows: int, n_cols: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    data = {"date": pd.date_range("2016-07-01", periods=n_rows, freq="h").astype(str)}
    for i in range(n_cols - 1):
        data[f"c{i}"] = rng.normal(i, 1 + i, n_rows)
    data["OT"] = rng.normal(5, 3, n_rows)
    return pd.DataFrame(data)


@pytest.mark.parametrize("name", ["ETTh1", "ETTh2"])
def test_hourly_borders_are_12_4_4_months_with_val_and_test_starting_input_len_early(name):
    borders = ett.split_borders(name, 17420, 96)
    assert borders == {"train": (0, 8640), "val": (8640 - 96, 11520), "test": (11520 - 96, 14400)}
    assert borders["train"][1] == 12 * HOUR_MONTH and borders["test"][1] == 20 * HOUR_MONTH


@pytest.mark.parametrize("name", ["ETTm1", "ETTm2"])
def test_minute_borders_are_four_times_the_hourly_ones(name):
    borders = ett.split_borders(name, 69680, 96)
    assert borders == {"train": (0, 34560), "val": (34560 - 96, 46080), "test": (46080 - 96, 57600)}
    assert borders["val"][1] == 16 * MINUTE_MONTH


def test_input_len_shifts_only_the_val_and_test_starts():
    a, b = ett.split_borders("ETTh1", 14400, 1), ett.split_borders("ETTh1", 14400, 300)
    assert a["train"] == b["train"] == (0, 8640)
    assert a["val"] == (8639, 11520) and b["val"] == (8340, 11520)
    assert a["test"] == (11519, 14400) and b["test"] == (11220, 14400)


def test_a_file_with_exactly_twenty_months_is_enough_and_one_row_less_is_refused():
    assert ett.split_borders("ETTh1", 14400, 96)["test"] == (11424, 14400)
    with pytest.raises(DataError, match="14399 rows, the standard split needs 14400"):
        ett.split_borders("ETTh1", 14399, 96)
    with pytest.raises(DataError, match="57599 rows, the standard split needs 57600"):
        ett.split_borders("ETTm1", 57599, 96)


def test_a_window_must_fit_in_every_split():
    assert ett.split_borders("ETTh1", 14400, 12 * HOUR_MONTH - 1)["val"] == (1, 11520)
    with pytest.raises(DataError, match="the train part would have 8640 rows, a window needs 8641"):
        ett.split_borders("ETTh1", 14400, 12 * HOUR_MONTH)
    with pytest.raises(DataError, match="the val part would have 2976 rows, a window needs 2977"):
        ett.split_borders("ETTh1", 14400, 96, pred_len=2881)


def test_standardisation_uses_the_train_rows_only():
    frame = _frame(14400 + 50)
    values = frame.drop(columns="date").to_numpy(np.float64)
    splits = ett.standardised_splits(frame, "ETTh1", 96)
    assert np.allclose(splits.mean, values[:8640].mean(axis=0), rtol=1e-12)
    assert np.allclose(splits.std, values[:8640].std(axis=0), rtol=1e-12)   # population std (ddof 0)
    # Changing any row after the train split changes no statistic.
    changed = frame.copy()
    changed.loc[8640:, "OT"] += 1000.0
    changed.loc[8640:, "c0"] *= -7.0
    again = ett.standardised_splits(changed, "ETTh1", 96)
    assert np.array_equal(again.mean, splits.mean) and np.array_equal(again.std, splits.std)
    assert np.array_equal(again.train, splits.train)


def test_each_split_holds_exactly_its_rows_scaled():
    frame = _frame(14400 + 50)
    values = frame.drop(columns="date").to_numpy(np.float64)
    splits = ett.standardised_splits(frame, "ETTh1", 24)
    scaled = (values - splits.mean) / splits.std
    assert splits.train.shape == (8640, 3) and np.allclose(splits.train, scaled[0:8640])
    assert splits.val.shape == (11520 - 8616, 3) and np.allclose(splits.val, scaled[8616:11520])
    assert splits.test.shape == (14400 - 11496, 3) and np.allclose(splits.test, scaled[11496:14400])
    assert np.allclose(splits.train.mean(axis=0), 0, atol=1e-9) and np.allclose(splits.train.std(axis=0), 1)
    assert splits.columns == ["c0", "c1", "OT"]
    assert splits.train.dtype == np.float64
    assert ett.standardised_splits(frame, "ETTh1", 24, dtype=np.float32).test.dtype == np.float32


def test_windows_are_every_stride_one_window_with_its_following_targets():
    series = np.arange(2 * 20, dtype=np.float64).reshape(20, 2)   # (T, C)
    x, y = ett.windows(series, 5, 3)
    assert x.shape == (20 - 5 - 3 + 1, 2, 5) and y.shape == (13, 2, 3)
    for i in range(13):
        assert np.array_equal(x[i], series[i:i + 5].T)
        assert np.array_equal(y[i], series[i + 5:i + 8].T)
    assert x.flags["C_CONTIGUOUS"] and y.flags["C_CONTIGUOUS"]


def test_window_count_on_the_standard_test_split():
    splits = ett.standardised_splits(_frame(14400, n_cols=7), "ETTh1", 96)
    x, y = ett.windows(splits.test, 96, 192)
    # test split = 2880 + 96 rows -> 2976 - 96 - 192 + 1 windows; first target is the first test-period row.
    assert x.shape == (2689, 7, 96) and y.shape == (2689, 7, 192)
    assert np.array_equal(y[0, :, 0], splits.test[96])


def test_a_series_with_exactly_one_window_works_and_shorter_is_refused():
    x, y = ett.windows(np.zeros((8, 1)), 5, 3)
    assert x.shape == (1, 1, 5) and y.shape == (1, 1, 3)
    with pytest.raises(DataError, match="series of 7 steps is too short for L=5, P=3"):
        ett.windows(np.zeros((7, 1)), 5, 3)


def test_load_csv_accepts_a_good_file_and_refuses_bad_ones(tmp_path):
    good = _frame(30)
    good.to_csv(tmp_path / "good.csv", index=False)
    loaded = ett.load_csv(tmp_path / "good.csv")
    assert list(loaded.columns) == ["date", "c0", "c1", "OT"] and len(loaded) == 30
    cases = {
        "nodate": (good.rename(columns={"date": "time"}), "expected a 'date' column first.*Delete .*nodate.csv and "
                   r"re-run `dvc repro download_ett` \(or point DATA_MIRROR at a good copy\)\."),
        "noot": (good.rename(columns={"OT": "target"}), "no 'OT' column \\(the target, data.ett.target\\)"),
        "text": (good.assign(c0="x"), r"columns \['c0'\] are not numeric"),
        "nan": (good.assign(c1=[np.nan] * 2 + [1.0] * 28), r"2 rows have missing values in \['c1'\]"),
    }
    for name, (frame, message) in cases.items():
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        with pytest.raises(DataError, match=message):
            ett.load_csv(tmp_path / f"{name}.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="not a readable CSV"):
        ett.load_csv(tmp_path / "empty.csv")


def test_an_infinite_value_is_refused_naming_the_first_column_row_and_date(tmp_path):
    frame = _frame(30).astype({"c1": object, "OT": object})
    frame.loc[9, "OT"] = "-inf"     # row 9 holds two; the first by row, then by column, is named
    frame.loc[9, "c1"] = "inf"
    frame.loc[20, "OT"] = "inf"
    frame.to_csv(tmp_path / "inf.csv", index=False)
    with pytest.raises(DataError, match=r"2 rows hold an infinite value \(first: column 'c1', data row 10, "
                                        r"date 2016-07-01 09:00:00\)"):
        ett.load_csv(tmp_path / "inf.csv")


def test_a_true_false_column_beside_float_columns_loads(tmp_path):
    """A holiday flag is a numeric covariate (pandas reads it as bool); the infinity check must not
    choke on the mixed frame."""
    _frame(30).assign(holiday=[True, False] * 15).to_csv(tmp_path / "flags.csv", index=False)
    assert ett.load_csv(tmp_path / "flags.csv")["holiday"].dtype == bool


def _direction_reference(series, target, window, horizon, threshold, classes, stride):
    xs, labels = [], []
    for s in range(0, len(series) - window - horizon + 1, stride):
        w = series[s:s + window]
        delta = (series[s + window:s + window + horizon, target].mean() - w[-1, target]) / max(w[:, target].std(), 1e-6)
        xs.append(w)
        if classes == 2:
            labels.append(int(delta >= 0))
        else:
            labels.append(0 if delta < -threshold else 2 if delta > threshold else 1)
    return np.array(xs), np.array(labels)


@pytest.mark.parametrize("classes,stride", [(3, 1), (3, 4), (2, 3)])
def test_direction_labels_follow_their_formula(classes, stride):
    series = np.random.default_rng(1).normal(size=(80, 3)).cumsum(axis=0)
    x, labels = ett.direction_labels(series, 2, 6, 4, 0.5, classes, stride)
    ref_x, ref_labels = _direction_reference(series, 2, 6, 4, 0.5, classes, stride)
    assert x.shape == ref_x.shape and np.allclose(x, ref_x)
    assert labels.dtype == np.int64 and np.array_equal(labels, ref_labels)
    assert len(set(labels.tolist())) == classes


def test_direction_labels_refuse_a_too_short_series():
    assert len(ett.direction_labels(np.zeros((10, 2)), 0, 6, 4, 0.5, 3)[1]) == 1
    with pytest.raises(DataError, match="too short for window 6 \\+ horizon 4"):
        ett.direction_labels(np.zeros((9, 2)), 0, 6, 4, 0.5, 3)


def test_direction_labels_boundaries_and_default_stride():
    flat = np.ones((20, 2))
    # delta exactly 0: "up" for K=2 (delta >= 0), "flat" for K=3 even with a zero-width band.
    assert set(ett.direction_labels(flat, 0, 6, 4, 0.0, 2)[1].tolist()) == {1}
    assert set(ett.direction_labels(flat, 0, 6, 4, 0.0, 3)[1].tolist()) == {1}
    series = np.random.default_rng(2).normal(size=(40, 2))
    default = ett.direction_labels(series, 1, 6, 4, 0.5, 3)
    one = ett.direction_labels(series, 1, 6, 4, 0.5, 3, stride=1)
    assert len(default[1]) == 40 - 6 - 4 + 1 and np.array_equal(default[1], one[1])


# ---------------------------------------------------------------- any other CSV: 70/10/20

@pytest.mark.parametrize("n_rows, train_end, val_end", [(1000, 700, 800), (1003, 702, 803), (99, 69, 80)])
def test_a_custom_csv_splits_70_10_20_in_time_order(n_rows, train_end, val_end):
    # Time-Series-Library's Dataset_Custom: train int(0.7 n), test int(0.2 n), validation the rest.
    assert train_end == int(n_rows * 0.7) and n_rows - val_end == int(n_rows * 0.2)
    borders = ett.split_borders("weather", n_rows, 5)
    assert borders == {"train": (0, train_end), "val": (train_end - 5, val_end), "test": (val_end - 5, n_rows)}
    # The ETT rule applies to ETTh*/ETTm* names only.
    assert ett.split_borders("my_ETTh1", n_rows, 5) == borders


def test_a_custom_csv_split_too_short_for_a_window_is_refused_naming_the_rule():
    ett.split_borders("weather", 100, 5, pred_len=5)   # val: rows 65..80, 15 rows >= 10
    with pytest.raises(DataError, match=r"100 rows are too short for the 70/10/20 split with input_len=5, "
                                        r"pred_len=11: the val part would have 15 rows, a window needs 16"):
        ett.split_borders("weather", 100, 5, pred_len=11)
    with pytest.raises(DataError, match=r"too short for the 12/4/4-month ETT split with input_len=8640, pred_len=0"):
        ett.split_borders("ETTh1", 14400, 8640)   # pred_len defaults to 0 (a window still needs one target row)


def test_standardised_splits_pass_pred_len_to_the_borders():
    frame = _frame(100)
    assert len(ett.standardised_splits(frame, "weather", 5, pred_len=5).val) == 15
    with pytest.raises(DataError, match="pred_len=11: the val part would have 15 rows"):
        ett.standardised_splits(frame, "weather", 5, pred_len=11)
    # pred_len defaults to 0 here too: 3 rows -> train 2, val 1, test 0 rows (+ input_len 1 each)
    with pytest.raises(DataError, match="input_len=1, pred_len=0: the test part would have 1 rows, a window needs 2"):
        ett.standardised_splits(_frame(3), "weather", 1)


def test_a_custom_csv_is_standardised_by_its_own_train_rows():
    frame = _frame(200)
    values = frame.drop(columns="date").to_numpy(np.float64)
    splits = ett.standardised_splits(frame, "weather", 10)
    assert np.allclose(splits.mean, values[:140].mean(axis=0)) and np.allclose(splits.std, values[:140].std(axis=0))
    assert np.allclose(splits.val, (values[130:160] - splits.mean) / splits.std)
    assert np.allclose(splits.test, (values[150:200] - splits.mean) / splits.std)


def test_statistics_are_computed_in_float64_whatever_the_columns_dtype():
    n = 14400
    frame = _frame(n)
    frame["c0"] = 1e4 + np.random.default_rng(3).normal(0, 1e-2, n)
    frame = frame.astype({c: np.float32 for c in ("c0", "c1", "OT")})   # every column float32
    values = frame.drop(columns="date").to_numpy(np.float64)
    splits = ett.standardised_splits(frame, "ETTh1", 96)
    assert np.allclose(splits.mean, values[:8640].mean(axis=0), rtol=1e-13, atol=0)
    assert np.allclose(splits.std, values[:8640].std(axis=0), rtol=1e-9, atol=0)
    assert splits.mean.dtype == np.float64


@pytest.mark.parametrize("column", ["c0", "c1", "OT"])
def test_a_column_constant_over_the_train_rows_is_refused_by_name(column):
    frame = _frame(14400)
    frame.loc[:8639, column] = 2.5   # constant in train, varying later
    with pytest.raises(DataError, match=rf"ETTh1: columns \['{column}'\] are constant over the train rows"):
        ett.standardised_splits(frame, "ETTh1", 96)


def test_a_column_with_unit_std_is_not_constant():
    frame = _frame(100)
    frame["c1"] = np.tile([0.0, 2.0], 50)   # std exactly 1 over any even number of rows
    splits = ett.standardised_splits(frame, "weather", 5)
    assert splits.std[1] == 1.0


def test_the_target_may_be_the_first_column_after_the_date(tmp_path):
    _frame(20)[["date", "OT", "c0", "c1"]].to_csv(tmp_path / "first.csv", index=False)
    assert list(ett.load_csv(tmp_path / "first.csv").columns) == ["date", "OT", "c0", "c1"]


def test_direction_labels_accumulate_in_float64_for_a_float32_series():
    rng = np.random.default_rng(4)
    series64 = 1e4 + rng.normal(0, 0.05, size=(400, 2)).cumsum(axis=0) * 0.1
    series = series64.astype(np.float32)   # large level, small moves: a float32 running sum would lose them
    x, labels = ett.direction_labels(series, 1, 8, 4, 0.5, 3)
    _, ref = _direction_reference(series.astype(np.float64), 1, 8, 4, 0.5, 3, 1)
    assert x.dtype == np.float32 and np.mean(labels == ref) > 0.97
