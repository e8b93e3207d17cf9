"""The competition's report: static HTML pages to open from disk (no server, no network).

    python -m pipeline report --data digits          # make report
    xdg-open reports/digits/index.html               # or, on a remote machine:
    python -m http.server -d reports/digits 8000     # then http://localhost:8000 (ssh -L 8000:...)

index.html: the leaderboard of experiments (what `make runs` shows, sortable by any column),
their CV with the fold spread, every submission with its members, method and both CVs, and the
audit's findings (duplicate groups as pictures, the train/test AUC, label suspects).
experiments/<experiment>.html: learning curves of all folds, the OOF confusion matrix,
precision/recall/F1 per class, the most confused pairs, the images with the highest OOF loss
(overall and per class), the TTA gain, and the settings that differ from the competition's
defaults.

Each page is rebuilt only when what it shows changed (its manifest, under the one freshness
rule of pipeline/experiments/freshness.py). A page's inputs are data: the experiments' manifests,
the leaderboard rows, the submissions, the audit's findings, the report settings, and
PAGE_FORMAT, bumped by hand when the pages' layout changes (the code's own files are no input:
editing an unrelated line of Python rebuilds nothing). Pictures are resized once into images/,
named by the file and how it was read, and only the shown ones: a competition of 100,000 images
gives a report of a few hundred thumbnails. A page says which pictures it shows: the templates
name each one through `picture(path)` (Pictures), which gives its src and records it; the page's
manifest lists them as its outputs, and the pictures no manifest lists are deleted. The pages
are Jinja2 templates (pipeline/reporting/templates/) with inline CSS and a few lines of inline
JavaScript for sorting: nothing is fetched from outside the folder.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import pipeline
from pipeline.base.config import (
    Config,
    DataConfig,
    ReportConfig,
    changed_settings,
    load_config,
    training_settings,
)
from pipeline.base.fingerprints import fingerprint
from pipeline.base.log import log
from pipeline.base.metrics import higher_is_better
from pipeline.base.task import Scorer
from pipeline.base.utils import format_table, write_text_atomic
from pipeline.data.duplicates import GROUP_IMAGES, read_duplicates
from pipeline.data.imagecache import image_loader
from pipeline.data.images import read_image
from pipeline.data.tables import test_image_paths, train_image_paths
from pipeline.ensembling.decode import expected_grade
from pipeline.experiments.layout import Layout, Report
from pipeline.experiments.leaderboard import (
    HEADERS,
    SubmissionSummary,
    best_first,
    competition_states,
    leaderboard,
    read_submissions,
)
from pipeline.experiments.manifests import read_manifest
from pipeline.experiments.probfiles import GRADE
from pipeline.experiments.public_scores import (
    LB_HEADERS,
    correlation_line,
    has_lb_scores,
    lb_flags,
    lb_rows,
    read_uploads,
)
from pipeline.experiments.runner import Step, run_step, stage_lock
from pipeline.experiments.state import ExperimentState, cv_numbers, findings_staleness, joined_oof
from pipeline.reporting import plots

TEMPLATES = Path(__file__).parents[1] / "reporting" / "templates"
LOSS_FLOOR = 1e-7  # a probability of 0 for the given class would be an infinite loss
CONFUSED_PAIRS = 10
DUPLICATE_GROUPS, SUSPECTS = 12, 18  # audit pictures on the index page (GROUP_IMAGES: duplicates')
# Bump by hand when a change of the templates, or of the code that fills them, changes what a
# page shows: every page is then rebuilt once. The code's files are no input of a page.
PAGE_FORMAT = 1
# What only a page being written needs (jinja2, scikit-learn; matplotlib in plots) is imported
# in the function that needs it: `make report` with nothing changed then loads none of them
# (several seconds of its run, bench/scale.py).


def environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                              autoescape=jinja2.select_autoescape(["html"]),
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def number(value: Any, digits: int = 4) -> str:
    """A score as the pages print it: fixed digits, a dash for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, (float, np.floating)) else str(value)


# --------------------------------------------------------------------------------------------
# Pictures


@dataclass
class Tile:
    """One picture of an image with its caption lines."""

    image: Path  # under images/; the template names it through `picture`
    id: str
    lines: list[str]
    flag: str = ""  # a css class: "wrong", "test"


