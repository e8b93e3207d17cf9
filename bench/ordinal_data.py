"""An imbalanced five-grade ordinal competition, retina-like, built from data that ships with
scikit-learn: the benchmark's stand-in for Kaggle's diabetic-retinopathy competitions.

    python -m bench.ordinal_data data/ordinal [--n 900] [--seed 0]   # writes data/ordinal.yaml too

    from bench.ordinal_data import export_ordinal
    config = export_ordinal(Path("/tmp/ordinal"), n=900, seed=0)   # -> /tmp/ordinal.yaml
    # python -m pipeline folds --data /tmp/ordinal.yaml

What it imitates, and how:
- grades 0-4 in the retina data's shares: 73%, 7%, 15%, 2.5%, 2.5% (exact counts, largest
  remainder), in the labelled rows and in the held-out test rows alike;
- two eyes per patient, ids `<patient>_left` / `<patient>_right` (group_pattern keeps a patient in
  one fold), with correlated grades (mostly equal, otherwise neighbours) and a shared camera
  exposure, so a model that saw one eye has an advantage on the other: the reason for grouping;
- the grade is visible, and ordinal: each image is a scikit-learn digit (the "eye's" texture, a
  nuisance) inside a black circular frame, with red "lesions" whose number rises with the grade
  (0; 1-2; 3-5; 6-9; 10-14), like microaneurysms and haemorrhages; neighbouring grades differ by a
  few lesions, so they are the ones confused;
- noise: LABEL_NOISE of the rows (4%) show a neighbouring grade's lesion count (the label
  disagrees with the image, as graders disagree; label shares stay exact), low and varying
  contrast, and Gaussian pixel noise.

Every image is a 32x32 px RGB PNG. Scikit-learn's 1,797 digits are used once each while they
last (n plus the n/3 test rows up to 1,797: n up to about 1,340), then again with new lesions,
lighting and noise.
Deterministic per seed: the same seed gives the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

from pipeline.base.utils import format_table, write_text_atomic

GRADES = (0, 1, 2, 3, 4)
SHARES = (0.73, 0.07, 0.15, 0.025, 0.025)  # of the retina data (EyePACS 2015 train labels)
LESIONS = {0: (0, 0), 1: (1, 2), 2: (3, 5), 3: (6, 9), 4: (10, 14)}  # count range per grade
LABEL_NOISE = 0.04  # share of rows whose image shows a neighbouring grade
PAIR_JITTER = 0.6  # grades: noise on the sort key that pairs eyes; larger, less correlated eyes
SIZE = 32  # pixels, square
TEST_FRACTION = 1 / 3  # test rows per labelled row
PIXEL_NOISE = 10.0  # 0..255 levels, Gaussian sigma


def grade_counts(n: int) -> np.ndarray:
    """Rows per grade for `n` rows in SHARES, rounded by largest remainder (they sum to n)."""
    exact = np.asarray(SHARES) * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[:n - counts.sum()]] += 1
    return counts


def paired_grades(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n/2, 2) grades of left and right eyes: exact shares, the eyes of a patient correlated.

    The grades in their shares are sorted by grade plus a little noise and paired neighbour with
    neighbour, so most patients have two eyes of one grade and the rest neighbouring grades.
    """
    grades = np.repeat(GRADES, grade_counts(n))
    order = np.argsort(grades + rng.normal(0, PAIR_JITTER, n), kind="stable")
    pairs = grades[order].reshape(-1, 2)
    pairs = pairs[rng.permutation(len(pairs))]
    swap = rng.random(len(pairs)) < 0.5  # which eye is the worse one
    pairs[swap] = pairs[swap, ::-1]
    return pairs


def shown_grades(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The grade each image shows: its label, except LABEL_NOISE of the rows, which show a
    neighbouring grade (0 shows 1, 4 shows 3, others one up or down)."""
    shown = labels.copy()
    noisy = rng.permutation(len(labels))[:round(LABEL_NOISE * len(labels))]
    steps = rng.choice([-1, 1], len(noisy))
    shown[noisy] = np.clip(labels[noisy] + steps, 0, 4)
    shown[noisy] = np.where(shown[noisy] == labels[noisy], labels[noisy] - steps, shown[noisy])
    return shown


def render(digit: np.ndarray, grade: int, exposure: float, rng: np.random.Generator) -> np.ndarray:
    """One 32x32 RGB uint8 "eye": a digit (8x8, 0..16) as the texture inside a black disc, with
    `grade`'s number of red lesions, at `exposure` (0..1 contrast), plus pixel noise."""
    texture = cv2.resize(digit.astype(np.float32) / 16, (SIZE, SIZE),
                         interpolation=cv2.INTER_LINEAR)  # (32, 32), 0..1
    contrast = exposure * rng.uniform(0.85, 1.15)  # low: the digit spans only part of 0..255
    base = 60 + 90 * contrast * texture
    image = np.stack([base * 1.15, base * 0.75, base * 0.45], axis=-1)  # orange-brown, fundus-like
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    radius = SIZE / 2 - 0.5
    low, high = LESIONS[int(grade)]
    for _ in range(rng.integers(low, high + 1)):
        angle, distance = rng.uniform(0, 2 * np.pi), radius * 0.8 * np.sqrt(rng.random())
        y, x = SIZE / 2 + distance * np.sin(angle), SIZE / 2 + distance * np.cos(angle)
        spot = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * rng.uniform(0.7, 1.1) ** 2))
        image += spot[..., None] * np.array([90.0, -45.0, -30.0]) * rng.uniform(0.6, 1.0)
    image += rng.normal(0, PIXEL_NOISE, image.shape)
    inside = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 <= radius ** 2
    return np.clip(np.rint(image * inside[..., None]), 0, 255).astype(np.uint8)


