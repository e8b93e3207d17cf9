"""Export the embedded demo competition: scikit-learn's handwritten digits, Kaggle-style.

    python -m pipeline demo-data            # writes data/digits/ (skips when it is there)

1,797 real 8x8 grayscale images of 10 classes ship inside scikit-learn, so the demo needs no
download. About 20% become the test set; their labels go to `solution.csv`, kept apart from
`test.csv` and `sample_submission.csv`, so a submission can be scored like on a leaderboard.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pipeline.base.log import log
from pipeline.base.utils import format_table

TEST_FRACTION = 0.2
SPLIT_SEED = 42  # fixed: the demo competition is the same everywhere


def _write_images(folder: Path, ids: list[str], images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for image_id, image in zip(ids, images):
        cv2.imwrite(str(folder / f"{image_id}.png"), image)


def export_digits(root: Path | str = "data/digits", force: bool = False) -> Path:
    """Write the digits competition under `root`; an existing complete export is kept."""
    root = Path(root)
    if (root / "solution.csv").is_file() and not force:
        log.info(f"demo competition already at {root} (use --force to rewrite)")
        return root

    digits = load_digits()
    # 0..16 intensities -> 0..255 uint8, as a real competition's PNGs would be.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(int)
    ids = [f"{i:04d}" for i in range(len(labels))]  # zero-padded: ids are strings, 0001 stays 0001
    train_idx, test_idx = train_test_split(np.arange(len(ids)), test_size=TEST_FRACTION,
                                           stratify=labels, random_state=SPLIT_SEED)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)

    # Build in a temporary sibling folder and rename: an interrupted export leaves nothing behind.
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        _write_images(staging / "train", [ids[i] for i in train_idx], images[train_idx])
        _write_images(staging / "test", [ids[i] for i in test_idx], images[test_idx])
        train = pd.DataFrame({"id": [ids[i] for i in train_idx], "label": labels[train_idx]})
        test = pd.DataFrame({"id": [ids[i] for i in test_idx]})
        train.to_csv(staging / "train.csv", index=False)
        test.to_csv(staging / "test.csv", index=False)
        test.assign(label=0).to_csv(staging / "sample_submission.csv", index=False)
        test.assign(label=labels[test_idx]).to_csv(staging / "solution.csv", index=False)
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    log.info(format_table([["train", len(train_idx), str(root / "train.csv")],
                           ["test", len(test_idx), str(root / "test.csv")],
                           ["solution (held out)", len(test_idx), str(root / "solution.csv")]],
                          ["split", "images", "file"]))
    return root


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("root", "force")


def main(args) -> None:
    export_digits(args.root, force=args.force)