def thumbnail(report: Report, source: Path, read, side: int, *, how: str) -> Path:
    """images/<key>.jpg of `source` (read by `read`, path -> RGB array), made once: the key is
    the file (its path, size, modification time), `how` it was read and the size."""
    stat = source.stat()
    key = fingerprint([str(source), stat.st_size, stat.st_mtime_ns, how, side])
    path = report.images / f"{key[:20]}.jpg"
    if not path.is_file():
        plots.write_thumbnail(read(source), path, side)
    return path


def relative(path: Path, page: Path) -> str:
    return Path(os.path.relpath(path, page.parent)).as_posix()


class Pictures:
    """The pictures one page shows, collected while it is rendered: each <img> of the templates
    calls `picture(path)`, which records the file and gives its src relative to the page."""

    def __init__(self, page: Path):
        self.page = page
        self.shown: list[Path] = []

    def __call__(self, path: Path) -> str:
        self.shown.append(Path(path))
        return relative(path, self.page)

    def files(self) -> list[Path]:
        return sorted(set(self.shown))


# --------------------------------------------------------------------------------------------
# An experiment's page


def oof_of(state: ExperimentState) -> tuple[pd.DataFrame, str]:
    """(the OOF rows of the current folds: TTA where every one was predicted, which file)."""
    done, predicted = state.current_folds, state.predicted_folds
    tta = bool(done) and predicted == done and state.tta(False).views != "none"
    part = state.exp.fold(done[0])
    return joined_oof(state.exp, done, tta=tta), (part.oof_tta if tta else part.oof).name


def losses_of(oof: pd.DataFrame, scorer: Scorer, head: str) -> pd.DataFrame:
    """Each OOF row with its given and predicted class, their probabilities and its loss,
    highest first: -log p of the given class, or for a grade head (whose class columns are
    two-point distributions, 0 beyond the neighbouring grades) how far its grade is from the
    given one, the grade rounded as its prediction."""
    targets, probs = scorer.targets(oof["label"]), scorer.probs_of(oof)
    rows = np.arange(len(oof))
    grade = None
    if head != "classification":
        grade = oof[GRADE].to_numpy(float) if GRADE in oof else expected_grade(probs)
        predicted = np.clip(np.rint(grade), 0, scorer.n_classes - 1).astype(np.int64)
    else:
        predicted = probs.argmax(axis=1)
    table = pd.DataFrame({
        "id": oof["id"].to_numpy(), "given": oof["label"].to_numpy(),
        "predicted": np.asarray(scorer.classes, dtype=object)[predicted],
        "p_given": probs[rows, targets], "p_predicted": probs[rows, predicted],
        "target": targets, "prediction": predicted, "grade": grade})
    table["loss"] = (np.abs(grade - targets) if grade is not None
                     else -np.log(np.clip(table["p_given"], LOSS_FLOOR, 1.0)))
    return table.sort_values("loss", ascending=False, kind="stable").reset_index(drop=True)


def tile_lines(row) -> list[str]:
    """A top loss's caption: the given and predicted class with their probabilities, or with
    the grade a grade head gave."""
    if row.grade is not None and not pd.isna(row.grade):
        return [f"given {row.given}", f"predicted {row.predicted} (grade {row.grade:.2f})",
                f"off by {row.loss:.2f} grades"]
    return [f"given {row.given} ({row.p_given:.2f})",
            f"predicted {row.predicted} ({row.p_predicted:.2f})", f"loss {row.loss:.2f}"]


def loss_tiles(rows: pd.DataFrame, config: Config, report: Report, side: int) -> list[Tile]:
    """Pictures of OOF rows as the model saw them (after the pipeline's preprocessing, from the
    image cache where it is enabled)."""
    if rows.empty:
        return []
    data = config.data
    paths = train_image_paths(data, rows["id"].tolist())
    read = image_loader(config.cache, config.augment, paths, desc="report",
                        max_pixels=data.max_image_pixels)
    how = fingerprint([config.cache.model_dump(), config.augment.image_size])
    tiles = []
    for row, source in zip(rows.itertuples(), paths):
        tiles.append(Tile(thumbnail(report, source, read, side, how=how), row.id, tile_lines(row),
                          "wrong" if row.given != row.predicted else ""))
    return tiles


def top_losses(losses: pd.DataFrame, settings: ReportConfig, classes: tuple[str, ...]) -> dict:
    """{"all": the highest losses overall, <class>: the highest among rows given it}."""
    shown = {"all": losses.head(settings.top_losses)}
    for name in classes[:settings.classes_shown]:
        shown[name] = losses[losses["given"] == name].head(settings.per_class)
    return shown


