"""Ensemble methods on members of different quality: the gain and the honesty of each method.

    python -m bench.ensembles [--quick] [--members ordinal-look,many-classes] [--epochs 12]

On suite competitions (bench/suite_data.py), seven experiments are trained through the pipeline's
own stages, as a competitor would (`make train predict MODELS=...`): resnet20 at two seeds,
resnet32 at two seeds, resnet20 at 24 px, resnet20 with a classification head (ordinal
members), and one deliberately bad one (a single epoch). `make ensemble` then combines all
seven by each method; each submission is scored on the held-out labels. The table shows, per
method, the CV printed beside the submission (nested: whatever is fitted, it is fitted on the
other folds), the in-sample CV (fitted on the rows it scores), and the held-out score.

The second table is about `auto`'s own honesty: on noise competitions (members that know
nothing), the best of the methods' nested scores is optimistic, because choosing the best is a
fit too; auto's printed CV chooses the method on the other folds for each held fold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import Table, machine, record
from bench.suite import COMMON, held_out, quiet_cli
from bench.suite_data import export_suite
from pipeline.base.config import load_config
from pipeline.base.task import Scorer
from pipeline.ensembling.combine import combine_members
from pipeline.ensembling.members import Member, average_seeds
from pipeline.experiments.layout import Layout

# experiment name -> (model, overrides); "bad" is deliberately undertrained
MEMBERS: dict[str, tuple[str, list[str]]] = {
    "r20-s0": ("resnet20", ["train.seed=0"]),
    "r20-s1": ("resnet20", ["train.seed=1"]),
    "r32-s0": ("resnet32", ["train.seed=0"]),
    "r32-s1": ("resnet32", ["train.seed=1"]),
    "r20-24px": ("resnet20", ["train.seed=2", "augment.image_size=24"]),
    "r20-cls": ("resnet20", ["train.seed=3", "model.head=classification"]),
    "bad-1epoch": ("resnet20", ["train.seed=4", "train.epochs=1"]),
}
METHODS = ["mean", "fitted", "hillclimb", "stack", "auto"]


def where(work: Path) -> list[str]:
    return [f"runs_dir={work / 'runs'}", f"folds.dir={work / 'folds'}",
            f"submissions_dir={work / 'subs'}", f"audit_dir={work / 'audit'}"]


def train_members(data: Path, work: Path, epochs: int, ordinal: bool) -> list[str]:
    names = []
    for name, (model, overrides) in MEMBERS.items():
        if "model.head=classification" in overrides and not ordinal:
            continue
        settings = [*where(work), *COMMON, f"train.epochs={epochs}", *overrides]
        for verb in ("train", "predict"):
            quiet_cli([verb, "--data", str(data), "--model", model, "--name", name, *settings],
                      work / f"{name}.log")
        names.append(name)
    return names


def ensemble_rows(member: str, data: Path, work: Path, names: list[str]) -> list[list]:
    config = load_config(str(data), None, [*where(work), *COMMON])
    rows = []
    for method in METHODS:
        extra = (["ensemble.stacker=ridge"] if method == "stack" and config.data.ordinal
                 else [])
        quiet_cli(["ensemble", "--data", str(data), "--models", " ".join(names),
                   *where(work), *COMMON, f"ensemble.method={method}", *extra,
                   "ensemble.seeds=separate",  # seven members, not the seeds averaged into one
                   f"ensemble.name={method}"], work / "ensemble.log")
        submission = Layout.of(config).submission(method)
        details = json.loads(submission.manifest.read_text())["details"]
        test, _ = held_out(config.data, pd.read_csv(submission.csv, dtype=str,
                                                    keep_default_na=False))
        used = details["method"] + (f" ({details['stacker']['kind']})"
                                    if details["method"] == "stack" else "")
        weights, groups = details["weights"], ["+".join(g) for g in details["groups"]]
        picked = ("-" if weights is None else
                  ", ".join(f"{n} {w:.2f}" for n, w in zip(groups, weights) if w > 0))
        rows.append([member, method, used, picked, details["cv"], details["cv_in_sample"], test])
    return rows


def single_members(member: str, data: Path, work: Path, names: list[str]) -> list[list]:
    """Each member alone: its own CV and held-out score, for scale."""
    config = load_config(str(data), None, [*where(work), *COMMON])
    rows = []
    for name in names:
        quiet_cli(["ensemble", "--data", str(data), "--models", name, *where(work), *COMMON,
                   f"ensemble.name=single-{name}"], work / "ensemble.log")
        submission = Layout.of(config).submission(f"single-{name}")
        details = json.loads(submission.manifest.read_text())["details"]
        test, _ = held_out(config.data, pd.read_csv(submission.csv, dtype=str,
                                                    keep_default_na=False))
        rows.append([member, f"alone: {name}", "", "", details["cv"], details["cv_in_sample"],
                     test])
    return rows


def noise_optimism(seeds: int = 8, n: int = 300, members: int = 12) -> list[list]:
    """On noise members (3 balanced classes, chance 1/3): the best method's nested score vs
    auto's doubly nested CV, averaged over `seeds` noise competitions."""
    scorer = Scorer(("0", "1", "2"), "accuracy", False, 1)
    best, auto, chosen = [], [], []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        targets = rng.permutation(np.arange(n) % 3)
        folds = rng.permutation(np.arange(n) % 5)
        noise = np.random.default_rng(1000 + seed)
        stack = np.stack([noise.dirichlet(np.ones(3), n) for _ in range(members)])
        combined = combine_members(stack, stack[:, :3], targets, "auto", scorer=scorer, row_folds=folds)
        best.append(max(row.score_nested for row in combined.table))
        auto.append(scorer.score(targets, combined.oof_nested))
        chosen.append(combined.fit.label)
    spread = statistics.pstdev
    return [["chance", f"{1 / 3:.3f}", ""],
            ["best method's nested CV (the choice not nested)",
             f"{np.mean(best):.3f} ± {spread(best):.3f}", ""],
            ["auto's CV (the choice nested too)", f"{np.mean(auto):.3f} ± {spread(auto):.3f}",
             ", ".join(sorted(set(chosen)))]]


