"""Matplotlib figures shared by stages and the report (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.outputs import atomic_path  # noqa: E402


def save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def forecast(history: np.ndarray, truth: np.ndarray, prediction: np.ndarray, title: str, path: Path) -> Path:
    """Input history, ground truth and prediction of one channel on one time axis."""
    fig, ax = plt.subplots(figsize=(8, 3))
    t_hist = np.arange(len(history))
    t_future = np.arange(len(history), len(history) + len(truth))
    ax.plot(t_hist, history, color="0.4", label="input history")
    ax.plot(t_future, truth, color="tab:blue", label="ground truth")
    ax.plot(t_future, prediction, color="tab:red", label="prediction")
    ax.axvline(len(history) - 0.5, color="0.7", linestyle="--", linewidth=0.8)
    ax.set(title=title, xlabel="time step (hours)", ylabel="OT (standardised)")
    ax.legend(loc="upper left", fontsize=8)
    return save(fig, path)


def smooth(values, factor: float = 0.6) -> np.ndarray:
    """Exponential moving average, as TensorBoard's smoothing slider (factor 0.6): pandas' ewm
    without bias correction, starting at the first value."""
    return pd.Series(values, dtype=float).ewm(alpha=1 - factor, adjust=False).mean().to_numpy()


def curves(series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str, path: Path,
           smoothing: float | None = None) -> Path:
    """Several named (x, y) series on one axis; with `smoothing`, raw faint and smoothed solid."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (name, (x, y)) in enumerate(series.items()):
        color = f"C{i}"
        if smoothing is not None:
            ax.plot(x, y, color=color, alpha=0.3, linewidth=1)
            ax.plot(x, smooth(y, smoothing), color=color, label=f"{name} (smoothed {smoothing})")
        else:
            ax.plot(x, y, color=color, label=name, marker="o" if len(x) < 30 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def confusion(matrix: np.ndarray, title: str, path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                color="white" if value > matrix.max() / 2 else "black")
    ax.set(title=title, xlabel="predicted class", ylabel="actual class",
           xticks=range(len(matrix)), yticks=range(len(matrix)))
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save(fig, Path(path))


def per_label(rows: list[dict], title: str, path) -> Path:
    """Multi-label sets: each label's test AUC and its share of positive images."""
    labels = [r["label"] for r in rows]
    auc = [np.nan if r["auc"] is None else r["auc"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(rows)), 3.8))
    ax.bar(labels, auc, color="tab:blue", label="AUC")
    ax.plot(labels, [r["positives"] / max(1, r["positives_of"]) for r in rows], "o", color="tab:orange",
            label="share of positives")
    ax.set(title=title, xlabel="label", ylim=(0, 1), xticks=labels)
    ax.legend(fontsize=8)
    return save(fig, Path(path))


def panels(images: list[tuple[str, np.ndarray]], title: str, path: Path) -> Path:
    """A row of images, each with its own title (the first may be RGB)."""
    fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3.3))
    for ax, (name, image) in zip(axes, images):
        ax.imshow(image, cmap=None if image.ndim == 3 else "viridis")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title)
    return save(fig, path)