def _split(n: int, patients: np.ndarray, rng: np.random.Generator, digits: np.ndarray,
           cursor: int, folder: Path) -> tuple[pd.DataFrame, int]:
    """Write n images (n/2 patients) to `folder`; return (image, level) rows and the next digit."""
    pairs = paired_grades(n, rng)
    labels = pairs.reshape(-1)
    shown = shown_grades(labels, rng)
    ids = [f"{patient}_{eye}" for patient in patients for eye in ("left", "right")]
    folder.mkdir(parents=True)
    for index, (image_id, grade) in enumerate(zip(ids, shown)):
        if index % 2 == 0:
            exposure = rng.uniform(0.25, 0.9)  # one camera session per patient: both eyes alike
        digit = digits[(cursor + index) % len(digits)]
        image = render(digit, grade, exposure * rng.uniform(0.9, 1.1), rng)
        if not cv2.imwrite(str(folder / f"{image_id}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {folder / image_id}.png")
    return pd.DataFrame({"image": ids, "level": labels}), cursor + n


def competition_config(root: Path) -> dict:
    """The competition config of an export at `root`, in the form of configs/data/*.yaml."""
    return {
        "name": root.name,
        "root": str(root),
        "train_csv": "train.csv",
        "test_csv": "test.csv",
        "sample_submission": "sample_submission.csv",
        "solution_csv": "solution.csv",
        "train_images": "train",
        "test_images": "test",
        "id_column": "image",
        "label_column": "level",
        "image_path": "{id}.png",
        "classes": list(GRADES),
        "ordinal": True,
        "metric": "qwk",
        "group_pattern": r"^(\d+)_(left|right)$",  # both eyes of a patient in one fold
        "submission": "label",
        "defaults": {"augment": {
            "image_size": SIZE,
            "interpolation": "linear",
            # the grade is a lesion count: flips and quarter turns keep it
            "train": [{"HorizontalFlip": {"p": 0.5}}, {"VerticalFlip": {"p": 0.5}},
                      {"RandomRotate90": {"p": 0.5}}],
        }},
    }


def export_ordinal(root: Path, n: int = 900, seed: int = 0) -> Path:
    """Write the competition to `root` (train.csv, test.csv, sample_submission.csv, solution.csv,
    train/ and test/ PNGs) and its config to `<root>.yaml` beside it; return the config's path.

    `n` labelled images (an even number: two eyes per patient), about n/3 test images; an export
    already at `root` is replaced. Deterministic per `seed`.
    """
    from sklearn.datasets import load_digits

    if n < 20 or n % 2:
        raise ValueError(f"n must be an even number >= 20 (two eyes per patient), got {n}")
    root = Path(root).resolve()
    rng = np.random.default_rng(seed)
    n_test = 2 * max(5, round(n * TEST_FRACTION / 2))
    digits = load_digits().images[rng.permutation(1797)]  # (1797, 8, 8), 0..16
    patients = rng.permutation(np.arange(1, 20 * (n + n_test)))[:(n + n_test) // 2]  # ids, unique

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        train, cursor = _split(n, patients[:n // 2], rng, digits, 0, staging / "train")
        test, _ = _split(n_test, patients[n // 2:], rng, digits, cursor, staging / "test")
        train.to_csv(staging / "train.csv", index=False)
        test[["image"]].to_csv(staging / "test.csv", index=False)
        test.assign(level=0).to_csv(staging / "sample_submission.csv", index=False)
        test.to_csv(staging / "solution.csv", index=False)
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    config = root.parent / f"{root.name}.yaml"
    write_text_atomic(config, "# bench/ordinal_data.py: a retina-like ordinal competition "
                              f"(n={n}, seed={seed})\n"
                      + yaml.safe_dump(competition_config(root), sort_keys=False))
    return config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ordinal_data",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="folder to write, e.g. data/ordinal")
    parser.add_argument("--n", type=int, default=900, help="labelled images (even)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = export_ordinal(args.root, args.n, args.seed)
    train = pd.read_csv(args.root / "train.csv")
    shares = train["level"].value_counts(normalize=True).reindex(GRADES, fill_value=0)
    print(format_table([[g, int((train["level"] == g).sum()), f"{100 * shares[g]:.1f}%",
                         f"{100 * s:.1f}%"] for g, s in zip(GRADES, SHARES)],
                       ["grade", "images", "share", "target"]))
    print(f"config: {config}")


if __name__ == "__main__":
    main()