def seed_average_seconds(n: int = 16_000, seeds: int = 3, classes: int = 5) -> list[list]:
    """Seconds of averaging `seeds` runs of one family (members.average_seeds) over `n` OOF ids
    in shuffled orders, one id missing from each later seed: linear now, quadratic before."""
    rng = np.random.default_rng(0)
    ids, test_ids = [f"{i:06d}" for i in range(n)], [f"t{i:06d}" for i in range(n // 4)]
    members = []
    for seed in range(seeds):
        order = rng.permutation(n)[: n - (1 if seed else 0)]
        members.append(Member(f"m-seed{seed}", [ids[i] for i in order],
                              rng.dirichlet(np.ones(classes), len(order)), test_ids,
                              rng.dirichlet(np.ones(classes), len(test_ids)), "oof", 5, False))
    started = time.perf_counter()
    averaged = average_seeds(members, ["m"] * seeds)
    seconds = time.perf_counter() - started
    return [[f"{n:,}", seeds, len(averaged[0].oof_ids), f"{seconds:.3f}"]]


def scale_table() -> Table:
    return Table("Averaging seeds (ensemble.seeds=average) at scale",
                 ["OOF ids", "seeds", "ids all cover", "seconds"], seed_average_seconds(),
                 ["before the fix (a set of every OOF id rebuilt for each id): 59 s for 3 "
                  "seeds at 16,000 on this 2-core machine (3.8 s at 4,000); issue 26: 7.5 s"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ensembles",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="150 images, 1 epoch")
    parser.add_argument("--members", default="ordinal-look,many-classes")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--scale-only", action="store_true",
                        help="only the seconds of averaging seeds at 16,000 ids (no training)")
    args = parser.parse_args(argv)
    if args.scale_only:
        record([scale_table()], "python -m bench.ensembles --scale-only", machine(),
               append=not args.no_record)
        return
    epochs, n = (1, 150) if args.quick else (args.epochs, args.n)  # 150: 5 images per class
    members = [m for m in args.members.split(",") if m]
    about, started = machine(), time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ensembles-") as tmp:
        root = args.work or Path(tmp)
        configs = export_suite(root / "data", n=n, members=tuple(members))
        for member in members:
            work = root / member
            work.mkdir(parents=True, exist_ok=True)
            data = configs[member]
            quiet_cli(["folds", "--data", str(data), *where(work), *COMMON], work / "folds.log")
            ordinal = load_config(str(data), None, []).data.ordinal
            names = train_members(data, work, epochs, ordinal)
            rows += single_members(member, data, work, names)
            rows += ensemble_rows(member, data, work, names)
            print(f"{member}: done", flush=True)
    headers = ["member", "method", "used", "members picked (weights)", "CV nested",
               "CV in sample", "held-out"]
    tables = [
        Table(f"Ensemble methods over {len(MEMBERS)} members of different quality ({n} labelled "
              f"images, 3 folds, {epochs} epochs; one member trained 1 epoch)", headers, rows,
              ["CV nested: the score beside the submission (weights, selection, stacker, "
               "thresholds and auto's choice fitted on the other folds); in sample: fitted on "
               "the rows it scores", "stack: ridge on expected grades for the ordinal member, "
               "logistic regression on log-probabilities otherwise"]),
        Table("auto on noise: the optimism of choosing the best nested method (8 noise "
              "competitions, 12 members, 300 rows, 5 folds)", ["", "accuracy", "methods chosen"],
              noise_optimism(), []),
    ]
    tables.append(scale_table())
    minutes = (time.perf_counter() - started) / 60
    command = " ".join(sys.argv[1:] if argv is None else argv)
    record(tables, f"python -m bench.ensembles {command} ({minutes:.1f} min)", about,
           append=not args.no_record)


if __name__ == "__main__":
    main()
