"""The benchmark suite's competitions, each built from scikit-learn's digits (data that ships in
an installed package) with a labelled part and a held-out test part whose labels only the suite
reads (solution.csv), so its table holds held-out scores, not only out-of-fold ones.

    python -m bench.suite_data data/suite [--n 600] [--seed 0]     # writes data/suite/<member>/

| member | kind | classes | metric | image |
|---|---|---|---|---|
| digits | balanced multi-class | 10 digits | accuracy | 16 px, grey |
| ordinal-amount | imbalanced ordinal, the grade an amount (bench/ordinal_data.py) | 5 grades, 73/7/15/2.5/2.5% | qwk | 32 px |
| ordinal-look | imbalanced ordinal, each grade a look of its own | 5 grades, the same shares | qwk | 32 px |
| binary | imbalanced binary, ~1:3 | pos (3 and 8), neg | binary_f1 | 16 px |
| many-classes | 30 classes of 20 images | a digit in one of 3 tints | accuracy | 16 px |
| noisy-labels | 10 digits, 8% of the training labels wrong (`flipped.csv` names them) | 10 digits | accuracy | 16 px |

In ordinal-look the grades are told apart by what the image shows: grade 1 a few tiny dark-red
dots (microaneurysms), grade 2 yellow-white patches (exudates), grade 3 one large dark blot
(a haemorrhage), grade 4 thin bright curved lines (new vessels); none is "more" of another, as
in real retina grades. Eyes come in pairs with correlated grades and a shared exposure, as in
ordinal-amount. Deterministic per seed.
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
from sklearn.datasets import load_digits

from bench.ordinal_data import export_ordinal, paired_grades, shown_grades
from pipeline.base.utils import format_table, write_text_atomic

MEMBERS = ("digits", "ordinal-amount", "ordinal-look", "binary", "many-classes", "noisy-labels")
TEST_FRACTION = 1 / 3  # held-out test rows per labelled row
FLIP_SHARE = 0.08  # noisy-labels: share of the training labels set to another class
TINTS = {"r": (1.0, 0.35, 0.35), "g": (0.35, 1.0, 0.35), "b": (0.35, 0.35, 1.0)}
SIZE = 32  # ordinal-look's images, as ordinal-amount's


def digits_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 8x8 images (0..255) and labels, shuffled by `seed`."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    images = np.round(digits.images[order] * (255 / 16)).astype(np.uint8)
    return images, digits.target[order].astype(int)


def write_competition(root: Path, name: str, train: tuple[list, list, list],
                      test: tuple[list, list, list], config: dict) -> Path:
    """Write images (ids, images, labels) of both parts, the CSVs and `<root>/<name>.yaml`;
    return the config's path. The folder is built aside and renamed into place."""
    folder = root / name
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        for part, (ids, images, _) in (("train", train), ("test", test)):
            (staging / part).mkdir()
            for image_id, image in zip(ids, images):
                bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
                if not cv2.imwrite(str(staging / part / f"{image_id}.png"), bgr):
                    raise OSError(f"cannot write {staging / part / image_id}.png")
        pd.DataFrame({"id": train[0], "label": train[2]}).to_csv(staging / "train.csv",
                                                                  index=False)
        pd.DataFrame({"id": test[0]}).to_csv(staging / "test.csv", index=False)
        pd.DataFrame({"id": test[0], "label": test[2][0]}).to_csv(
            staging / "sample_submission.csv", index=False)
        pd.DataFrame({"id": test[0], "label": test[2]}).to_csv(staging / "solution.csv",
                                                                index=False)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    path = root / f"{name}.yaml"
    mapping = {"name": name, "root": str(folder.resolve()), "solution_csv": "solution.csv",
               "submission": "label", **config}
    write_text_atomic(path, yaml.safe_dump(mapping, sort_keys=False))
    return path