def confused_pairs(losses: pd.DataFrame) -> list[list]:
    """The most frequent (given, predicted) mistakes: count and share of the given class."""
    wrong = losses[losses["given"] != losses["predicted"]]
    counts = wrong.groupby(["given", "predicted"]).size().sort_values(ascending=False)
    per_class = losses["given"].value_counts()
    return [[given, predicted, int(n), f"{n / per_class[given]:.1%}"]
            for (given, predicted), n in counts.head(CONFUSED_PAIRS).items()]


def class_rows(losses: pd.DataFrame, classes: tuple[str, ...]) -> list[list]:
    """sklearn's classification_report as rows: precision, recall, F1, support."""
    from sklearn.metrics import classification_report

    found = classification_report(losses["target"], losses["prediction"],
                                  labels=list(range(len(classes))), target_names=list(classes),
                                  output_dict=True, zero_division=0)
    rows = [[name, *(number(found[name][k], 3) for k in ("precision", "recall", "f1-score")),
             int(found[name]["support"])] for name in [*classes, "macro avg", "weighted avg"]]
    return rows + [["accuracy", "", "", number(found["accuracy"], 3), len(losses)]]


def settings_rows(config: Config, defaults: Config) -> list[list]:
    """The result-changing settings where the experiment differs from the competition's
    defaults, then the later stages' (TTA, ensemble)."""
    rows = [[key, repr(a), repr(b)] for key, a, b in
            changed_settings(training_settings(defaults.to_dict()),
                             training_settings(config.to_dict()))]
    for section in ("tta", "ensemble"):
        rows += [[f"{section}.{key}", repr(a), repr(b)] for key, a, b in changed_settings(
            getattr(defaults, section).model_dump(), getattr(config, section).model_dump())]
    return rows


def fold_logs(state: ExperimentState) -> dict[str, pd.DataFrame]:
    return {f"fold {k}": pd.read_csv(state.exp.fold(k).log) for k in state.current_folds
            if state.exp.fold(k).log.is_file()}


def experiment_figures(state: ExperimentState, losses: pd.DataFrame,
                       report: Report) -> dict[str, Path]:
    """The page's curves and confusion matrix, drawn into images/ (named by the page)."""
    config, metric = state.config, state.config.data.metric
    curves = report.images / f"{state.name}.curves.png"
    plots.write_fold_curves(fold_logs(state), metric, curves)
    counts, normalised = plots.confusion_frames(losses["target"], losses["prediction"],
                                                list(config.data.classes))
    confusion = report.images / f"{state.name}.confusion.png"
    plots.plot_confusion(counts, normalised, confusion)
    figures = {"curves": curves, "confusion": confusion}
    if state.exp.lr_sweep_png.is_file():  # `make lr`'s curve, as it drew it
        figures["lr_sweep"] = report.images / f"{state.name}.lr_sweep.png"
        shutil.copyfile(state.exp.lr_sweep_png, figures["lr_sweep"])
    return figures


def experiment_context(state: ExperimentState, defaults: Config, report: Report,
                       settings: ReportConfig) -> dict:
    config, page = state.config, report.experiment(state.name)
    scorer = Scorer.of(config.data)
    oof, source = oof_of(state)
    losses = losses_of(oof, scorer, config.model.head)
    numbers = cv_numbers(state, scorer)
    shown = top_losses(losses, settings, scorer.classes)
    return {
        "name": state.name, "competition": config.data.name, "metric": config.data.metric,
        "status": state.status(), "model": config.model.name, "source": source,
        "decoded_as": "argmax" if config.model.head == "classification" else "the grade rounded",
        "numbers": {k: number(v) for k, v in numbers.items()},
        "tta": state.tta(False).views if not math.isnan(numbers["tta_gain"]) else None,
        "figures": experiment_figures(state, losses, report),
        "classes": class_rows(losses, scorer.classes), "confused": confused_pairs(losses),
        "losses": {name: loss_tiles(rows, config, report, settings.thumbnail)
                   for name, rows in shown.items()},
        "settings": settings_rows(config, defaults), "root": relative(report.dir, page)}


# --------------------------------------------------------------------------------------------
# The competition's page


