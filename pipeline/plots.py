"""Figures and tables a competitor looks at after a fold: confusion matrices and learning curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from pipeline.utils import atomic_path, write_csv_atomic  # noqa: E402


def confusion_frames(targets, predictions, classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(counts, row-normalised) with true classes as rows and predicted classes as columns."""
    counts = confusion_matrix(targets, predictions, labels=np.arange(len(classes)))
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    index = pd.Index(classes, name="true")
    columns = pd.Index(classes, name="predicted")
    return (pd.DataFrame(counts, index=index, columns=columns),
            pd.DataFrame(normalised.round(4), index=index, columns=columns))


def write_confusion(targets, predictions, classes: list[str], csv_path: Path,
                    png_path: Path) -> None:
    """The confusion matrix as CSV (counts, then the row-normalised shares with a `_share`
    suffix) and as a picture of both."""
    counts, normalised = confusion_frames(targets, predictions, classes)
    table = pd.concat([counts, normalised.add_suffix("_share")], axis=1)
    write_csv_atomic(table, csv_path, index=True)

    size = max(4.0, 0.45 * len(classes) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    for ax, frame, title, fmt in ((axes[0], counts, "counts", "d"),
                                  (axes[1], normalised, "row-normalised (recall)", ".2f")):
        ax.imshow(frame.to_numpy(), cmap="Blues", vmin=0)
        ax.set_xticks(range(len(classes)), classes, rotation=45 if len(classes) > 6 else 0)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        peak = frame.to_numpy().max() or 1
        for (i, j), value in np.ndenumerate(frame.to_numpy()):
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=8,
                    color="white" if value > 0.6 * peak else "black")
    fig.tight_layout()
    save(fig, png_path)


def write_curves(log: pd.DataFrame, metric: str, path: Path) -> None:
    """Loss (train and validation), the competition metric and the learning rate per epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(log["epoch"], log["train_loss"], label="train")
    if "valid_loss" in log:
        axes[0].plot(log["epoch"], log["valid_loss"], label="valid")
    axes[0].set_title("loss")
    axes[0].legend()
    if metric in log:
        axes[1].plot(log["epoch"], log[metric], color="tab:green")
    axes[1].set_title(f"validation {metric}")
    axes[2].plot(log["epoch"], log["lr"], color="tab:gray")
    axes[2].set_title("learning rate (head)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path)


def save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def figure(figsize: tuple[float, float]):
    """(figure, axes) of one plot, drawn off-screen."""
    return plt.subplots(figsize=figsize)
