"""The benchmark suite: every recipe on every kind of competition, scored on held-out labels.

    python -m bench.suite [--quick] [--seeds 0,1] [--members digits,ordinal-look]
                          [--recipes default,regression] [--epochs 12] [--n 600]

Six competitions (bench/suite_data.py: balanced multi-class, an ordinal grade that is an amount,
an ordinal grade that is a look, imbalanced binary, many classes with few images, noisy labels),
each with a held-out test part. Each recipe is a set of overrides of the pipeline's defaults
(or "auto <minutes>": `make auto` with that budget, its portfolio chosen from the images); it
runs through the pipeline's own stages, as a competitor would: `make train`, `make predict` and
`make ensemble` of that one experiment (resnet20, 3 folds, once per seed), and the submission is
scored against the held-out labels: the competition's metric and macro-F1. Beside them: the CV
the ensemble printed (nested: whatever it fitted, it fitted on other folds), how many classes the
submission predicts (1: it collapsed to one class), and the minutes.

The rule for a default (README.md, "Training recipes"): it changes only when on the suite it is
not worse beyond the seed-to-seed std on any member and better on one. `--quick` runs a tiny
version (150 images, 1 epoch, one seed) to check the wiring, as tests/test_suite.py does. The
tables are appended to bench/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench import Table, machine, record
from bench.suite_data import MEMBERS, export_suite
from pipeline.__main__ import main as cli
from pipeline.base.config import load_config
from pipeline.base.task import Scorer
from pipeline.ensembling.submission import read_solution
from pipeline.experiments.layout import Layout

# recipe -> overrides of the pipeline's defaults (the experiment file is resnet20's: none)
ADAMW = ["train.optimizer=adamw", "train.weight_decay=0.05"]
RECIPES: dict[str, list[str]] = {
    "default": [],
    # the optimiser and its schedule (the 0.2 defaults: SGD, lr 0.05, 1 warm-up epoch)
    "SGD lr0.05 wu1": ["train.optimizer=sgd", "train.lr=0.05", "train.warmup_epochs=1",
                       "train.weight_decay=0.0005"],
    "SGD lr0.02 wu1": ["train.optimizer=sgd", "train.lr=0.02", "train.warmup_epochs=1",
                       "train.weight_decay=0.0005"],
    "SGD lr0.05 wu3": ["train.optimizer=sgd", "train.lr=0.05", "train.warmup_epochs=3",
                       "train.weight_decay=0.0005"],
    "SGD lr0.1 wu1": ["train.optimizer=sgd", "train.lr=0.1", "train.warmup_epochs=1",
                      "train.weight_decay=0.0005"],
    "AdamW lr3e-4": [*ADAMW, "train.lr=0.0003"],
    "AdamW lr1e-3": [*ADAMW, "train.lr=0.001"],
    "AdamW lr3e-3": [*ADAMW, "train.lr=0.003"],
    # the heads (ordinal members), each under the default optimiser
    "classification": ["model.head=classification"],
    "regression": ["model.head=regression"],
    "both": ["model.head=both"],
    # the decoding (ordinal and binary members: thresholds or a cut-off, nested, are the default)
    "decode argmax": ["ensemble.decode=argmax"],
    # the other recipes
    "no class weights": ["train.class_weights=none"],  # the default until 2026-12-02
    "EMA": ["train.ema=true", "train.ema_decay=0.99"],
    "mixup 0.2": ["train.mixup=0.2"],
    # the stem of an ImageNet-family ResNet at the suite's 16-32 px (issue 28: `model.stem`)
    "resnet18": ["model.name=resnet18"],
    "resnet18 stem auto": ["model.name=resnet18", "model.stem=auto"],
    # progressive resizing (issue 28): half the size for the first half of the epochs
    "progressive": ["augment.sizes=progressive"],
}
COMMON = ["train.batch_size=32", "train.workers=0", "folds.n_splits=3"]
ORDINAL = ("ordinal-amount", "ordinal-look")


@dataclass
class Result:
    member: str
    recipe: str
    seed: int
    metric: str
    test: float  # the competition's metric of the submission on the held-out labels
    test_macro_f1: float
    cv: float  # the CV beside the submission (nested)
    classes_predicted: int
    minutes: float


def quiet_cli(argv: list[str], log: Path) -> None:
    """Run one `python -m pipeline` verb in this process, its output appended to `log`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli(argv)
    with open(log, "a") as f:
        f.write(f"$ python -m pipeline {' '.join(argv)}\n{out.getvalue()}\n")
    if code != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} failed (exit {code}); see {log}")


