"""Every stage at growing competition sizes: wall seconds and peak memory of each, in a fresh process.

    OMP_NUM_THREADS=1 python -m bench.scale [--sizes 1000,4000,16000] [--stages check,folds,runs]
                                            [--no-record]

Writes a synthetic competition of N small images (24 px PNGs, 3 classes told apart by their mean
colour, a test set of N/4) and runs, as `make` would, check, folds, audit, train (resnet20, 1
epoch of a few batches per fold: the pipeline around training, not training itself), predict,
ensemble, runs and report, then runs and report again with nothing changed (what `make runs` and
`make report` cost on an ordinary morning). Each stage is its own process; its peak resident
memory is its own (GNU time's; DataLoader workers are off, so the process is the whole
stage). Goal (issue 26): every stage but training grows at most linearly in N;
runs/report with nothing changed under 3 s at 16,000 images; check on a tiny competition under
400 MB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

from bench import Table, machine, record

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]
SIZE = 24  # pixels: small images keep image writing and decoding out of the way
TEST_SHARE = 4  # one test image per this many labelled ones
MODEL = "resnet20"
TIME = "/usr/bin/time"  # GNU time: wall seconds and peak memory of one command
# Training's share is fixed (1 epoch, a few batches per fold, 3 folds): it measures the
# pipeline around the model, which is what must stay linear.
TRAIN_ARGS = ["train.epochs=1", "train.max_batches=3", "train.batch_size=32", "train.workers=0",
              "train.device=cpu", f"augment.image_size={SIZE}", "tta.views=none"]
FOLDS = 3
# (stage label, verb arguments); the "again" rows run with nothing changed since the row above
STAGES = [
    ("check", ["check"]),
    ("folds", ["folds"]),
    ("audit", ["audit"]),
    ("train", ["train", "--model", MODEL, *TRAIN_ARGS]),
    ("predict", ["predict", "--model", MODEL, *TRAIN_ARGS]),
    ("ensemble", ["ensemble"]),
    ("runs", ["runs"]),
    ("runs again", ["runs"]),
    ("report", ["report"]),
    ("report again", ["report"]),
]


def write_images(folder: Path, ids: list[str], labels: np.ndarray, rng: np.random.Generator):
    folder.mkdir(parents=True)
    means = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]], np.float32)
    for image_id, label in zip(ids, labels):
        image = means[label] + rng.normal(0, 40, (SIZE, SIZE, 3))
        cv2.imwrite(str(folder / f"{image_id}.png"), np.clip(image, 0, 255).astype(np.uint8))


def write_competition(root: Path, n: int, seed: int = 0) -> tuple[Path, list[str]]:
    """The competition's images, CSVs and YAML under `root`; (its YAML, the overrides that put
    every output under `root` too)."""
    rng = np.random.default_rng(seed)
    train_ids = [f"tr{i:06d}" for i in range(n)]
    test_ids = [f"te{i:06d}" for i in range(max(n // TEST_SHARE, 1))]
    labels = rng.integers(0, len(CLASSES), n)
    write_images(root / "train", train_ids, labels, rng)
    write_images(root / "test", test_ids, rng.integers(0, len(CLASSES), len(test_ids)), rng)
    pd.DataFrame({"id": train_ids, "label": [CLASSES[k] for k in labels]}).to_csv(
        root / "train.csv", index=False)
    pd.DataFrame({"id": test_ids}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"id": test_ids, "label": CLASSES[0]}).to_csv(root / "sample_submission.csv",
                                                               index=False)
    data = root / "scale.yaml"
    data.write_text(yaml.safe_dump({
        "name": "scale", "root": str(root), "train_csv": "train.csv", "test_csv": "test.csv",
        "sample_submission": "sample_submission.csv", "train_images": "train",
        "test_images": "test", "image_path": "{id}.png", "classes": CLASSES,
        "metric": "accuracy", "submission": "label"}))
    outputs = {"runs_dir": "runs", "submissions_dir": "submissions", "pseudo_dir": "pseudo",
               "bundles_dir": "bundles", "audit_dir": "audit", "reports_dir": "reports",
               "folds.dir": "folds"}
    overrides = [f"{key}={root / value}" for key, value in outputs.items()]
    return data, [*overrides, f"folds.n_splits={FOLDS}"]


@dataclass
class Measured:
    seconds: float
    peak_mb: float


def run_stage(args: list[str], data: Path, overrides: list[str], log: Path) -> Measured:
    """One `python -m pipeline VERB --data ... overrides` in a fresh process: its wall seconds
    and peak resident memory (MB) as GNU time measures them. Through /usr/bin/time rather than
    our own rusage: a child forked from this process (torch loaded) would carry this process's
    peak across its exec."""
    verb, rest = args[0], args[1:]
    command = [sys.executable, "-m", "pipeline", verb, "--data", str(data), *rest, *overrides]
    measured = log.with_suffix(".time")
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run([TIME, "-f", "%e %M", "-o", str(measured), *command], cwd=REPO,
                              stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{verb} failed (exit {done.returncode}); its output: {log}")
    seconds, kilobytes = measured.read_text().split()[-2:]
    return Measured(float(seconds), int(kilobytes) / 1024)


def run_size(n: int, stages: list[str], keep: Path | None) -> dict[str, Measured]:
    with tempfile.TemporaryDirectory(prefix=f"bench-scale-{n}-") as tmp:
        root = (keep or Path(tmp)) / f"scale-{n}"
        data, overrides = write_competition(root, n)
        log = root / "stages.log"
        found = {}
        for label, args in STAGES:
            if label.split()[0] not in stages:
                continue
            found[label] = run_stage(args, data, overrides, log)
            print(f"{n:>6} images  {label:<13} {found[label].seconds:6.1f} s "
                  f"{found[label].peak_mb:6.0f} MB", flush=True)
        return found


def tables(results: dict[int, dict[str, Measured]]) -> list[Table]:
    sizes = sorted(results)
    labels = [label for label, _ in STAGES if any(label in results[n] for n in sizes)]
    rows = []
    for label in labels:
        row = [label]
        for n in sizes:
            m = results[n].get(label)
            row.append(f"{m.seconds:.1f} s, {m.peak_mb:.0f} MB" if m else "not run")
        if len(sizes) > 1 and all(label in results[n] for n in (sizes[0], sizes[-1])):
            first, last = results[sizes[0]][label].seconds, results[sizes[-1]][label].seconds
            row.append(f"{last / first:.1f}x for {sizes[-1] / sizes[0]:.0f}x images")
        else:
            row.append("-")
        rows.append(row)
    headers = ["stage", *[f"{n:,} images" for n in sizes], "growth"]
    notes = [f"Each stage a fresh `python -m pipeline` process (interpreter and imports "
             f"included); {SIZE} px PNGs, 3 classes, a test set of N/{TEST_SHARE}, {FOLDS} folds; "
             f"train and predict: {MODEL}, 1 epoch of 3 batches of 32 per fold, CPU, no workers, "
             f"no TTA.",
             "`runs again` / `report again`: nothing changed since the row above (goal: under "
             "3 s at 16,000 images)."]
    return [Table("Every stage at growing sizes: wall seconds, peak resident memory", headers,
                  rows, notes)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,4000,16000",
                        help="labelled images of each competition, comma-separated")
    parser.add_argument("--stages", default=",".join(label for label, _ in STAGES
                                                     if " " not in label),
                        help="which stages (later ones need the earlier: runs needs folds)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="build the competitions in this folder and keep them")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    about = machine()
    stages = args.stages.split(",")
    results = {int(n): run_size(int(n), stages, args.keep) for n in args.sizes.split(",")}
    record(tables(results), "every stage at growing sizes (bench/scale.py)", about,
           append=not args.no_record)


if __name__ == "__main__":
    main()
