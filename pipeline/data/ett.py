"""Forecasting CSVs (a `date` column plus numeric columns): validation, splits, windows.

ETT files (names ETTh*, ETTm*) use the split every ETT paper uses (12/4/4 months); any other CSV
uses the 70/10/20 chronological split that forecasting libraries use for custom data
(Time-Series-Library's Dataset_Custom: train int(0.7 n), test int(0.2 n), validation the rest).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.fetch import file_digest
from pipeline.errors import DataError

TARGET = "OT"   # the default target column (params: data.ett.target)


def is_ett(name: str) -> bool:
    return name.startswith(("ETTh", "ETTm"))


def load_csv(path: Path, target: str = TARGET) -> pd.DataFrame:
    """Read and validate a forecasting CSV: a `date` column first, numeric columns including the
    target, no NaNs."""
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV ({error}). Delete it and re-run the download stage.") from None
    way_out = f"Delete {path} and re-run `dvc repro download_ett` (or point DATA_MIRROR at a good copy)."
    if frame.columns.empty or frame.columns[0] != "date":
        raise DataError(f"{path}: expected a 'date' column first, got columns {list(frame.columns)}. {way_out}")
    if target not in frame.columns[1:]:
        raise DataError(f"{path}: no '{target}' column (the target, data.ett.target); the columns are "
                        f"{list(frame.columns[1:])}. Set data.ett.target to one of them.")
    values = frame.drop(columns="date")
    non_numeric = [c for c in values.columns if not pd.api.types.is_numeric_dtype(values[c])]
    if non_numeric:
        raise DataError(f"{path}: columns {non_numeric} are not numeric. {way_out}")
    nan_columns = [c for c in values.columns if values[c].isna().any()]
    if nan_columns:
        rows = int(values[nan_columns].isna().any(axis=1).sum())
        raise DataError(f"{path}: {rows} rows have missing values in {nan_columns}. {way_out}")
    infinite = np.isinf(values.to_numpy(dtype=np.float64))   # "inf" parses as a float: bad data, not divergence
    if infinite.any():
        row, col = (int(i) for i in np.argwhere(infinite)[0])
        raise DataError(f"{path}: {int(infinite.any(axis=1).sum())} rows hold an infinite value (first: column "
                        f"{values.columns[col]!r}, data row {row + 1}, date {frame['date'].iloc[row]}). {way_out}")
    return frame


def check_pin(path: Path, name: str, pins: dict[str, str]) -> tuple[str, bool]:
    """The file's sha256 and whether it is pinned; refuses a file that differs from its pin, so no
    run trains on edited data while recording `data_pinned: true`."""
    sha256, pin = file_digest(path), pins.get(name, "")
    if pin and sha256 != pin:
        raise DataError(f"{path} has sha256 {sha256}, but its pin data.ett.pins.{name} is {pin} (the file was "
                        f"edited or replaced). Ways out: delete {path} and re-run `dvc repro download_ett`; or, "
                        f"if the file is meant to differ, set data.ett.pins.{name} to its sha256 or remove the pin.")
    return sha256, bool(pin)


def split_borders(name: str, n_rows: int, input_len: int, pred_len: int = 0) -> dict[str, tuple[int, int]]:
    """Row ranges [start, end) of train / val / test. Val and test start `input_len` rows early so
    their first window's target begins right at the split boundary. Every split must hold at least
    one window of input_len + pred_len rows."""
    if is_ett(name):
        # The split every ETT paper uses: 12/4/4 months of hourly (ETTh) or 15-minute (ETTm) rows.
        month = 30 * 24 * (4 if name.startswith("ETTm") else 1)
        train_end, val_end, test_end = 12 * month, 16 * month, 20 * month
        if n_rows < test_end:
            raise DataError(f"{name}: has {n_rows} rows, the standard split needs {test_end}. "
                            "Delete the file and re-run the download stage.")
        rule = "the 12/4/4-month ETT split"
    else:
        n_train, n_test = int(n_rows * 0.7), int(n_rows * 0.2)
        train_end, val_end, test_end = n_train, n_rows - n_test, n_rows
        rule = "the 70/10/20 split"
    borders = {"train": (0, train_end), "val": (train_end - input_len, val_end),
               "test": (val_end - input_len, test_end)}
    need = input_len + max(pred_len, 1)
    for split, (start, end) in borders.items():
        if end - start < need:   # train is checked first, so val/test never start below row 0
            raise DataError(f"{name}: {n_rows} rows are too short for {rule} with input_len={input_len}, "
                            f"pred_len={pred_len}: the {split} part would have {end - start} rows, a window needs "
                            f"{need}. Use a longer series or smaller mlp.input_len / mlp.pred_len.")
    return borders


@dataclass
class Splits:
    train: np.ndarray   # (T, C) standardised
    val: np.ndarray
    test: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    columns: list[str]


def standardised_splits(frame: pd.DataFrame, name: str, input_len: int, dtype=np.float64,
                        pred_len: int = 0) -> Splits:
    """Split by the borders above and standardise with the train rows' mean and std only."""
    values = frame.drop(columns="date").to_numpy(dtype=np.float64)
    borders = split_borders(name, len(values), input_len, pred_len)
    train_start, train_end = borders["train"]
    mean = values[train_start:train_end].mean(axis=0)
    std = values[train_start:train_end].std(axis=0)
    constant = [c for c, s in zip(frame.columns[1:], std) if s == 0]
    if constant:
        raise DataError(f"{name}: columns {constant} are constant over the train rows (std 0); "
                        "drop them from the CSV.")
    scaled = ((values - mean) / std).astype(dtype)
    parts = {split: scaled[a:b] for split, (a, b) in borders.items()}
    return Splits(**parts, mean=mean, std=std, columns=list(frame.columns[1:]))