NUMERIC = {"size", "epochs", "seed", "cv mean", "cv std", "oof", "oof test-like", "tta gain",
           "minutes"}


def sort_key(value: Any) -> Any:
    """What a cell sorts by in the page: numbers by value, the rest (a dash, text) as text."""
    if isinstance(value, (int, float, np.number)) and not pd.isna(value):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def leaderboard_rows(frame: pd.DataFrame, report: Report, pages: set[str]) -> list[dict]:
    """Each experiment's row as `make runs` prints it, with a link to its page where it has
    one (an experiment with no current fold has none)."""
    rows = []
    for record in frame.to_dict("records"):
        name = record["experiment"]
        cells = [{"text": number(record[h]) if isinstance(record[h], float) else record[h],
                  "sort": sort_key(record[h]), "numeric": h in NUMERIC,
                  "stale": h == "status" and str(record[h]).startswith("stale")}
                 for h in HEADERS]
        rows.append({"cells": cells, "href": (relative(report.experiment(name), report.index)
                                              if name in pages else None)})
    return rows


def latest_scores(uploads: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """submission name -> (public, private) of its latest scored upload."""
    scored = uploads[uploads["submission"] != ""].dropna(subset=["public", "private"], how="all")
    return {r.submission: (r.public, r.private)
            for r in scored.sort_values("date", kind="stable").itertuples()}


def submission_rows(summaries: list[SubmissionSummary], uploads: pd.DataFrame) -> list[dict]:
    scores = latest_scores(uploads)
    return [{"name": s.name, "members": ", ".join(s.members), "method": s.method,
             "cv": number(s.cv), "cv_in_sample": number(s.cv_in_sample),
             "public": number(scores.get(s.name, (np.nan,))[0]),
             "private": number(scores.get(s.name, (np.nan, np.nan))[1]),
             "state": "current" if s.current else f"stale: {s.why}", "partial": s.partial,
             "methods": [[m["method"], number(m["cv"]), number(m["cv_in_sample"])]
                         for m in s.methods]} for s in summaries]


def original_tiles(data: DataConfig, part: str, ids: list[str], report: Report,
                   *, side: int, lines: list[list[str]]) -> list[Tile]:
    """Pictures of training or test images as they are on disk (the audit's view)."""
    paths = (train_image_paths if part == "train" else test_image_paths)(data, ids)

    def read(path):
        return read_image(path, min_side=side, max_pixels=data.max_image_pixels)

    return [Tile(thumbnail(report, path, read, side, how="original"), image_id, caption,
                 "test" if part == "test" else "")
            for image_id, path, caption in zip(ids, paths, lines)]


def duplicate_groups(data: DataConfig, layout: Layout, side: int) -> list[list[Tile]]:
    findings = layout.findings
    if not findings.duplicates.is_file():
        return []
    table = read_duplicates(findings.duplicates)
    groups = []
    for _, rows in list(table.groupby("group", sort=False))[:DUPLICATE_GROUPS]:
        rows = rows.head(GROUP_IMAGES)
        tiles = []
        for part in ("train", "test"):
            mine = rows[rows["part"] == part]
            tiles += original_tiles(data, part, mine["id"].tolist(), layout.report, side=side,
                                    lines=[[f"{part} {r.id}", r.label or "", r.found]
                                     for r in mine.itertuples()])
        groups.append(tiles)
    return groups


def audit_context(data: DataConfig, layout: Layout, side: int,
                  stale: dict[str, str]) -> dict | None:
    """The audit's findings, where `make audit` wrote them, each marked when it was made from
    other images, rows or OOF predictions than now (`stale`: status.findings_staleness)."""
    findings = layout.findings
    shift = (pd.read_csv(findings.shift)
             if findings.shift.is_file() else None)
    suspects = {}
    for experiment, path in findings.label_issue_files().items():
        table = pd.read_csv(path, dtype={"id": str, "given": str, "predicted": str},
                            keep_default_na=False).head(SUSPECTS)
        suspects[experiment] = original_tiles(
            data, "train", table["id"].tolist(), layout.report, side=side,
            lines=[[f"given {r.given} ({r.p_given:.2f})", f"predicted {r.predicted} "
              f"({r.p_predicted:.2f})"] for r in table.itertuples()])
    groups = duplicate_groups(data, layout, side)
    if shift is None and not suspects and not findings.duplicates.is_file():
        return None
    shift_rows = ([] if shift is None else
                  [[r.what, r.name, number(r.auc, 3), number(r.auc_std, 3)]
                   for r in shift.itertuples() if r.what != "feature"]
                  + [[r.what, r.name, number(r.auc, 3), ""]
                     for r in shift[shift["what"] == "feature"].head(5).itertuples()])
    return {"groups": groups, "shift": shift_rows, "suspects": suspects,
            "duplicates_found": findings.duplicates.is_file(), "stale": stale}


def lb_context(uploads: pd.DataFrame, metric: str, report: Report) -> dict | None:
    """The Kaggle section: each upload with its CV and scores, the CV-against-LB picture and
    its correlation, the flags; None before the first upload."""
    if uploads.empty:
        return None
    plot = None
    if has_lb_scores(uploads):
        plot = report.images / "cv_vs_lb.png"
        plots.plot_cv_against_lb(uploads, metric, plot, title=correlation_line(uploads, metric))
    return {"headers": LB_HEADERS, "plot": plot, "line": correlation_line(uploads, metric),
            "rows": [[number(v) if isinstance(v, float) else v for v in row]
                     for row in lb_rows(uploads)],
            "flags": lb_flags(uploads, metric)}


TUNE_ROWS = 20  # a search's best trials shown in the report; trials.csv has every one


def tune_context(layout: Layout, metric: str) -> list[dict]:
    """Each search of `make tune`: its best trials (state, fold-0 score, settings) and each
    setting's importance."""
    searches = []
    for name in layout.tuned_experiments():
        table = pd.read_csv(layout.tune_trials(name))
        table = table.sort_values("fold 0", ascending=not higher_is_better(metric),
                                  na_position="last", kind="stable").head(TUNE_ROWS)
        weights = (pd.read_csv(layout.tune_importance(name))
                   if layout.tune_importance(name).is_file() else pd.DataFrame())
        searches.append({"name": name, "headers": list(table.columns),
                         "rows": [[number(v) if isinstance(v, float) else v for v in row]
                                  for row in table.values.tolist()],
                         "importance": [[r.setting, number(r.importance)]
                                        for r in weights.itertuples()] if len(weights) else []})
    return searches


def index_context(config: Config, layout: Layout, shown: dict) -> dict:
    """The index page's context from what it shows (index_inputs' `shown`)."""
    report, data, frame = layout.report, config.data, shown["frame"]
    plot = None
    if frame["oof"].notna().any():
        path = report.images / "leaderboard.png"
        plots.plot_leaderboard(frame, data.metric, path)
        plot = path
    return {"competition": data.name, "metric": data.metric,
            "direction": "higher" if higher_is_better(data.metric) else "lower",
            "headers": [{"text": h, "numeric": h in NUMERIC} for h in HEADERS],
            "rows": leaderboard_rows(frame, report, shown["pages"]), "plot": plot,
            "submissions": submission_rows(shown["summaries"], shown["uploads"]),
            "lb": lb_context(shown["uploads"], data.metric, report),
            "tunes": tune_context(layout, data.metric),
            "audit": audit_context(data, layout, config.report.thumbnail, shown["stale"]),
            "version": pipeline.__version__}


# --------------------------------------------------------------------------------------------
# The stage


def render(page: Path, template: str, context: Callable[[], dict], inputs: dict,
           *, report: Report, force: bool) -> str:
    """Write a page (and, last, its manifest) unless it is current: 'written' or 'current'.
    The manifest's outputs are the page and every picture it showed (a deleted one rebuilds
    the page)."""
    pictures = Pictures(page)

    def work() -> str:
        html = environment().get_template(template).render(picture=pictures, **context())
        write_text_atomic(page, html)
        return "written"

    step = Step("report", report.manifest(page), inputs, {},
                lambda: [page, *pictures.files()], work,
                current="")  # the stage's table says it
    return run_step(step, force) or "current"


def experiment_inputs(state: ExperimentState, config: Config, defaults: Config) -> dict:
    """What an experiment's page shows: its folds' manifests (their outputs' digests), its
    state, its settings against the defaults, the report settings, the pages' format."""
    parts = [state.exp.fold(f.fold) for f in state.folds]
    texts = [p.train_manifest.read_text() if p.train_manifest.is_file() else "" for p in parts]
    texts += [p.predict_manifest.read_text() if p.predict_manifest.is_file() else ""
              for p in parts]
    sweep = state.exp.lr_sweep_csv
    texts.append(sweep.read_text() if sweep.is_file() else "")  # `make lr`'s curve, when made
    return {"experiment": fingerprint(texts), "status": fingerprint(state.status()),
            "settings": fingerprint(settings_rows(state.config, defaults)),
            "report": fingerprint(config.report.model_dump()), "format": str(PAGE_FORMAT)}


def build_experiment(state: ExperimentState, config: Config, defaults: Config,
                     force: bool) -> str:
    """Write one experiment's page unless it is current; 'written', 'current' or why not."""
    report = Layout.of(config).report
    page = report.experiment(state.name)
    if not state.current_folds:  # an old page would show old scores as if current
        page.unlink(missing_ok=True)
        report.manifest(page).unlink(missing_ok=True)
        return "none: no current fold"
    return render(page, "experiment.html",
                  lambda: experiment_context(state, defaults, report, config.report),
                  experiment_inputs(state, config, defaults), report=report, force=force)


def index_inputs(config: Config, layout: Layout, shown: dict) -> dict:
    """What the index shows: the leaderboard, the submissions, which experiments have a page,
    the audit's manifests and whether each finding is current; the report settings, the
    pipeline's version (the page names it) and the pages' format."""
    findings = layout.findings
    audit_files = sorted(findings.dir.glob("*.manifest.json")) if findings.dir.is_dir() else []
    return {"leaderboard": fingerprint(shown["frame"].to_csv(index=False)),
            "submissions": fingerprint([vars(s) | {"csv": str(s.csv)}
                                        for s in shown["summaries"]]),
            "uploads": fingerprint(shown["uploads"].to_csv(index=False)),
            "tunes": fingerprint([layout.tune_trials(n).read_text() for n in
                                  layout.tuned_experiments()]),
            "pages": fingerprint(sorted(shown["pages"])),
            "audit": fingerprint([p.read_text() for p in audit_files]
                                 + [str(findings.label_issue_files()), shown["stale"]]),
            "report": fingerprint(config.report.model_dump()),
            "version": pipeline.__version__, "format": str(PAGE_FORMAT)}


def what_index_shows(config: Config, layout: Layout, states: list[ExperimentState],
                     done: list[list[str]]) -> dict:
    submissions = read_submissions(config.data, config.folds, layout)
    return {"frame": leaderboard(config.data, config.folds, layout, states,
                                 summaries=submissions),
            "summaries": best_first(submissions, config.data.metric),
            "uploads": read_uploads(layout),
            "stale": findings_staleness(config.data, layout, states),
            "pages": {name for name, state in done if not state.startswith("none")}}


def shown_pictures(report: Report) -> set[Path]:
    """The pictures the pages show, as their manifests list them (resolved paths)."""
    shown = set()
    for page in [report.index, *report.dir.glob("experiments/*.html")]:
        manifest = read_manifest(report.manifest(page))
        if manifest is not None:
            shown |= {(page.parent / name).resolve() for name in manifest.outputs}
    return shown


def prune_images(report: Report) -> int:
    """Delete the pictures no page shows any more (an old fold's top losses); how many."""
    shown = shown_pictures(report)
    stale = [p for p in report.images.glob("*") if p.resolve() not in shown]
    for path in stale:
        path.unlink()
    return len(stale)


def build_report(config: Config, force: bool = False) -> Path:
    """Write every page that is not current; print what was done; return index.html."""
    layout = Layout.of(config)
    report = layout.report
    with stage_lock(layout.report_lock, report.dir, "written"):
        states = competition_states(config.data, config.folds, layout)
        done = [[state.name, build_experiment(state, config, config, force)] for state in states]
        shown = what_index_shows(config, layout, states, done)
        inputs = index_inputs(config, layout, shown)
        done.append(["index", render(report.index, "index.html",
                                     lambda: index_context(config, layout, shown), inputs, report=report,
                                     force=force)])
        pruned = prune_images(report) if report.images.is_dir() else 0
    log.info(format_table(done, ["page", "state"]))
    if pruned:
        log.info(f"removed {pruned} picture(s) no page shows any more")
    log.info(f"report: {report.index} (open it from disk, or serve the folder: "
             f"python -m http.server -d {report.dir})")
    return report.index


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "force", "overrides")


def main(args) -> None:
    config = load_config(args.data, None, args.overrides)
    build_report(config, args.force)
