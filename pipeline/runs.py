"""Every experiment of a competition in one table, and what each stage of one was made from.

    python -m pipeline runs --data digits                    # make runs
    python -m pipeline status --data digits --model resnet18  # make status MODEL=resnet18

`runs` is the page to open every morning: per experiment its model, image size, epochs, seed,
cross-validation (mean ± std over the folds, and out of fold), the TTA gain, its status (complete,
partial, stale and why), the training time and the submissions built from it (marked when they
no longer match their members). Written to runs/<competition>/leaderboard.csv|md, with a plot of
the experiments' CV in leaderboard.png.

`status` lists, for one experiment, every stage's manifest: its state under the one freshness
rule (provenance.py), the input fingerprints it recorded, and why it is not current.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config, load_config
from pipeline.ensemble import discover_runs, experiment_config, submission_freshness
from pipeline.folds import folds_freshness, folds_manifest
from pipeline.metrics import score
from pipeline.predict import prediction_freshness, read_probs, read_test_set
from pipeline.provenance import Freshness, freshness, manifest_path, read_manifest
from pipeline.train import train_freshness, training_inputs
from pipeline.utils import PipelineError, format_table, markdown_table, warn, write_csv_atomic, \
    write_text_atomic


@dataclass
class FoldState:
    fold: int
    train: Freshness
    predict: Freshness | None  # None: not trained, nothing to predict


@dataclass
class ExperimentState:
    name: str
    config: Config
    folds: list[FoldState] = field(default_factory=list)
    refit: Freshness | None = None
    error: str | None = None  # the folds file cannot be read: every fold is stale

    @property
    def current_folds(self) -> list[int]:
        return [f.fold for f in self.folds if f.train.current]

    def status(self) -> str:
        if self.error:
            return f"stale: {self.error}"
        stale = [f for f in self.folds if f.train.state == "stale"]
        if stale:
            return f"stale: fold {stale[0].fold}: {stale[0].train.why()}"
        done = self.current_folds
        if not done:
            return "not trained"
        unpredicted = [f.fold for f in self.folds if f.train.current and
                       not (f.predict and f.predict.current)]
        text = "complete" if len(done) == len(self.folds) else f"partial ({len(done)} of {len(self.folds)} folds)"
        if unpredicted:
            text += f", fold(s) {unpredicted} to predict"
        if self.refit is not None:
            text += ", refit" + ("" if self.refit.current else " stale")
        return text


def read_folds_unchecked(config: Config) -> pd.DataFrame:
    frame = pd.read_csv(config.folds_csv, dtype={"id": str, "label": str, "group": str},
                        keep_default_na=False)
    index = {name: i for i, name in enumerate(config.data.classes)}
    return frame.assign(target=frame["label"].map(index))


def experiment_state(config: Config, name: str, folds: pd.DataFrame, test_fingerprint: str,
                     folds_error: str | None) -> ExperimentState | None:
    member = experiment_config(config.competition_runs / name)
    if member is None:
        return None
    state = ExperimentState(name, member, error=folds_error)
    inputs, details = training_inputs(member, folds)
    for k in sorted(int(f) for f in folds["fold"].unique()):
        trained = train_freshness(member, k, inputs, details)
        if folds_error and trained.state == "current":
            trained = Freshness("stale", [folds_error], trained.manifest)
        predicted = None
        fold_dir = member.run_dir / f"fold{k}"
        if trained.current:
            predicted = prediction_freshness(member, fold_dir, test_fingerprint,
                                             folds[folds["fold"] == k])
        state.folds.append(FoldState(k, trained, predicted))
    full = member.run_dir / "full"
    if (full / "train.manifest.json").is_file():
        from pipeline.refit import refit_inputs

        try:
            refit_in, refit_details, *_ = refit_inputs(member, folds)
            state.refit = freshness(manifest_path(full, "train"), refit_in, refit_details)
        except PipelineError as err:
            state.refit = Freshness("stale", [str(err)])
    return state


def cv_numbers(state: ExperimentState) -> dict[str, Any]:
    """Mean ± std of the current folds' metric, the OOF metric, the TTA gain and training time."""
    config = state.config
    metric, classes = config.data.metric, config.data.classes
    index = {c: i for i, c in enumerate(classes)}
    scores, plain, tta, seconds = [], [], [], 0.0
    for fold in state.current_folds:
        fold_dir = config.run_dir / f"fold{fold}"
        oof = read_probs(fold_dir / "oof.csv")
        targets = oof["label"].map(index).to_numpy()
        scores.append(score(metric, targets, oof[classes].to_numpy()))
        plain.append(oof)
        seconds += float(pd.read_csv(fold_dir / "log.csv")["seconds"].sum())
        fold_state = next(f for f in state.folds if f.fold == fold)
        if fold_state.predict is not None and fold_state.predict.current:
            tta.append((oof, read_probs(fold_dir / "oof_tta.csv")))
    numbers: dict[str, Any] = {"cv_mean": np.nan, "cv_std": np.nan, "oof": np.nan,
                               "tta_gain": np.nan, "minutes": f"{seconds / 60:.1f}"}
    if scores:
        joined = pd.concat(plain)
        numbers.update(cv_mean=float(np.mean(scores)), cv_std=float(np.std(scores)),
                       oof=score(metric, joined["label"].map(index).to_numpy(),
                                 joined[classes].to_numpy()))
    if tta and len(tta) == len(scores) and config.tta.views != "none":
        with_tta = pd.concat([t for _, t in tta])
        without = pd.concat([p for p, _ in tta])
        target = with_tta["label"].map(index).to_numpy()
        numbers["tta_gain"] = (score(metric, target, with_tta[classes].to_numpy())
                               - score(metric, target, without[classes].to_numpy()))
    return numbers