def windows(series: np.ndarray, input_len: int, pred_len: int) -> tuple[np.ndarray, np.ndarray]:
    """All stride-1 windows of a (T, C) series: inputs (N, C, L) and targets (N, C, P), N = T-L-P+1."""
    n = len(series) - input_len - pred_len + 1
    if n < 1:
        raise DataError(f"series of {len(series)} steps is too short for L={input_len}, P={pred_len}")
    view = np.lib.stride_tricks.sliding_window_view(series, input_len + pred_len, axis=0)  # (N, C, L+P)
    x = np.ascontiguousarray(view[:n, :, :input_len])
    y = np.ascontiguousarray(view[:n, :, input_len:])
    return x, y


def direction_labels(series: np.ndarray, target: int, window: int, horizon: int, threshold: float,
                     classes: int, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Part 1's classification task: windows (N, L, D) labelled by where the target column goes next.

    delta = (mean of the target over the `horizon` steps after the window - its last value in the
    window) / the target's standard deviation within the window. Scaling by the window's own
    volatility keeps the classes balanced on every split (ETTh1's test period is much calmer than
    its train period). K=3: down (delta < -threshold), flat, up (delta > threshold); K=2: down/up.
    """
    starts = np.arange(0, len(series) - window - horizon + 1, stride)
    if len(starts) == 0:
        raise DataError(f"series of {len(series)} steps is too short for window {window} + horizon {horizon}")
    view = np.lib.stride_tricks.sliding_window_view(series, window, axis=0)   # (T-L+1, D, L)
    x = np.ascontiguousarray(view[starts].transpose(0, 2, 1))                 # (N, L, D)
    csum = np.concatenate([[0.0], np.cumsum(series[:, target], dtype=np.float64)])
    future_mean = (csum[starts + window + horizon] - csum[starts + window]) / horizon
    window_std = x[:, :, target].std(axis=1)
    delta = (future_mean - series[starts + window - 1, target]) / np.maximum(window_std, 1e-6)
    if classes == 2:
        labels = (delta >= 0).astype(np.int64)
    else:
        labels = np.where(delta < -threshold, 0, np.where(delta > threshold, 2, 1)).astype(np.int64)
    return x, labels
