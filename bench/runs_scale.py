"""`make runs` over many experiments: the cost of asking every stage whether it is current.

    python -m bench.runs_scale [--quick] [--experiments 20] [--folds 5] [--megabytes 40]

Writes a competition with E experiments of K folds whose best.pt are M MB each (random bytes:
`make runs` never loads a checkpoint, it fingerprints it), with the manifests train and predict
write, then times `python -m pipeline runs` in fresh processes, twice in a row, with the digest
table on (a fresh one: the first run fills it, the second reads it) and off (every run hashes
every checkpoint, as before the table existed). The files were just written, so they are in the
page cache: a cold disk makes the "off" and first runs slower still, the second "on" run not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench import Table, machine, record
from pipeline.base.config import load_config, save_config
from pipeline.experiments.freshness import (
    predict_inputs,
    read_folds,
    read_test_set,
    training_inputs,
)
from pipeline.experiments.layout import Layout
from pipeline.experiments.manifests import write_manifest
from pipeline.stages.folds import write_folds

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b"]


def write_competition(root: Path, rows: int, folds: int) -> tuple[str, list[str]]:
    """A competition without images on disk (runs reads none), and its fold file."""
    root.mkdir(parents=True)
    ids = [f"{i:05d}" for i in range(rows)]
    labels = [CLASSES[i % 2] for i in range(rows)]
    pd.DataFrame({"id": ids, "label": labels}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": ["t0", "t1"]}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"id": ["t0", "t1"], "label": "a"}).to_csv(root / "sample_submission.csv",
                                                            index=False)
    data = root / "scale.yaml"
    data.write_text(yaml.safe_dump({"name": "scale", "root": str(root), "classes": CLASSES}))
    overrides = [f"runs_dir={root / 'runs'}", f"folds.dir={root / 'folds'}",
                 f"folds.n_splits={folds}"]
    config = load_config(str(data), None, overrides)
    table = pd.DataFrame({"id": ids, "label": labels, "fold": np.arange(rows) % folds})
    write_folds(config, table)
    return str(data), overrides


def write_experiment(data: str, overrides: list[str], name: str, megabytes: int,
                     rng: np.random.Generator) -> None:
    """One experiment as train and predict leave it: config, per fold best.pt, OOF, test
    probabilities, log and the two manifests."""
    config = load_config(data, "resnet20", overrides, name=name)
    layout = Layout.of(config)
    folds = read_folds(config.data, config.folds, layout)
    exp = layout.experiment(name)
    save_config(config, exp.config)
    inputs, details = training_inputs(config, folds, layout)
    test_ids, test_fingerprint = read_test_set(config.data)
    for k in sorted(folds["fold"].unique()):
        part = exp.fold(int(k))
        part.dir.mkdir(parents=True)
        part.best.write_bytes(rng.bytes(megabytes << 20))
        valid = folds[folds["fold"] == k]
        pd.DataFrame({"id": valid["id"], "label": valid["label"], "a": 0.5, "b": 0.5}).to_csv(
            part.oof, index=False)
        pd.DataFrame({"epoch": [1], "accuracy": [0.5], "valid_loss": [0.7],
                      "seconds": [1.0]}).to_csv(part.log, index=False)
        save_config(config, part.config)
        pd.DataFrame({"id": test_ids, "a": 0.5, "b": 0.5}).to_csv(part.test_probs, index=False)
        write_manifest(part.train_manifest, "train", inputs, part.trained_outputs(), details=details)
        write_manifest(part.predict_manifest, "predict",
                       predict_inputs(part, config.tta, test_fingerprint, valid),
                       [part.test_probs], details={"tta": config.tta.model_dump()})


def time_runs(data: str, overrides: list[str], state: str) -> float:
    """Seconds of one `python -m pipeline runs` in a fresh process, digest table at `state`."""
    env = {**os.environ, "PIPELINE_STATE": state}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "runs", "--data", data, *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or "complete" not in done.stdout:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    return seconds


def run(experiments: int, folds: int, megabytes: int) -> list[Table]:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as tmp:
        data, overrides = write_competition(Path(tmp) / "scale", 400, folds)
        for e in range(experiments):
            write_experiment(data, overrides, f"exp{e:03d}", megabytes, rng)
        blocker = Path(tmp) / "a-file"
        blocker.write_text("")
        off = str(blocker / "digests.sqlite")  # cannot be opened: every digest is computed
        on = str(Path(tmp) / "state" / "digests.sqlite")
        rows = []
        for label, state in (("off (before)", off), ("on (after)", on)):
            first, second = time_runs(data, overrides, state), time_runs(data, overrides, state)
            rows.append([label, f"{first:.1f}", f"{second:.1f}"])
    gigabytes = experiments * folds * megabytes / 1024
    return [Table(f"`make runs` over {experiments} experiments x {folds} folds, best.pt of "
                  f"{megabytes} MB each ({gigabytes:.1f} GB of checkpoints): seconds per fresh "
                  f"process", ["digest table", "first run", "second run"], rows,
                  ["Each run also reads every manifest, stats every file and reads the OOF and "
                   "log files; only the checkpoints' hashing is remembered."])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.runs_scale",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 experiments of 2 folds, 20 MB")
    parser.add_argument("--experiments", type=int, default=20)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=40)
    args = parser.parse_args(argv)
    sizes = (4, 2, 20) if args.quick else (args.experiments, args.folds, args.megabytes)
    about = machine()
    record(run(*sizes), "runs over many experiments" + (" (quick)" if args.quick else ""), about)


if __name__ == "__main__":
    main()
