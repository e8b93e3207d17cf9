"""Every experiment of a competition in one table, and what each stage of one was made from.

    python -m pipeline runs --data digits                    # make runs
    python -m pipeline status --data digits --model resnet18  # make status MODEL=resnet18

`runs` is the page to open every morning: per experiment its model, image size, epochs, seed,
cross-validation (mean ± std over the folds, and out of fold), the TTA gain, its status (complete,
partial, stale and why), the training time and the submissions built from it (marked when they
no longer match their members). Written to runs/<competition>/leaderboard.csv|md, with a plot of
the experiments' CV in leaderboard.png.

`status` lists, for one experiment, every stage's manifest: its state under the one freshness
rule (pipeline/experiments/freshness.py), the input fingerprints it recorded, and why it is not current.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.base.config import Config, load_config
from pipeline.base.log import log
from pipeline.base.utils import (
    PipelineError,
    format_table,
    make_command,
    markdown_table,
    warn,
    write_text_atomic,
)
from pipeline.experiments.freshness import (
    Freshness,
    folds_freshness,
    labelled_rows,
    read_folds_unchecked,
    read_test_set,
)
from pipeline.experiments.layout import Layout, old_layout_runs
from pipeline.experiments.leaderboard import HEADERS, leaderboard, report_line, transfer_cautions
from pipeline.experiments.public_scores import lb_flags, lb_summary, read_uploads
from pipeline.experiments.state import (
    ExperimentState,
    experiment_state,
    load_experiment,
)
from pipeline.reporting import plots

# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS_RUNS = ("data", "overrides")
FLAGS_STATUS = ("data", "model", "name", "overrides")


def main_runs(args) -> None:
    config = load_config(args.data, None, args.overrides)
    layout = Layout.of(config)
    old = old_layout_runs(Path(config.runs_dir))
    if old:
        warn(f"{[str(p) for p in old]} are of the old layout (runs/<model>/, before each "
             f"competition had its folder): they are not read; retrain them, or delete them")
    frame = leaderboard(config.data, config.folds, layout)
    if frame.empty:
        log.info(f"no experiment of {config.data.name} in {layout.runs}/ yet: "
                 f"{make_command('train', config.data.name, MODEL='<model>')}")
        return
    write_leaderboard(frame, config, layout)
    log.info(format_table(frame.values.tolist(), HEADERS))
    for caution in transfer_cautions(layout, len(labelled_rows(config.data))):
        warn(caution)
    log.info(f"{config.data.name} ({config.data.metric}): {len(frame)} experiment(s) -> "
             f"{layout.leaderboard('md')}|csv|png")
    show_uploads(config, layout)
    log.info(report_line(layout))


def show_uploads(config: Config, layout: Layout) -> None:
    """The uploads to Kaggle with their CV and scores (`make submit`, `make lb`), and what they
    say against the CV; nothing before the first upload."""
    uploads = read_uploads(layout)
    if uploads.empty:
        return
    for line in lb_summary(uploads, config.data.metric):
        log.info(line)
    for flag in lb_flags(uploads, config.data.metric):
        warn(flag)
    log.info(f"uploads: {layout.public_leaderboard} "
             f"({make_command('lb', config.data.name)} fetches their scores)")


def write_leaderboard(frame, config: Config, layout: Layout) -> None:
    """leaderboard.csv|md, and its picture leaderboard.png, each written only when its text
    changed (or the picture is missing): drawing loads matplotlib, about a second of a `make
    runs` after which nothing changed."""
    texts = {"csv": frame.to_csv(index=False),
             "md": f"# Experiments of {config.data.name} ({config.data.metric})\n\n"
                   + markdown_table(frame.values.tolist(), HEADERS) + "\n"}
    changed = [kind for kind, text in texts.items() if not _holds(layout.leaderboard(kind), text)]
    for kind in changed:
        write_text_atomic(layout.leaderboard(kind), texts[kind])
    picture = layout.leaderboard("png")
    if frame["oof"].notna().any() and (changed or not picture.is_file()):
        plots.plot_leaderboard(frame, config.data.metric, picture)


def _holds(path: Path, text: str) -> bool:
    """Whether the file exists with exactly this text."""
    try:
        return path.read_text() == text
    except (OSError, UnicodeDecodeError):
        return False


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
                            read_folds_unchecked(config.data, layout), test_fingerprint=test_fingerprint,
                            folds_error=folds_error, experiment=config)


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
    log.info(format_table(rows, ["stage", "where", "state", "input fingerprints", "why"]))
    part = layout.experiment("<experiment>").fold(0)
    log.info(f"manifests: {layout.folds_manifest}; {part.train_manifest.name} and "
             f"{part.predict_manifest.name} in each fold and refit folder of {layout.runs}/"
             f"<experiment>/; one per submission in {layout.submissions}/")


main = main_runs
