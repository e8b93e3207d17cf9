"""Figures and tables a competitor looks at after a fold: confusion matrices and learning curves.

Every text on them (class names, experiment names, image ids, captions) is drawn as plain text
(`plain_text`): a class named `$10_to_$20` (a price bin) is no mathtext formula, and would
otherwise fail to parse mid-training.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.base.utils import atomic_path, write_csv_atomic
from pipeline.data.images import read_image

# Labels are the competition's words, never formulas: no mathtext ('$...$') and no LaTeX; every
# drawer below creates its texts (and saves) under these settings.
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def pyplot():
    """matplotlib's pyplot, imported when a figure is drawn (~1 s): `make runs` and `make
    report` with nothing changed draw nothing and never load it."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    return plt


def matplotlib_ticker():
    """matplotlib.ticker, imported with pyplot (see pyplot)."""
    pyplot()
    import matplotlib.ticker

    return matplotlib.ticker


def plain_text(draw):
    """Run a drawer (its texts and its save) under PLAIN_TEXT."""
    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(PLAIN_TEXT):
            return draw(*args, **kwargs)
    return drawn

LABELLED_CLASSES = 30  # confusion matrices above this many classes are drawn without numbers


def confusion_frames(targets, predictions, classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(counts, row-normalised) with true classes as rows and predicted classes as columns."""
    from sklearn.metrics import confusion_matrix  # when drawn: `make runs` need not load it

    counts = confusion_matrix(targets, predictions, labels=np.arange(len(classes)))
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    index = pd.Index(classes, name="true")
    columns = pd.Index(classes, name="predicted")
    return (pd.DataFrame(counts, index=index, columns=columns),
            pd.DataFrame(normalised.round(4), index=index, columns=columns))


def write_confusion(targets, predictions, classes: list[str], csv_path: Path,
                    *, png_path: Path) -> None:
    """The confusion matrix as CSV (counts, then the row-normalised shares with a `_share`
    suffix) and as a picture of both."""
    counts, normalised = confusion_frames(targets, predictions, classes)
    table = pd.concat([counts, normalised.add_suffix("_share")], axis=1)
    write_csv_atomic(table, csv_path, index=True)
    plot_confusion(counts, normalised, png_path)


@plain_text
def plot_confusion(counts: pd.DataFrame, normalised: pd.DataFrame, png_path: Path) -> None:
    """Both matrices side by side: counts, and shares of each true class (its recall)."""
    classes = list(counts.index)
    # past LABELLED_CLASSES the cells and ticks would be unreadable (and the figure too large to
    # draw): the matrices alone, at a capped size
    labelled = len(classes) <= LABELLED_CLASSES
    size = min(max(4.0, 0.45 * len(classes) + 2), 16.0)
    fig, axes = pyplot().subplots(1, 2, figsize=(2 * size + 1, size))
    for ax, frame, title, fmt in ((axes[0], counts, "counts", "d"),
                                  (axes[1], normalised, "row-normalised (recall)", ".2f")):
        ax.imshow(frame.to_numpy(), cmap="Blues", vmin=0)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        if not labelled:
            continue
        ax.set_xticks(range(len(classes)), classes, rotation=45 if len(classes) > 6 else 0)
        ax.set_yticks(range(len(classes)), classes)
        peak = frame.to_numpy().max() or 1
        for (i, j), value in np.ndenumerate(frame.to_numpy()):
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=8,
                    color="white" if value > 0.6 * peak else "black")
    fig.tight_layout()
    save(fig, png_path)


@plain_text
def write_curves(log: pd.DataFrame, metric: str, path: Path) -> None:
    """Loss (train and validation), the competition metric and the learning rate per epoch."""
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.6))
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


@plain_text
def write_lr_sweep(sweep: pd.DataFrame, suggested: float, current: float, path: Path) -> None:
    """The learning-rate finder's curve: each step's loss (faint) and its smoothed average over
    a logarithmic learning rate, the suggestion and the experiment's train.lr marked."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    ax.plot(sweep["lr"], sweep["loss"], color="tab:blue", alpha=0.25, lw=1, label="loss")
    ax.plot(sweep["lr"], sweep["smoothed"], color="tab:blue", lw=2, label="smoothed")
    ax.axvline(suggested, color="tab:green", ls="--", label=f"suggested {suggested:.2g}")
    ax.axvline(current, color="tab:gray", ls=":", label=f"train.lr now {current:.2g}")
    ax.set_xscale("log")
    ticker = matplotlib_ticker()  # plain numbers: the log axis's own labels are TeX
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    low, high = sweep["smoothed"].min(), sweep["smoothed"].iloc[: max(len(sweep) // 10, 1)].max()
    if high > low:  # the fall, not the blow-up at its end
        ax.set_ylim(low - 0.1 * (high - low), high + 0.5 * (high - low))
    ax.set_xlabel("learning rate (train.lr)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save(fig, path)


@plain_text
def write_fold_curves(logs: dict[str, pd.DataFrame], metric: str, path: Path) -> None:
    """Every fold's learning curves on one figure, a colour per fold: training (dashed) and
    validation loss, the validation metric, the learning rate."""
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.4))
    for (fold, log), colour in zip(logs.items(), pyplot().cm.tab10.colors * 10):
        axes[0].plot(log["epoch"], log["train_loss"], ls="--", lw=1, color=colour)
        if "valid_loss" in log:
            axes[0].plot(log["epoch"], log["valid_loss"], lw=1.5, color=colour, label=fold)
        if metric in log:
            axes[1].plot(log["epoch"], log[metric], lw=1.5, color=colour, label=fold)
        axes[2].plot(log["epoch"], log["lr"], lw=1, color=colour)
    titles = ("loss (dashed: training)", f"validation {metric}", "learning rate")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.25)
        ax.spines[["top", "right"]].set_visible(False)
    axes[1].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    save(fig, path)


def shrunk(image: np.ndarray, side: int) -> np.ndarray:
    """An RGB image with its longer side at most `side` pixels (never enlarged)."""
    scale = side / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def fitted(image: np.ndarray, side: int) -> np.ndarray:
    """An RGB image with its longer side at `side` pixels: a small one enlarged with its pixels
    kept sharp (a 24 px image is drawn as its pixels, not a blur)."""
    if max(image.shape[:2]) >= side:
        return shrunk(image, side)
    scale = side / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_NEAREST)


def write_thumbnail(image: np.ndarray, dest: Path, side: int) -> None:
    """A JPEG of an RGB image with its longer side at most `side` pixels (never enlarged)."""
    image = shrunk(image, side)
    with atomic_path(dest) as tmp:
        _, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                  [cv2.IMWRITE_JPEG_QUALITY, 85])
        Path(tmp).write_bytes(encoded.tobytes())


def save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    pyplot().close(fig)


def figure(figsize: tuple[float, float]):
    """(figure, axes) of one plot, drawn off-screen."""
    return pyplot().subplots(figsize=figsize)


# A picture of images holds at most this many rows and images per row, each image shrunk to
# at most PANEL_PIXELS on its longer side: its size and memory do not grow with the data.
MAX_ROWS, MAX_ROW_IMAGES, PANEL_PIXELS = 64, 12, 160


@plain_text
def write_image_rows(rows: list[list[tuple[Path, str]]], path: Path, title: str,
                     cell: float = 1.3, *, row_titles: list[str] | None = None) -> None:
    """A picture of images in rows (a duplicate group, a row of suspects), each with its
    caption: `rows` of (image file, caption), and each row's title left of it. Read with the
    pipeline's reader (the pixel budget applies); an empty list draws a note. The callers
    choose what to show (and say what they left out); past MAX_ROWS rows or MAX_ROW_IMAGES
    images in a row the rest is cut here too, and the title says so."""
    if len(rows) > MAX_ROWS:
        title += f" (the first {MAX_ROWS} rows of {len(rows)})"
        rows, row_titles = rows[:MAX_ROWS], row_titles and row_titles[:MAX_ROWS]
    rows = [row[:MAX_ROW_IMAGES] for row in rows]
    width, height = max((len(r) for r in rows), default=1), max(len(rows), 1)
    # one image of all the panels, drawn once: a subplot per image took 5 s for 24 rows of 4
    side, band = PANEL_PIXELS, PANEL_PIXELS // 4  # a panel, and the caption's band above it
    mosaic = np.full((height * (side + band), width * side, 3), 255, np.uint8)
    captions = []
    for i, row in enumerate(rows):
        for j, (image_path, caption) in enumerate(row):
            image = fitted(read_image(image_path, min_side=side), side - 8)  # a gap
            top, left = i * (side + band) + band, j * side
            top, left = top + (side - image.shape[0]) // 2, left + (side - image.shape[1]) // 2
            mosaic[top:top + image.shape[0], left:left + image.shape[1]] = image
            captions.append(((j + 0.5) * side, i * (side + band) + band * 0.9, caption))
    margin, heading = 0.6, 0.4  # inches: the row titles left, the title on top
    fig = pyplot().figure(figsize=(cell * width + margin, cell * 1.25 * height + heading))
    ax = fig.add_axes((margin / fig.get_figwidth(), 0, 1 - margin / fig.get_figwidth(),
                       1 - heading / fig.get_figheight()))
    ax.imshow(mosaic, interpolation="antialiased", aspect="auto")
    ax.set_axis_off()
    for x, y, caption in captions:
        ax.text(x, y, caption, fontsize=6, ha="center", va="bottom")
    for i, row_title in enumerate(row_titles or []):
        ax.text(-8, i * (side + band) + band + side / 2, row_title, fontsize=6, ha="right",
                va="center")
    if not rows:
        ax.text(width * side / 2, (side + band) / 2, "none found", ha="center", va="center")
    fig.suptitle(title, fontsize=8, y=1 - 0.15 / fig.get_figheight(), va="top")
    save(fig, path)


@plain_text
def plot_leaderboard(frame: pd.DataFrame, metric: str, path: Path) -> None:
    fig, ax = figure(figsize=(7, 0.45 * frame["oof"].notna().sum() + 1.2))
    shown = frame.dropna(subset=["oof"]).iloc[::-1]
    ax.barh(shown["experiment"], shown["cv mean"], xerr=shown["cv std"], color="#9ecae1",
            label="fold mean ± std")
    ax.scatter(shown["oof"], shown["experiment"], color="#08519c", zorder=3, label="out of fold")
    values = shown[["cv mean", "oof"]].to_numpy()
    low = float(np.nanmin(values - shown[["cv std"]].fillna(0).to_numpy()))
    high = float(np.nanmax(values))
    span = max(high - low, 1e-3)
    ax.set_xlim(low - 0.2 * span, high + 0.2 * span)
    ax.set_xlabel(metric)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save(fig, path)


@plain_text
def plot_cv_against_lb(table: pd.DataFrame, metric: str, path: Path, *, title: str) -> None:
    """Each upload's nested CV (± the folds' spread) against its public LB score (filled) and
    private (hollow, once known), with the diagonal where the two agree."""
    shown = table.dropna(subset=["cv"]).dropna(subset=["public", "private"], how="all")
    fig, ax = figure(figsize=(5.5, 4.5))
    ax.errorbar(shown["cv"], shown["public"], xerr=shown["cv_std"].fillna(0), fmt="o",
                color="#08519c", label="public LB", capsize=2)
    if shown["private"].notna().any():
        ax.scatter(shown["cv"], shown["private"], facecolors="none", edgecolors="#cb181d",
                   label="private LB", zorder=3)
    for row in shown.itertuples():
        ax.annotate(str(row.submission or row.ref)[:24], (row.cv, row.public), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    values = shown[["cv", "public", "private"]].to_numpy(float)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    pad = max(high - low, 1e-3) * 0.1
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="0.7", lw=1,
            label="LB = CV")
    ax.set_xlabel(f"CV {metric} (nested)")
    ax.set_ylabel(f"leaderboard {metric}")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save(fig, path)