def run_recipe(data: Path, work: Path, recipe: str, seed: int, epochs: int,
               base: list[str] = (), shared: list[str] = (), suffix: str = "") -> Result:
    """Train, predict and ensemble one recipe at one seed (after the `base` overrides: a
    candidate default); score its submission. `shared`: settings every verb must see, the
    ensemble's included (how the folds are made); `suffix` tells apart experiments of one
    recipe and seed that differ in `base`."""
    started = time.perf_counter()
    name = f"{recipe.replace(' ', '_')}-s{seed}{suffix}"
    where = [f"runs_dir={work / 'runs'}", f"folds.dir={work / 'folds'}",
             f"submissions_dir={work / 'subs'}", f"pseudo_dir={work / 'pseudo'}",
             f"audit_dir={work / 'audit'}", *shared]
    overrides = [*where, *COMMON, f"train.epochs={epochs}", f"train.seed={seed}", *base,
                 *RECIPES[recipe]]
    log = work / f"{name}.log"
    for verb in ("train", "predict"):
        quiet_cli([verb, "--data", str(data), "--model", "resnet20", "--name", name, *overrides],
                  log)
    quiet_cli(["ensemble", "--data", str(data), "--models", name, *where, *COMMON,
               f"ensemble.name={name}"], log)
    config = load_config(str(data), None, [*where, *COMMON])
    submission = Layout.of(config).submission(name)
    frame = pd.read_csv(submission.csv, dtype=str, keep_default_na=False)
    cv = json.loads(submission.manifest.read_text())["details"]["cv"]
    test, macro = held_out(config.data, frame)
    label = config.data.label_column if config.data.label_column in frame else frame.columns[1]
    return Result(data.stem, recipe, seed, config.data.metric, test, macro, cv,
                  frame[label].nunique(), (time.perf_counter() - started) / 60)


def run_auto(data: Path, work: Path, recipe: str, seed: int) -> Result:
    """`make auto` with the budget the recipe names ("auto 10": 10 minutes) on one member at
    one seed: its portfolio chosen from the member's images, as many members as the budget
    fits (each under its share of the budget, at the epochs that fit it: `epochs` is not
    passed, as a user would not), the `auto` ensemble; its submission scored on the held-out
    labels."""
    started = time.perf_counter()
    budget = recipe.split()[1]
    where = [f"runs_dir={work / f'auto{budget}-s{seed}'}", f"folds.dir={work / 'folds'}",
             f"submissions_dir={work / f'subs-auto{budget}-s{seed}'}",
             f"reports_dir={work / 'reports'}", f"audit_dir={work / 'audit'}"]
    log = work / f"auto{budget}-s{seed}.log"
    quiet_cli(["auto", "--data", str(data), "--budget", budget, *where, *COMMON,
               f"train.seed={seed}"], log)
    config = load_config(str(data), None, [*where, *COMMON])
    manifest = max(Layout.of(config).submission_manifests(), key=lambda p: p.stat().st_mtime)
    details = json.loads(manifest.read_text())["details"]
    frame = pd.read_csv(Layout.of(config).submission(manifest.name[:-len(".manifest.json")]).csv,
                        dtype=str, keep_default_na=False)
    test, macro = held_out(config.data, frame)
    label = config.data.label_column if config.data.label_column in frame else frame.columns[1]
    print(f"{data.stem}: auto {budget} min trained {details['members']}", flush=True)
    return Result(data.stem, recipe, seed, config.data.metric, test, macro, details["cv"],
                  frame[label].nunique(), (time.perf_counter() - started) / 60)


def held_out(data, frame: pd.DataFrame) -> tuple[float, float]:
    """(the competition's metric, macro-F1) of a label submission against solution.csv."""
    solution = read_solution(data).set_index(data.id_column)[data.label_column]
    label = data.label_column if data.label_column in frame else frame.columns[1]
    scorer = Scorer.of(data)
    truth = scorer.targets(solution.loc[frame[data.id_column]])
    predicted = scorer.targets(frame[label])
    return (scorer.score_labels(truth, predicted),
            scorer.score_labels(truth, predicted, "macro_f1"))


