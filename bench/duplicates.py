"""Which duplicate detector: recall of planted near copies and false pairs, per hash and bits.

    python -m bench.duplicates [--quick]

Two sets of distinct images, each with planted copies of some of them: synthetic fundus photos
(bench.synthetic_fundus, 256 px JPEGs: retina competitions, where most duplicates were found)
and scikit-learn's digits upscaled to 64 px (small, alike images: the hard case for false
pairs). Each planted copy is one of: shifted by one pixel, re-encoded as JPEG at quality 70,
brightened by 25 levels, or all three. For each of imagehash's 64-bit hashes (phash, dhash,
ahash, whash) and each Hamming threshold: the share of planted pairs found (recall, by kind of
copy) and the pairs found among the distinct images (false pairs). `make audit` uses the hash
and threshold chosen here (audit.hash, audit.max_distance).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
from sklearn.datasets import load_digits

from bench import Table, machine, record, synthetic_fundus
from pipeline.data.duplicates import HASHES, image_hashes, near_pairs

KINDS = ("shift", "jpeg", "bright", "all three")
THRESHOLDS = (2, 4, 6, 8, 10, 12)


def copy_of(image: np.ndarray, kind: str) -> np.ndarray:
    out = image
    if kind in ("shift", "all three"):
        out = np.roll(out, 1, axis=1)
    if kind in ("bright", "all three"):
        out = np.clip(out.astype(np.int16) + 25, 0, 255).astype(np.uint8)
    if kind in ("jpeg", "all three"):
        out = cv2.imdecode(cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, 70])[1],
                           cv2.IMREAD_UNCHANGED)
    return out


def image_sets(n: int, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    digits = load_digits().images[rng.permutation(1797)[:n]]
    return {"fundus 256 px": [synthetic_fundus(rng, 256, 256) for _ in range(n)],
            "digits 64 px": [cv2.resize(np.round(d * 255 / 16).astype(np.uint8), (64, 64),
                                        interpolation=cv2.INTER_LINEAR) for d in digits]}


def write(folder: Path, images: list[np.ndarray]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:05d}.png"
        bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(path), bgr)
        paths.append(path)
    return paths


def measure(images: list[np.ndarray], planted: int, folder: Path) -> list[list]:
    """Rows (hash, threshold, recall by kind, false pairs) for one set of distinct images."""
    copies = [copy_of(images[i], KINDS[i % len(KINDS)]) for i in range(planted)]
    paths = write(folder, images + copies)
    n = len(images)
    truth = {(i, n + i) for i in range(planted)}
    rows = []
    for kind in HASHES:
        hashes = image_hashes(paths, kind)
        for threshold in THRESHOLDS:
            found = {tuple(p) for p in near_pairs(hashes, threshold).tolist()}
            recall = [np.mean([(i, n + i) in found for i in range(planted)
                               if KINDS[i % len(KINDS)] == k]) for k in KINDS]
            false = sum(1 for p in found if p not in truth and max(p) < n)
            rows.append([kind, threshold, *[f"{r:.2f}" for r in recall], false])
    return rows


def run(quick: bool) -> list[Table]:
    n, planted = (60, 20) if quick else (600, 120)
    rng = np.random.default_rng(0)
    tables = []
    with tempfile.TemporaryDirectory(prefix="bench-dupes-") as tmp:
        for name, images in image_sets(n, rng).items():
            rows = measure(images, planted, Path(tmp) / name.split()[0])
            tables.append(Table(f"Duplicate detectors on {name}: {n} distinct images, {planted} "
                                f"planted copies ({planted // len(KINDS)} of each kind)",
                                ["hash", "max bits", *[f"recall: {k}" for k in KINDS],
                                 f"false pairs of {n * (n - 1) // 2}"], rows))
    return tables


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.duplicates",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    about = machine()
    record(run(args.quick), "duplicate detectors" + (" (quick)" if args.quick else ""), about)


if __name__ == "__main__":
    main()