def submissions_of(config: Config) -> dict[str, list[str]]:
    """experiment name -> its submissions ('name' or 'name (stale)')."""
    found: dict[str, list[str]] = {}
    folder = config.submissions_path
    for path in sorted(folder.glob("*.manifest.json")) if folder.is_dir() else []:
        manifest = read_manifest(path)
        if manifest is None:
            continue
        fresh = submission_freshness(config, path)
        label = path.name[:-len(".manifest.json")] + ("" if fresh.current else " (stale)")
        for member in manifest.details.get("members", []):
            found.setdefault(member, []).append(label)
    return found


def competition_states(config: Config) -> list[ExperimentState]:
    names = discover_runs(config)
    if not names:
        return []
    if not config.folds_csv.is_file():
        raise PipelineError(f"{config.folds_csv} not found: run `make folds DATA={config.data.name}`")
    fresh = folds_freshness(config)
    folds_error = None if fresh.current else f"the folds no longer fit the data ({fresh.why()})"
    folds = read_folds_unchecked(config)
    _, test_fingerprint = read_test_set(config.data)
    states = [experiment_state(config, name, folds, test_fingerprint, folds_error)
              for name in names]
    return [s for s in states if s is not None]


HEADERS = ["experiment", "model", "size", "epochs", "seed", "cv mean", "cv std", "oof",
           "tta gain", "status", "minutes", "submissions"]


def leaderboard(config: Config) -> pd.DataFrame:
    states = competition_states(config)
    submissions = submissions_of(config) if states else {}
    rows = []
    for state in states:
        c = state.config
        numbers = cv_numbers(state)
        rows.append([state.name, c.model.name, c.augment.image_size, c.train.epochs, c.train.seed,
                     numbers["cv_mean"], numbers["cv_std"], numbers["oof"], numbers["tta_gain"],
                     state.status(), numbers["minutes"],
                     ", ".join(submissions.get(state.name, [])) or "-"])
    frame = pd.DataFrame(rows, columns=HEADERS)
    ascending = config.data.metric == "log_loss"
    return frame.sort_values("oof", ascending=ascending, na_position="last", kind="stable")