def recipes_for(member: str, chosen: list[str]) -> list[str]:
    """The heads are compared on the ordinal members only (the others have no grade), the
    decoding on the ordinal and binary ones (the others decode by argmax anyway)."""
    heads, decoding = {"classification", "regression", "both"}, {"decode argmax"}
    return [r for r in chosen if (member in ORDINAL or r not in heads)
            and (member in (*ORDINAL, "binary") or r not in decoding)]


def run_suite(root: Path, members: list[str], recipes: list[str], seeds: list[int], epochs: int,
              n: int, base: list[str] = ()) -> list[Result]:
    configs = export_suite(root / "data", n=n, members=tuple(members))
    results = []
    for member in members:
        work = root / member
        work.mkdir(parents=True, exist_ok=True)
        quiet_cli(["folds", "--data", str(configs[member]), f"folds.dir={work / 'folds'}",
                   f"runs_dir={work / 'runs'}", f"audit_dir={work / 'audit'}", *COMMON],
                  work / "folds.log")
        for recipe in recipes_for(member, recipes):
            for seed in seeds:
                result = (run_auto(configs[member], work, recipe, seed)
                          if recipe.startswith("auto ") else
                          run_recipe(configs[member], work, recipe, seed, epochs, base))
                print(f"{member:15s} {recipe:22s} seed {seed}: test {result.metric} "
                      f"{result.test:.4f}, macro-F1 {result.test_macro_f1:.4f}, cv "
                      f"{result.cv:.4f}, {result.classes_predicted} classes, "
                      f"{result.minutes:.1f} min", flush=True)
                results.append(result)
    return results


def is_auto(recipe: str) -> bool:
    """"auto 10": `make auto` with a budget of 10 minutes a member of the suite."""
    parts = recipe.split()
    return len(parts) == 2 and parts[0] == "auto" and parts[1].replace(".", "", 1).isdigit()


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


def summary(results: list[Result]) -> list[list]:
    """One row per member and recipe: means ± std over the seeds."""
    rows = []
    keys = list(dict.fromkeys((r.member, r.recipe) for r in results))
    for member, recipe in keys:
        group = [r for r in results if (r.member, r.recipe) == (member, recipe)]
        rows.append([member, recipe, group[0].metric, mean_std([r.test for r in group]),
                     mean_std([r.test_macro_f1 for r in group]), mean_std([r.cv for r in group]),
                     min(r.classes_predicted for r in group),
                     f"{sum(r.minutes for r in group):.1f}"])
    return rows


HEADERS = ["member", "recipe", "metric", "held-out metric", "held-out macro-F1",
           "CV (nested)", "classes predicted (min)", "minutes (all seeds)"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="150 images, 1 epoch, seed 0")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--members", default=",".join(MEMBERS))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--n", type=int, default=600, help="labelled images per member")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--no-record", action="store_true", help="print, do not append")
    parser.add_argument("--base", default="", help="overrides before every recipe's (a "
                        "candidate default), e.g. 'train.optimizer=adamw train.lr=0.001'")
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    epochs, n = (1, 150) if args.quick else (args.epochs, args.n)  # 150: 5 images per class
    members = [m for m in args.members.split(",") if m]
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = sorted((set(members) - set(MEMBERS))
                     | {r for r in recipes if r not in RECIPES and not is_auto(r)})
    if unknown:
        parser.error(f"unknown member(s) or recipe(s): {unknown}")
    about, started = machine(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        results = run_suite(args.work or Path(tmp), members, recipes, seeds, epochs, n,
                            args.base.split())
    base = f"; every recipe after {args.base}" if args.base else ""
    table = Table(f"Benchmark suite: held-out scores, mean ± std over seeds {seeds} (resnet20, "
                  f"{n} labelled images, 3 folds, {epochs} epochs{base})", HEADERS,
                  summary(results),
                  ["held-out: the submission of `make ensemble` scored on the test part's "
                   "labels; CV: the nested CV printed beside it",
                   "classes predicted 1: the submission predicts one class (a collapse)"])
    minutes = (time.perf_counter() - started) / 60
    command = " ".join(sys.argv[1:] if argv is None else argv)
    record([table], f"python -m bench.suite {command} ({minutes:.1f} min)", about,
           append=not args.no_record)


if __name__ == "__main__":
    main()