def split(n: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of n labelled and n/3 test rows among `count`, disjoint."""
    n_test = round(n * TEST_FRACTION)
    order = rng.permutation(count)
    if n + n_test > count:
        raise ValueError(f"n={n} and its {n_test} test rows exceed the {count} images")
    return order[:n], order[n:n + n_test]


GREY = {"image_path": "{id}.png", "defaults": {"augment": {
    "image_size": 16, "interpolation": "linear",
    "train": [{"Affine": {"translate_percent": 0.06, "rotate": [-10, 10], "p": 0.7}}]}}}


def export_digits_member(root: Path, n: int, seed: int) -> Path:
    images, labels = digits_data(seed)
    train, test = split(n, len(labels), np.random.default_rng(seed + 1))
    part = lambda rows, p: ([f"{p}{i:04d}" for i in rows], images[rows], labels[rows].astype(str))  # noqa: E731
    return write_competition(root, "digits", part(train, "a"), part(test, "t"),
                             {"classes": [str(c) for c in range(10)], "metric": "accuracy",
                              **GREY})


def export_binary(root: Path, n: int, seed: int) -> Path:
    """pos: the digits 3 and 8 (alike in shape), a quarter of the rows; neg: the others."""
    images, labels = digits_data(seed)
    rng = np.random.default_rng(seed + 2)
    positive = np.flatnonzero(np.isin(labels, (3, 8)))
    negative = np.flatnonzero(~np.isin(labels, (3, 8)))
    total = n + round(n * TEST_FRACTION)
    chosen = np.concatenate([rng.choice(positive, total // 4, replace=False),
                             rng.choice(negative, total - total // 4, replace=False)])
    chosen = chosen[rng.permutation(len(chosen))]
    names = np.where(np.isin(labels, (3, 8)), "pos", "neg")
    part = lambda rows, p: ([f"{p}{i:04d}" for i in rows], images[rows], names[rows])  # noqa: E731
    return write_competition(root, "binary", part(chosen[:n], "a"), part(chosen[n:], "t"),
                             {"classes": ["pos", "neg"], "positive_class": "pos",
                              "metric": "binary_f1", **GREY})


def tinted(image: np.ndarray, tint: str) -> np.ndarray:
    """A grey digit as RGB in one of TINTS (the class tells the tint too)."""
    return np.clip(image[..., None] * np.asarray(TINTS[tint]), 0, 255).astype(np.uint8)


def export_many_classes(root: Path, n: int, seed: int) -> Path:
    """30 classes: each digit in each of 3 tints; n / 30 labelled images per class."""
    images, labels = digits_data(seed)
    rng = np.random.default_rng(seed + 3)
    tints = rng.choice(list(TINTS), len(labels))
    names = np.array([f"{d}{t}" for d, t in zip(labels, tints)])
    classes = [f"{d}{t}" for d in range(10) for t in TINTS]
    per_class, per_test = n // 30, max(1, round(n * TEST_FRACTION) // 30)
    train, test = [], []
    for name in classes:
        rows = rng.permutation(np.flatnonzero(names == name))
        if len(rows) < per_class + per_test:
            raise ValueError(f"class {name}: {len(rows)} images, {per_class + per_test} needed")
        train += list(rows[:per_class])
        test += list(rows[per_class:per_class + per_test])
    part = lambda rows, p: ([f"{p}{i:04d}" for i in rows],  # noqa: E731
                            np.stack([tinted(images[i], tints[i]) for i in rows]), names[rows])
    return write_competition(root, "many-classes", part(np.array(train), "a"),
                             part(np.array(test), "t"),
                             {"classes": classes, "metric": "accuracy", **GREY})


def export_noisy(root: Path, n: int, seed: int) -> Path:
    """10 digits with FLIP_SHARE of the training labels set to another digit (the test
    labels are right); flipped.csv beside the data names those rows and their true digit."""
    images, labels = digits_data(seed)
    rng = np.random.default_rng(seed + 4)
    train, test = split(n, len(labels), rng)
    given = labels[train].copy()
    flipped = rng.permutation(len(train))[:round(FLIP_SHARE * len(train))]
    given[flipped] = (given[flipped] + rng.integers(1, 10, len(flipped))) % 10
    ids = [f"a{i:04d}" for i in train]
    path = write_competition(root, "noisy-labels", (ids, images[train], given.astype(str)),
                             ([f"t{i:04d}" for i in test], images[test], labels[test].astype(str)),
                             {"classes": [str(c) for c in range(10)], "metric": "accuracy",
                              **GREY})
    pd.DataFrame({"id": [ids[i] for i in flipped], "given": given[flipped],
                  "true": labels[train][flipped]}).to_csv(root / "noisy-labels" / "flipped.csv",
                                                          index=False)
    return path


# --------------------------------------------------------------------------------------------
# ordinal-look


def _dots(image, yy, xx, rng, count, colour, radius):
    for _ in range(count):
        angle, distance = rng.uniform(0, 2 * np.pi), (SIZE / 2 - 3) * np.sqrt(rng.random())
        y, x = SIZE / 2 + distance * np.sin(angle), SIZE / 2 + distance * np.cos(angle)
        spot = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * radius ** 2))
        image += spot[..., None] * np.asarray(colour) * rng.uniform(0.7, 1.0)


def _vessels(image, rng):
    """Thin bright curved lines from a point near the rim (new vessels)."""
    lines = np.zeros((SIZE, SIZE), np.float32)
    y, x = rng.uniform(8, 24, 2)
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(2):
        points = []
        for _ in range(10):
            angle += rng.normal(0, 0.5)
            y, x = y + 1.6 * np.sin(angle), x + 1.6 * np.cos(angle)
            points.append((int(round(x * 4)), int(round(y * 4))))
        cv2.polylines(lines, [np.array(points, np.int32)], False, 1.0, thickness=1,
                      lineType=cv2.LINE_AA, shift=2)
    image += lines[..., None] * np.array([70.0, 80.0, 60.0])


def render_look(digit: np.ndarray, grade: int, exposure: float,
                rng: np.random.Generator) -> np.ndarray:
    """A 32x32 "eye" (the digit as texture, as in ordinal-amount) with grade's own sign."""
    texture = cv2.resize(digit.astype(np.float32) / 16, (SIZE, SIZE),
                         interpolation=cv2.INTER_LINEAR)
    base = 60 + 90 * exposure * rng.uniform(0.85, 1.15) * texture
    image = np.stack([base * 1.15, base * 0.75, base * 0.45], axis=-1)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    if grade == 1:
        _dots(image, yy, xx, rng, int(rng.integers(2, 4)), (70.0, -40.0, -30.0), 0.6)
    elif grade == 2:
        _dots(image, yy, xx, rng, int(rng.integers(2, 4)), (60.0, 70.0, 40.0), 1.4)
    elif grade == 3:
        _dots(image, yy, xx, rng, 1, (-50.0, -45.0, -25.0), 3.0)
    elif grade == 4:
        _vessels(image, rng)
    image += rng.normal(0, 10.0, image.shape)
    inside = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 <= (SIZE / 2 - 0.5) ** 2
    return np.clip(np.rint(image * inside[..., None]), 0, 255).astype(np.uint8)


def _look_part(n: int, patients: np.ndarray, digits: np.ndarray, rng: np.random.Generator,
               prefix: str) -> tuple[list, np.ndarray, np.ndarray]:
    labels = paired_grades(n, rng).reshape(-1)
    shown = shown_grades(labels, rng)
    ids = [f"{prefix}{patient}_{eye}" for patient in patients for eye in ("left", "right")]
    images = []
    for index, grade in enumerate(shown):
        if index % 2 == 0:
            exposure = rng.uniform(0.25, 0.9)
        images.append(render_look(digits[index % len(digits)], int(grade),
                                  exposure * rng.uniform(0.9, 1.1), rng))
    return ids, np.stack(images), labels.astype(str)


def export_ordinal_look(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed + 5)
    digits = load_digits().images[rng.permutation(1797)]
    n_test = 2 * max(5, round(n * TEST_FRACTION / 2))
    patients = rng.permutation(np.arange(1, 20 * (n + n_test)))[:(n + n_test) // 2]
    train = _look_part(n, patients[:n // 2], digits, rng, "p")
    test = _look_part(n_test, patients[n // 2:], digits[n:], rng, "p")
    return write_competition(root, "ordinal-look", train, test, {
        "classes": ["0", "1", "2", "3", "4"], "ordinal": True, "metric": "qwk",
        "image_path": "{id}.png", "group_pattern": r"^p(\d+)_(left|right)$",
        "defaults": {"augment": {"image_size": SIZE, "interpolation": "linear", "train": [
            {"HorizontalFlip": {"p": 0.5}}, {"VerticalFlip": {"p": 0.5}},
            {"RandomRotate90": {"p": 0.5}}]}}})


def export_ordinal_amount(root: Path, n: int, seed: int) -> Path:
    return export_ordinal(root / "ordinal-amount", n=n, seed=seed)


EXPORTS = {"digits": export_digits_member, "ordinal-amount": export_ordinal_amount,
           "ordinal-look": export_ordinal_look, "binary": export_binary,
           "many-classes": export_many_classes, "noisy-labels": export_noisy}


def export_suite(root: Path, n: int = 600, seed: int = 0,
                 members: tuple[str, ...] = MEMBERS) -> dict[str, Path]:
    """Every member under `root`; {member: its config's path}."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return {name: EXPORTS[name](root, n, seed) for name in members}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.suite_data",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--n", type=int, default=600, help="labelled images per member")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    for name, path in export_suite(args.root, args.n, args.seed).items():
        train = pd.read_csv(path.parent / name / "train.csv", dtype=str)
        column = "level" if "level" in train else "label"
        shares = train[column].value_counts(normalize=True)
        rows.append([name, len(train), train[column].nunique(), f"{shares.max():.0%}", str(path)])
    print(format_table(rows, ["member", "labelled", "classes", "largest class", "config"]))


if __name__ == "__main__":
    main()
