"""Which training recipe wins, measured: OOF scores of each recipe alone and together, over seeds.

    python -m bench.recipes [--quick] [--seeds 0,1,2] [--only ordinal,digits]

Two competitions, both built from data that ships in a package: an imbalanced five-grade ordinal
one (bench/ordinal_data.py: retina-like grade shares, two "eyes" per "patient", label and image
noise; metric QWK) and the digits demo (accuracy). Each recipe trains every fold of our
resnet20 at 16 px for a few epochs, once per seed, through the pipeline's own `train`; the scores
come from the fold runs' oof.csv (`--quick`: a 100-image export, one epoch, to check the
wiring):

- QWK and macro-F1 of argmax, and of thresholds fitted out of fold (nested: each fold's
  thresholds fitted on the other folds, pipeline/ensembling/decode.py): what the ensemble would submit;
- accuracy.

The table gives mean ± std over the seeds; the seed-to-seed std is the margin a recipe must
beat. The results are appended to bench/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench import Table, machine, record
from pipeline.base.metrics import score, score_labels
from pipeline.base.task import targets_of
from pipeline.ensembling.decode import decode_thresholds
from pipeline.experiments.layout import Layout
from pipeline.experiments.probfiles import read_probs

# recipe -> overrides; the baseline is the pipeline's plain classifier decoded by argmax
RECIPES = {
    "baseline (CE)": [],  # the baseline: argmax; every recipe: thresholds fitted out of fold
    "sqrt_inverse class weights": ["train.class_weights=sqrt_inverse"],
    "regression head": ["model.head=regression"],
    "EMA": ["train.ema=true", "train.ema_decay=0.99"],
    "mixup 0.4": ["train.mixup=0.4"],
    "regression + EMA": ["model.head=regression", "train.ema=true", "train.ema_decay=0.99"],
    "together: regression + EMA + mixup": ["model.head=regression", "train.ema=true",
                                 "train.ema_decay=0.99", "train.mixup=0.4"],
}
DIGITS_RECIPES = ["baseline (CE)", "EMA", "mixup 0.4"]
COMMON = ["model.name=resnet20", "train.batch_size=32", "train.lr=0.05", "train.workers=0",
          "folds.n_splits=3", "ensemble.decode=argmax"]  # scored here, both decodings, from oof.csv
# per competition: the ordinal one keeps its 32 px (its lesions are a few pixels wide); the 8x8
# digits need no more than 16 px
SIZES = {"ordinal": ["augment.image_size=32"],
         "digits": ["augment.image_size=16", "augment.interpolation=linear"]}


def run_recipe(data: str, overrides: list[str], seed: int, epochs: int,
               work: Path) -> pd.DataFrame:
    """Train every fold of one recipe and seed; return the concatenated oof.csv."""
    from pipeline.__main__ import main as cli
    from pipeline.base.config import load_config

    paths = [f"folds.dir={work / 'folds'}", f"runs_dir={work / 'runs'}",
             f"audit_dir={work / 'audit'}"]
    argv = [*paths, *COMMON, f"train.epochs={epochs}", f"train.seed={seed}", *overrides]
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        if cli(["folds", "--data", data, *paths, "folds.n_splits=3"]) != 0:
            raise RuntimeError(quiet.getvalue()[-2000:])
        if cli(["train", "--data", data, "--model", "resnet20", *argv]) != 0:
            raise RuntimeError(quiet.getvalue()[-2000:])
    config = load_config(data, "resnet20", argv)
    layout = Layout.of(config)
    exp = layout.experiment(config.run_name)
    return pd.concat([read_probs(exp.fold(k).oof) for k in layout.fold_numbers(exp.name)])


def oof_scores(oof: pd.DataFrame, folds: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    probs = oof[classes].to_numpy(np.float64)
    targets = targets_of(oof["label"], classes)
    row_folds = folds.set_index("id").loc[oof["id"], "fold"].to_numpy()
    decoded = decode_thresholds(probs, probs[:1], targets, row_folds)
    n = len(classes)
    return {"qwk argmax": score("qwk", targets, probs),
            "qwk thresholds (nested)": decoded.score_nested,
            "macro-F1 argmax": score("macro_f1", targets, probs),
            "macro-F1 thresholds (nested)": score_labels("macro_f1", targets,
                                                         decoded.nested_labels, n),
            "accuracy": score("accuracy", targets, probs)}


def competition(name: str, work: Path, quick: bool) -> tuple[str, list[str]]:
    """(config path, recipes) of a benchmark competition, exported into `work`."""
    if name == "ordinal":
        from bench.ordinal_data import export_ordinal

        return str(export_ordinal(work / "ordinal", n=100 if quick else 600, seed=0)), list(RECIPES)
    from pipeline.stages.demo_data import export_digits

    root = export_digits(work / "digits")
    config = work / "digits.yaml"
    text = Path("configs/data/digits.yaml").read_text().replace("root: data/digits",
                                                                  f"root: {root}")
    config.write_text(text)
    return str(config), DIGITS_RECIPES


def run(quick: bool = False, seeds: list[int] = (0, 1, 2),
        only: list[str] = ("ordinal", "digits"), recipes: list[str] | None = None) -> list[Table]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tables = []
    for name in only:
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        data, available = competition(name, work, quick)
        chosen = [r for r in available if recipes is None or r in recipes]
        epochs = 1 if quick else 8
        rows, baseline = [], None
        for recipe in chosen:
            started, per_seed = time.perf_counter(), []
            for seed in seeds:
                oof = run_recipe(data, SIZES[name] + RECIPES[recipe], seed, epochs, work)
                folds = pd.read_csv(next((work / "folds").glob("*.csv")), dtype=str,
                                    keep_default_na=False)
                classes = [c for c in oof.columns if c not in ("id", "label", "grade")]
                per_seed.append(oof_scores(oof, folds, classes))
            metrics = list(per_seed[0])
            means = {m: statistics.mean(s[m] for s in per_seed) for m in metrics}
            stds = {m: statistics.pstdev(s[m] for s in per_seed) for m in metrics}
            baseline = baseline or means
            rows.append([recipe, *[f"{means[m]:.4f} ± {stds[m]:.4f}" for m in metrics],
                         f"{means[metrics[1]] - baseline[metrics[0]]:+.4f}",
                         f"{(time.perf_counter() - started) / 60:.1f}"])
            print(f"{name}: {recipe}: " + ", ".join(f"{m} {means[m]:.4f}" for m in metrics),
                  flush=True)
        headers = ["recipe", *metrics, "qwk (nested thresholds) - baseline argmax", "minutes"]
        tables.append(Table(
            f"Recipes on the {name} competition: OOF mean ± std over seeds {list(seeds)} "
            f"(resnet20, {SIZES[name][0].split('=')[1]} px, {epochs} epochs, 3 folds)",
            headers, rows,
            ["thresholds are fitted out of fold (nested): the figure a submission would get",
             "a recipe helps when its gain exceeds the baseline's seed-to-seed std"]))
    return tables


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.recipes", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="ordinal,digits")
    parser.add_argument("--recipes", default=None, help="comma-separated names of RECIPES")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = None if args.recipes is None else [r.strip() for r in args.recipes.split(",")]
    for name in [n.strip() for n in args.only.split(",")]:  # each recorded as soon as it is done
        about = machine(torch.device("cpu"))
        started = time.perf_counter()
        tables = run(args.quick, seeds, [name], recipes)
        record(tables, f"python -m bench.recipes --only {name} --seeds {args.seeds}"
                       f"{' --quick' if args.quick else ''} "
                       f"({(time.perf_counter() - started) / 60:.1f} min)", about)


if __name__ == "__main__":
    main()
