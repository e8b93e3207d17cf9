"""The duplicate detector on a suite: recall by kind of copy and size, false pairs, and scale.

    python -m bench.duplicates [--quick] [--scale 35000] [--no-record]

The suite (issue 27): three kinds of content (digit-like: scikit-learn's digits upscaled, alike
images; fundus-like: bench.synthetic_fundus, a shared layout; textured/natural-like: smooth
random fields with shapes) at 24, 32, 64, 256 and 512 px, clean and noisy (Gaussian noise of 12
levels, copies noised again), with copies of nine kinds planted among N distinct images: shift
1-3 px, crop 2-10 %, rotation up to 5 degrees, scale up to 5 %, brightness and contrast, JPEG
70-95, a resize round trip, noise, and all of them at once (a horizontal flip is no copy here:
the detector's null is the mirror images). For each set: the cuts the detector chose from the
images, recall per kind, false pairs per million distinct pairs, the largest group. `--scale N`:
`make folds` (which runs the duplicate pass) and `make audit` on N small noisy images with no
copies at all (bench/scale.py's competition): time, peak memory, groups and the largest.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.datasets import load_digits

from bench import Table, machine, record, synthetic_fundus
from pipeline.data import duplicates as detector

SIZES = (24, 32, 64, 256, 512)
NOISE = 12.0  # grey levels of the noisy sets
TARGET_RECALL, TARGET_FALSE = 0.95, 10.0  # per kind; false pairs per million distinct pairs

_DIGITS = None


def digits(rng, n, size, cls=None):
    global _DIGITS
    if _DIGITS is None:
        _DIGITS = load_digits()
    pool = np.arange(len(_DIGITS.target)) if cls is None else np.flatnonzero(_DIGITS.target == cls)
    picks = rng.choice(pool, n, replace=len(pool) < n)
    out = []
    for p in picks:
        d = np.round(_DIGITS.images[p] * 255 / 16).astype(np.uint8)
        img = cv2.resize(d, (size, size), interpolation=cv2.INTER_CUBIC)
        out.append(np.repeat(img[..., None], 3, axis=2))
    return out


def fundus(rng, n, size, cls=None):
    return [synthetic_fundus(rng, size, size) for _ in range(n)]


def texture(rng, n, size, cls=None):
    out = []
    for _ in range(n):
        img = np.zeros((size, size, 3), np.float32)
        for octave, weight in ((3, 60), (6, 35), (12, 20), (24, 10)):
            if octave > size:
                continue
            field = rng.normal(0, 1, (octave, octave, 3)).astype(np.float32)
            img += weight * cv2.resize(field, (size, size), interpolation=cv2.INTER_CUBIC)
        img += 128
        for _ in range(rng.integers(1, 4)):
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            x, y = (int(v) for v in rng.integers(0, size, 2))
            cv2.circle(img, (x, y), int(rng.integers(max(1, size // 10), max(2, size // 3))), c, -1)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


CONTENTS = {"digits": digits, "fundus": fundus, "texture": texture}


def noisy(rng, img, sigma=12.0):
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def _warp(img, matrix):
    h, w = img.shape[:2]
    return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def shift(rng, img):
    dx, dy = rng.integers(1, 4) * rng.choice([-1, 1]), rng.integers(0, 4) * rng.choice([-1, 1])
    return _warp(img, np.float32([[1, 0, dx], [0, 1, dy]]))


def crop(rng, img):
    h, w = img.shape[:2]
    f = rng.uniform(0.02, 0.10)
    top, left = int(round(rng.uniform(0, f) * h)), int(round(rng.uniform(0, f) * w))
    ch, cw = int(round(h * (1 - f))), int(round(w * (1 - f)))
    return cv2.resize(img[top:top + ch, left:left + cw], (w, h), interpolation=cv2.INTER_AREA)


def rotate(rng, img):
    h, w = img.shape[:2]
    return _warp(img, cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-5, 5), 1.0))


def scale(rng, img):
    h, w = img.shape[:2]
    return _warp(img, cv2.getRotationMatrix2D((w / 2, h / 2), 0, 1 + rng.uniform(-0.05, 0.05)))


def bright(rng, img):
    a, b = rng.uniform(0.85, 1.15), rng.uniform(-20, 20)
    return np.clip(img.astype(np.float32) * a + b, 0, 255).astype(np.uint8)


def jpeg(rng, img):
    q = int(rng.integers(70, 96))
    return cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1], cv2.IMREAD_COLOR)


def resize(rng, img):
    h, w = img.shape[:2]
    f = rng.uniform(0.5, 0.8)
    small = cv2.resize(img, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def noise(rng, img):
    return noisy(rng, img, rng.uniform(3, 8))


def flip(rng, img):
    return img[:, ::-1].copy()


def all_at_once(rng, img):
    for kind in (shift, crop, rotate, scale, bright, resize, noise, jpeg):
        img = kind(rng, img)
    return img


KINDS = {"shift": shift, "crop": crop, "rotate": rotate, "scale": scale, "bright": bright,
         "jpeg": jpeg, "resize": resize, "noise": noise, "all": all_at_once}


def copy_of(image: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """A copy of one kind (a name of KINDS), reproducible by `seed`."""
    return KINDS[kind](np.random.default_rng(seed), image)


def planted_set(rng, content: str, size: int, noisy_set: bool, n: int, copies: int):
    """(images, truth): n distinct images, then `copies` copies of each kind, and (kind,
    original, copy) for each copy."""
    base = CONTENTS[content](rng, n, size)
    if noisy_set:
        base = [noisy(rng, image, NOISE) for image in base]
    images, truth = list(base), []
    for kind, make in KINDS.items():
        for original in rng.choice(n, copies, replace=False):
            copy = make(rng, base[original])
            images.append(noisy(rng, copy, NOISE / 2) if noisy_set else copy)
            truth.append((kind, int(original), len(images) - 1))
    return images, truth


def measure(images, truth, n: int) -> list:
    """[the cuts, false pairs per million, largest group, seconds, recall of each kind]."""
    started = time.perf_counter()
    thumbs = np.stack([detector.thumbnail_of(image) for image in images])
    found = detector.split_chains(detector.near_pairs(thumbs), len(thumbs))
    seconds = time.perf_counter() - started
    family = np.arange(len(images))
    for _, original, copy in truth:
        family[copy] = original
    pairs = {tuple(p) for p in found.pairs.tolist()}
    false = sum(family[a] != family[b] for a, b in pairs)
    groups = detector.group_of_pairs(len(images), found.pairs)
    largest = int(np.bincount(groups[groups >= 0]).max()) if (groups >= 0).any() else 0
    recall = [np.mean([(min(o, c), max(o, c)) in pairs for k, o, c in truth if k == kind])
              for kind in KINDS]
    cuts = "/".join(f"{cut:.3f}" for cut in found.cuts.values())
    return [cuts, false / (n * (n - 1) / 2) * 1e6, largest, seconds, *recall]


def suite(quick: bool) -> Table:
    n, copies = (120, 8) if quick else (300, 20)
    rng = np.random.default_rng(0)
    rows = []
    for content in CONTENTS:
        for size in (SIZES[:3] if quick else SIZES):
            for noisy_set in (False, True):
                images, truth = planted_set(rng, content, size, noisy_set, n, copies)
                cut, false, largest, seconds, *recall = measure(images, truth, n)
                rows.append([content, size, "noisy" if noisy_set else "clean", cut,
                             f"{false:.0f}", largest, *[f"{r:.2f}" for r in recall],
                             f"{seconds:.1f}"])
                print(*rows[-1], flush=True)
    return Table(
        f"Duplicate detector (aligned thumbnails, the competition's own cut): {n} distinct "
        f"images per set, {copies} copies of each kind",
        ["content", "px", "set", "cuts", "false /M", "largest", *[f"recall {k}" for k in KINDS],
         "s"], rows,
        [f"- goal: recall >= {TARGET_RECALL} on every kind and size at <= {TARGET_FALSE:g} false "
         f"pairs per million distinct pairs (1 per 100,000)",
         "- cuts: of the thumbnail and of its detail (a pair above either is a copy)",
         "- false /M: pairs of distinct images found, per million distinct pairs "
         f"({n * (n - 1) // 2} per set); largest: the largest group found"])


def at_scale(n: int) -> Table:
    """On n noisy 24 px images with no copies: `make folds` (the check, the duplicate pass and
    the split), `make audit` after it (the duplicates current: the shift finding alone), and
    `make audit` first (the audit folder removed: the check, the duplicates and the shift)."""
    from bench.scale import run_stage, write_competition

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dupes-scale-") as tmp:
        data, overrides = write_competition(Path(tmp) / "comp", n)
        runs = (("folds", "folds (first: check, duplicates, split)"),
                ("audit", "audit after folds (shift alone)"),
                ("audit", "audit first (check, duplicates, shift)"))
        for number, (stage, what) in enumerate(runs):
            if number == 2:
                table = pd.read_csv(next(Path(tmp).rglob("duplicates.csv")), dtype=str)
                shutil.rmtree(next(Path(tmp).rglob("duplicates.csv")).parent)
            done = run_stage([stage], data, overrides, Path(tmp) / f"{number}-{stage}.log")
            rows.append([what, f"{done.seconds:.1f} s", f"{done.peak_mb:.0f} MB"])
    sizes = table.groupby("group").size() if len(table) else pd.Series([], dtype=int)
    return Table(f"The duplicate pass at {n:,} small noisy images with no copies (24 px, "
                 f"{n // 4:,} of them test images too)", ["command", "wall", "peak memory"],
                 rows, [f"groups found: {len(sizes)}, images in them: {int(sizes.sum())}, "
                        f"the largest: {int(sizes.max()) if len(sizes) else 0} (every one false: "
                        f"no image has a copy)"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.duplicates",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", type=int, default=0, help="images of the scale run (0: none)")
    parser.add_argument("--no-suite", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    about = machine()
    tables = [] if args.no_suite else [suite(args.quick)]
    if args.scale:
        tables.append(at_scale(args.scale))
    record(tables, "duplicate detector" + (" (quick)" if args.quick else ""), about,
           append=not args.no_record)


if __name__ == "__main__":
    sys.exit(main())
