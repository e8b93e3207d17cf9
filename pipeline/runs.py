"""Every experiment of a competition in one table, and what each stage of one was made from.

    python -m pipeline runs --data digits                    # make runs
    python -m pipeline status --data digits --model resnet18  # make status MODEL=resnet18

`runs` is the page to open every morning: per experiment its model, image size, epochs, seed,
cross-validation (mean ± std over the folds, and out of fold), the TTA gain, its status (complete,
partial, stale and why), the training time and the submissions built from it (marked when they
no longer match their members). Written to runs/<competition>/leaderboard.csv|md, with a plot of
the experiments' CV in leaderboard.png.

`status` lists, for one experiment, every stage's manifest: its state under the one freshness
rule (pipeline/status.py), the input fingerprints it recorded, and why it is not current.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import plots
from pipeline.config import Config, DataConfig, FoldsConfig, load_config
from pipeline.layout import Layout, old_layout_runs, submission_of_manifest
from pipeline.provenance import read_manifest
from pipeline.scoring import Scorer
from pipeline.status import (ExperimentState, Freshness, cv_numbers, experiment_state,
                             folds_freshness, load_experiment, read_folds_unchecked,
                             read_test_set, submission_freshness)
from pipeline.utils import (PipelineError, format_table, markdown_table, warn, write_csv_atomic,
                            write_text_atomic)

HEADERS = ["experiment", "model", "size", "epochs", "seed", "cv mean", "cv std", "oof",
           "tta gain", "status", "minutes", "submissions"]


def submissions_of(data: DataConfig, folds: FoldsConfig, layout: Layout) -> dict[str, list[str]]:
    """experiment name -> its submissions ('name' or 'name (stale)')."""
    found: dict[str, list[str]] = {}
    for path in layout.submission_manifests():
        manifest = read_manifest(path)
        if manifest is None:
            continue
        fresh = submission_freshness(data, folds, layout, path)
        label = submission_of_manifest(path) + ("" if fresh.current else " (stale)")
        for member in manifest.details.get("members", []):
            found.setdefault(member, []).append(label)
    return found


def competition_states(data: DataConfig, folds_cfg: FoldsConfig,
                       layout: Layout) -> list[ExperimentState]:
    """The state of every experiment of the competition (the fold file may be stale: then
    every fold is, with the reason)."""
    names = layout.experiment_names()
    if not names:
        return []
    if not layout.folds_csv.is_file():
        raise PipelineError(f"{layout.folds_csv} not found: run `make folds DATA={data.name}`")
    fresh = folds_freshness(data, folds_cfg, layout)
    folds_error = None if fresh.current else f"the folds no longer fit the data ({fresh.why()})"
    folds = read_folds_unchecked(data, layout)
    _, test_fingerprint = read_test_set(data)
    states = [experiment_state(data, layout, name, folds, test_fingerprint, folds_error)
              for name in names]
    return [s for s in states if s is not None]


def leaderboard(data: DataConfig, folds_cfg: FoldsConfig, layout: Layout) -> pd.DataFrame:
    states = competition_states(data, folds_cfg, layout)
    submissions = submissions_of(data, folds_cfg, layout) if states else {}
    rows = []
    for state in states:
        c = state.config
        numbers = cv_numbers(state, Scorer.of(c.data))
        rows.append([state.name, c.model.name, c.augment.image_size, c.train.epochs, c.train.seed,
                     numbers["cv_mean"], numbers["cv_std"], numbers["oof"], numbers["tta_gain"],
                     state.status(), numbers["minutes"],
                     ", ".join(submissions.get(state.name, [])) or "-"])
    frame = pd.DataFrame(rows, columns=HEADERS)
    ascending = data.metric == "log_loss"
    return frame.sort_values("oof", ascending=ascending, na_position="last", kind="stable")


def plot_leaderboard(frame: pd.DataFrame, metric: str, path: Path) -> None:
    fig, ax = plots.figure(figsize=(7, 0.45 * frame["oof"].notna().sum() + 1.2))
    shown = frame.dropna(subset=["oof"]).iloc[::-1]
    ax.barh(shown["experiment"], shown["cv mean"], xerr=shown["cv std"], color="#9ecae1",
            label="fold mean ± std")
    ax.scatter(shown["oof"], shown["experiment"], color="#08519c", zorder=3, label="out of fold")
    values = shown[["cv mean", "oof"]].to_numpy()
    low = float(np.nanmin(values - shown[["cv std"]].fillna(0).to_numpy()))
    high = float(np.nanmax(values))
    span = max(high - low, 1e-3)
    ax.set_xlim(low - 0.2 * span, high + 0.2 * span)
    ax.set_xlabel(metric)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    plots.save(fig, path)


def main_runs(args) -> None:
    config = load_config(args.data, None, args.overrides)
    layout = Layout.of(config)
    old = old_layout_runs(Path(config.runs_dir))
    if old:
        warn(f"{[str(p) for p in old]} are of the old layout (runs/<model>/, before each "
             f"competition had its folder): they are not read; retrain them, or delete them")
    frame = leaderboard(config.data, config.folds, layout)
    if frame.empty:
        print(f"no experiment of {config.data.name} in {layout.runs}/ yet: "
              f"make train MODEL=<model> DATA={config.data.name}")
        return
    write_csv_atomic(frame, layout.leaderboard("csv"))
    write_text_atomic(layout.leaderboard("md"),
                      f"# Experiments of {config.data.name} ({config.data.metric})\n\n"
                      + markdown_table(frame.values.tolist(), HEADERS) + "\n")
    if frame["oof"].notna().any():
        plot_leaderboard(frame, config.data.metric, layout.leaderboard("png"))
    print(format_table(frame.values.tolist(), HEADERS))
    print(f"{config.data.name} ({config.data.metric}): {len(frame)} experiment(s) -> "
          f"{layout.leaderboard('md')}|csv|png")


def _fingerprints(fresh: Freshness | None) -> str:
    if fresh is None or fresh.manifest is None:
        return "-"
    return " ".join(f"{k}={v}" for k, v in sorted(fresh.manifest.inputs.items()))


def _row(stage: str, where: str, fresh: Freshness) -> list[str]:
    return [stage, where, fresh.state, _fingerprints(fresh), "" if fresh.current else fresh.why()]


def experiment_rows(state: ExperimentState) -> list[list[str]]:
    """`make status`'s rows of one experiment: each fold's training and prediction, the refit."""
    rows = []
    for f in state.folds:
        rows.append(_row(f"train fold {f.fold}", str(state.exp.fold(f.fold).dir), f.train))
        if f.predict is not None:
            rows.append(_row(f"predict fold {f.fold}", "", f.predict))
    if state.refit_train is not None:
        rows.append(_row("refit", str(state.exp.refit.dir), state.refit_train))
    return rows


def command_state(config: Config, layout: Layout) -> ExperimentState | None:
    """The state of the command's experiment under the command's settings (None: untrained)."""
    if config.run_name not in layout.experiment_names() or not layout.folds_csv.is_file():
        return None
    fresh = folds_freshness(config.data, config.folds, layout)
    folds_error = None if fresh.current else f"the folds no longer fit the data ({fresh.why()})"
    _, test_fingerprint = read_test_set(config.data)
    return experiment_state(config.data, layout, config.run_name,
                            read_folds_unchecked(config.data, layout), test_fingerprint,
                            folds_error, experiment=config)


def main_status(args) -> None:
    config = (load_experiment(args.data, args.model, args.overrides, name=args.name)
              if args.model else load_config(args.data, None, args.overrides))
    layout = Layout.of(config)
    rows = [_row("folds", str(layout.folds_csv),
                 folds_freshness(config.data, config.folds, layout))]
    if args.model:  # judged by the settings of this command, as `make train` would judge them
        state = command_state(config, layout)
        if state is None:
            raise PipelineError(f"no experiment {config.run_name} of {config.data.name} in "
                                f"{layout.runs}/")
        rows += experiment_rows(state)
    print(format_table(rows, ["stage", "where", "state", "input fingerprints", "why"]))
    part = layout.experiment("<experiment>").fold(0)
    print(f"manifests: {layout.folds_manifest}; {part.train_manifest.name} and "
          f"{part.predict_manifest.name} in each fold and refit folder of {layout.runs}/"
          f"<experiment>/; one per submission in {layout.submissions}/")


main = main_runs
