"""Which rule should choose a fold's best epoch? Each rule's chosen epoch, scored on held-out labels.

    OMP_NUM_THREADS=1 python -m bench.epoch_rule [--quick] [--seeds 0,1,2] [--epochs 10] [--n 450]

The training trajectory does not depend on the rule, only which epoch is kept does: so each suite
member (bench/suite_data.py) x seed is trained once (resnet20, the pipeline's defaults, fold 0 of
3, every epoch's weights kept through train.average_best), every epoch predicts its validation
fold and the held-out test part, and then each rule picks an epoch from the validation numbers:

- in_sample: the metric after the submission's decoder fitted on the validation fold and scored
  on it (the rule before issue 25, for ordinal QWK and binary F1 competitions);
- metric / loss / cross_fit: train.epoch_rule's choices (pipeline/base/task.py, EpochRule),
  scored by the loop's own selection_value.

The chosen epoch is scored as a submission is: the competition's label decoder (thresholds,
cut-off, argmax) fitted on that epoch's validation predictions, applied to the test part, and
scored against its labels. The rule for a default (README, "Training recipes"): not worse beyond
the seed-to-seed std on any member, better on one.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import Table, machine, record
from bench.suite import COMMON, quiet_cli
from bench.suite_data import MEMBERS, export_suite
from pipeline.base.config import TTAConfig, load_config
from pipeline.base.metrics import fit_cutoff, labels_at_cutoff
from pipeline.base.task import Decoder, EpochRule, Task
from pipeline.data.tables import load_test_ids, test_image_paths, train_image_paths
from pipeline.ensembling.decode import (
    apply_thresholds,
    decoded_score,
    expected_grade,
    fit_thresholds,
)
from pipeline.ensembling.submission import read_solution
from pipeline.experiments.layout import Layout
from pipeline.inference.engine import load_checkpoint, save_checkpoint
from pipeline.inference.predictor import CheckpointPredictor
from pipeline.training.loop import output_views, selection_value

RULES = ("in_sample", "metric", "loss", "cross_fit")


@dataclasses.dataclass
class Epoch:
    """One epoch's predictions: validation fold and test part, as the loop's views see them."""

    loss: float
    valid: list[np.ndarray]  # output_views of the validation fold, each (N_valid, C)
    test: list[np.ndarray]  # the same views of the test part


def predict_epochs(config_path: Path, work: Path, name: str, seed: int,
                   epochs: int) -> tuple[Task, np.ndarray, np.ndarray, list[Epoch]]:
    """Train fold 0 once keeping every epoch; (task, valid targets, test targets, epochs)."""
    where = [f"runs_dir={work / 'runs'}", f"folds.dir={work / 'folds'}",
             f"audit_dir={work / 'audit'}"]
    overrides = [*where, *COMMON, f"train.epochs={epochs}", f"train.seed={seed}",
                 f"train.average_best={epochs}"]  # keeps top/epoch<e>.pt of every epoch
    quiet_cli(["folds", "--data", str(config_path), *where, *COMMON], work / "folds.log")
    quiet_cli(["train", "--data", str(config_path), "--model", "resnet20", "--name", name,
               "--folds", "0", *overrides], work / f"{name}.log")
    config = load_config(str(config_path), "resnet20", overrides, name=name)
    layout, data, task = Layout.of(config), config.data, config.task
    folds = pd.read_csv(layout.folds_csv, dtype=str, keep_default_na=False)
    valid = folds[folds["fold"] == "0"]
    test_ids = load_test_ids(data)
    solution = read_solution(data).set_index(data.id_column)[data.label_column]
    part = layout.experiment(name).fold(0)
    log = pd.read_csv(part.log)
    best = load_checkpoint(part.best)
    predicted = []
    for epoch in range(epochs):
        payload = {**best, "model": load_checkpoint(part.top(epoch))["model"]}
        save_checkpoint(payload, work / "epoch.pt")
        predictor = CheckpointPredictor(work / "epoch.pt", TTAConfig(), "cpu", workers=0)
        views = [output_views(p.probs, p.grade, task) for p in (
            predictor.predict(train_image_paths(data, valid["id"].tolist()), "valid"),
            predictor.predict(test_image_paths(data, test_ids), "test"))]
        predicted.append(Epoch(float(log["valid_loss"].iloc[epoch]), *views))
    return (task, task.targets(valid["label"]), task.targets(solution.loc[test_ids]), predicted)


def rule_value(rule: str, task: Task, targets: np.ndarray, epoch: Epoch) -> float:
    if rule == "in_sample":  # the old rule: fitted and scored on the same rows
        if task.label_decoder is Decoder.ARGMAX:
            return selection_value(task, targets, epoch.valid, epoch.loss)
        return max(decoded_score(task.label_decoder, task.metric, targets, v, positive=task.positive)
                   for v in epoch.valid)
    ruled = dataclasses.replace(task, epoch_rule=EpochRule(rule))
    return selection_value(ruled, targets, epoch.valid, epoch.loss)


def chosen_epoch(rule: str, task: Task, targets: np.ndarray, epochs: list[Epoch]) -> int:
    """The first epoch with the best value, as the loop keeps it (strict improvement)."""
    values = np.array([rule_value(rule, task, targets, e) for e in epochs])
    lower = rule == "loss" or not task.higher_is_better
    values = np.where(np.isnan(values), np.inf if lower else -np.inf, values)
    return int(np.argmin(values) if lower else np.argmax(values))


def held_out(task: Task, valid_targets: np.ndarray, test_targets: np.ndarray,
             epoch: Epoch) -> float:
    """The metric on the test part as submitted: the label decoder fitted on the validation
    fold (the better view there, as the ensemble chooses), applied to the test part."""
    best_view = max(range(len(epoch.valid)),
                    key=lambda i: task.score(valid_targets, epoch.valid[i]))
    valid, test = epoch.valid[best_view], epoch.test[best_view]
    if task.label_decoder is Decoder.THRESHOLDS:
        cuts = fit_thresholds(expected_grade(valid), valid_targets, task.n_classes)
        labels = apply_thresholds(expected_grade(test), cuts)
    elif task.label_decoder is Decoder.CUTOFF:
        cutoff = fit_cutoff(valid_targets, valid[:, task.positive], task.metric, task.positive)
        labels = labels_at_cutoff(test, cutoff, task.positive)
    else:
        labels = test.argmax(axis=1)
    return task.score_labels(test_targets, labels)


def run(root: Path, members: list[str], seeds: list[int], epochs: int, n: int) -> list[dict]:
    results = []
    for seed in seeds:
        configs = export_suite(root / f"data{seed}", n=n, seed=seed, members=tuple(members))
        for member in members:
            work = root / f"{member}-s{seed}"
            work.mkdir(parents=True, exist_ok=True)
            task, valid_t, test_t, predicted = predict_epochs(configs[member], work, "r20",
                                                              seed, epochs)
            for rule in RULES:
                epoch = chosen_epoch(rule, task, valid_t, predicted)
                score = held_out(task, valid_t, test_t, predicted[epoch])
                results.append({"member": member, "seed": seed, "rule": rule,
                                "metric": task.metric, "epoch": epoch + 1, "held_out": score})
                print(f"{member:15s} seed {seed} {rule:10s} epoch {epoch + 1:2d}: held-out "
                      f"{task.metric} {score:.4f}", flush=True)
    return results


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


def summary(results: list[dict]) -> list[list]:
    frame = pd.DataFrame(results)
    rows = []
    for member in dict.fromkeys(frame["member"]):
        of = frame[frame["member"] == member]
        cells = [mean_std(of[of["rule"] == r]["held_out"].tolist()) for r in RULES]
        epochs = [", ".join(str(e) for e in of[of["rule"] == r]["epoch"]) for r in RULES]
        rows.append([member, of["metric"].iloc[0], *cells, " / ".join(epochs)])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.epoch_rule",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="120 images, 2 epochs, seed 0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--members", default=",".join(MEMBERS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n", type=int, default=450, help="labelled images per member")
    parser.add_argument("--no-record", action="store_true", help="print, do not append")
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    epochs, n = (2, 120) if args.quick else (args.epochs, args.n)
    members = [m for m in args.members.split(",") if m]
    about, started = machine(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-epoch-rule-") as tmp:
        results = run(Path(tmp), members, seeds, epochs, n)
    table = Table(f"Epoch rule: held-out metric of the epoch each rule keeps, mean ± std over "
                  f"seeds {seeds} (resnet20, defaults, {n} labelled images, fold 0 of 3, "
                  f"{epochs} epochs)", ["member", "metric", *RULES, "epochs kept (per rule, "
                                        "per seed)"], summary(results),
                  ["held-out: the test part's labels, decoded as a submission (the label "
                   "decoder fitted on the kept epoch's validation fold)",
                   "in_sample: the rule before issue 25 (decoder fitted and scored on the "
                   "validation fold); metric, loss, cross_fit: train.epoch_rule"])
    minutes = (time.perf_counter() - started) / 60
    command = " ".join(sys.argv[1:] if argv is None else argv)
    record([table], f"python -m bench.epoch_rule {command} ({minutes:.1f} min)", about,
           append=not args.no_record)


if __name__ == "__main__":
    main()
