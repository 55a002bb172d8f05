"""ETT-format CSVs (date column + numeric columns): validation, the standard split, windows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError

TARGET = "OT"


def load_csv(path: Path) -> pd.DataFrame:
    """Read and validate an ETT CSV: a `date` column, then numeric columns ending with OT, no NaNs."""
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV ({error}). Delete it and re-run the download stage.") from None
    way_out = f"Delete {path} and re-run `dvc repro download_ett` (or point DATA_MIRROR at a good copy)."
    if frame.columns.empty or frame.columns[0] != "date" or TARGET not in frame.columns:
        raise DataError(f"{path}: expected a 'date' column first and an '{TARGET}' column, got "
                        f"columns {list(frame.columns)}. {way_out}")
    values = frame.drop(columns="date")
    non_numeric = [c for c in values.columns if not pd.api.types.is_numeric_dtype(values[c])]
    if non_numeric:
        raise DataError(f"{path}: columns {non_numeric} are not numeric. {way_out}")
    nan_columns = [c for c in values.columns if values[c].isna().any()]
    if nan_columns:
        rows = int(values[nan_columns].isna().any(axis=1).sum())
        raise DataError(f"{path}: {rows} rows have missing values in {nan_columns}. {way_out}")
    return frame


def split_borders(name: str, n_rows: int, input_len: int) -> dict[str, tuple[int, int]]:
    """The split every ETT paper uses: 12/4/4 months; val and test start L rows early so their
    first window's target begins right at the split boundary."""
    month = 30 * 24 * (4 if name.startswith("ETTm") else 1)
    train_end, val_end, test_end = 12 * month, 16 * month, 20 * month
    if n_rows < test_end:
        raise DataError(f"{name}: has {n_rows} rows, the standard split needs {test_end}. "
                        "Delete the file and re-run the download stage.")
    if input_len >= train_end - 4 * month:
        raise DataError(f"window length {input_len} is too long for the {name} split")
    return {"train": (0, train_end), "val": (train_end - input_len, val_end),
            "test": (val_end - input_len, test_end)}


@dataclass
class Splits:
    train: np.ndarray   # (T, C) standardised
    val: np.ndarray
    test: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    columns: list[str]


def standardised_splits(frame: pd.DataFrame, name: str, input_len: int, dtype=np.float64) -> Splits:
    """Split by the standard borders and standardise with the train rows' mean and std."""
    values = frame.drop(columns="date").to_numpy(dtype=np.float64)
    borders = split_borders(name, len(values), input_len)
    train_start, train_end = borders["train"]
    mean = values[train_start:train_end].mean(axis=0)
    std = values[train_start:train_end].std(axis=0)
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