def plot_leaderboard(frame: pd.DataFrame, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.plots import _save

    shown = frame.dropna(subset=["oof"]).iloc[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(shown) + 1.2))
    ax.barh(shown["experiment"], shown["cv mean"], xerr=shown["cv std"], color="#9ecae1",
            label="fold mean ± std")
    ax.scatter(shown["oof"], shown["experiment"], color="#08519c", zorder=3, label="out of fold")
    low = float(np.nanmin(shown[["cv mean", "oof"]].to_numpy() - shown[["cv std"]].fillna(0).to_numpy()))
    high = float(np.nanmax(shown[["cv mean", "oof"]].to_numpy()))
    span = max(high - low, 1e-3)
    ax.set_xlim(low - 0.2 * span, high + 0.2 * span)
    ax.set_xlabel(metric)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def main_runs(args) -> None:
    config = load_config(args.data, None, args.overrides)
    old = [p for p in Path(config.runs_dir).glob("*/fold*") if p.is_dir()
           and not (p.parent / "config.yaml").is_file() and p.parent.parent == Path(config.runs_dir)]
    if old:
        warn(f"{sorted({str(p.parent) for p in old})} are of the old layout (runs/<model>/, before "
             f"each competition had its folder): they are not read; retrain them, or delete them")
    frame = leaderboard(config)
    if frame.empty:
        print(f"no experiment of {config.data.name} in {config.competition_runs}/ yet: "
              f"make train MODEL=<model> DATA={config.data.name}")
        return
    out = config.competition_runs
    write_csv_atomic(frame, out / "leaderboard.csv")
    write_text_atomic(out / "leaderboard.md",
                      f"# Experiments of {config.data.name} ({config.data.metric})\n\n"
                      + markdown_table(frame.values.tolist(), HEADERS) + "\n")
    if frame["oof"].notna().any():
        plot_leaderboard(frame, config.data.metric, out / "leaderboard.png")
    print(format_table(frame.values.tolist(), HEADERS))
    print(f"{config.data.name} ({config.data.metric}): {len(frame)} experiment(s) -> "
          f"{out}/leaderboard.md|csv|png")


def _fingerprints(fresh: Freshness | None) -> str:
    if fresh is None or fresh.manifest is None:
        return "-"
    return " ".join(f"{k}={v}" for k, v in sorted(fresh.manifest.inputs.items()))


def main_status(args) -> None:
    config = load_config(args.data, args.model, args.overrides, name=args.name) if args.model \
        else load_config(args.data, None, args.overrides)
    fresh = folds_freshness(config)
    rows = [["folds", str(config.folds_csv), fresh.state, _fingerprints(fresh),
             "" if fresh.current else fresh.why()]]
    if args.model:
        state = next((s for s in competition_states(config) if s.name == config.run_name), None)
        if state is None:
            raise PipelineError(f"no experiment {config.run_name} of {config.data.name} in "
                                f"{config.competition_runs}/")
        for f in state.folds:
            rows.append([f"train fold {f.fold}", str(state.config.run_dir / f"fold{f.fold}"),
                         f.train.state, _fingerprints(f.train), "" if f.train.current else f.train.why()])
            if f.predict is not None:
                rows.append([f"predict fold {f.fold}", "", f.predict.state, _fingerprints(f.predict),
                             "" if f.predict.current else f.predict.why()])
        if state.refit is not None:
            rows.append(["refit", str(state.config.run_dir / "full"), state.refit.state,
                         _fingerprints(state.refit), "" if state.refit.current else state.refit.why()])
    print(format_table(rows, ["stage", "where", "state", "input fingerprints", "why"]))
    print(f"manifests: {folds_manifest(config)}, <run>/fold<k>/train|predict.manifest.json, "
          f"<run>/full/, submissions/<competition>/<name>.manifest.json")


main = main_runs
