"""Each stage's inputs and the one freshness rule.

    python -m pipeline status --data digits --model resnet18     # make status MODEL=resnet18

Every stage writes a manifest of what it read (pipeline/base/fingerprints.py); this module says what each
stage reads and decides, for all of them, whether earlier outputs are current: a manifest whose
inputs equal the inputs computed now and whose outputs are on disk unchanged (`freshness`).
Nothing else in the pipeline asks "is it done?". The fingerprints (16 hex digits of a SHA-256):

| input           | of                                                                        |
|-----------------|---------------------------------------------------------------------------|
| `rows`          | the labelled rows as read from train.csv (id, label, group) and the class list |
| `folds`         | the fold assignment: folds/<competition>.csv's (id, label, fold, group)    |
| `fold_settings` | folds.n_splits, folds.seed, the group rule, data.drop_bad_images           |
| `settings`      | every setting that changes what training produces (`config.training_settings`) |
| `train_images`  | each labelled image's id, size and modification time                      |
| `pseudo`        | a pseudo-label set's manifest (train.pseudo)                               |
| `checkpoint`    | the bytes of the best.pt a prediction came from                           |
| `test`          | the test ids in order, and each test image's size and modification time   |
| `tta`           | the TTA settings of a prediction                                          |
| `epochs`        | the refit's epoch count, where it came from, and the learning-rate path   |
| `members`       | an ensemble's member predictions (their manifests) and its settings       |

What a stage does with the answer:
- current: skipped, in one line;
- missing: done (an interrupted training resumes when its last.pt was made from the same inputs);
- stale: redone where nothing is lost (folds, predictions), refused where a user's work would be
  thrown away (a trained fold, a refit), with the inputs that changed and the remedy: FORCE=1, or
  NAME= / another experiment file to keep both.

The state of a whole experiment built on this rule lives in pipeline/experiments/state.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.base.config import (
    Config,
    DataConfig,
    FoldsConfig,
    RefitConfig,
    TrainConfig,
    TTAConfig,
    changed_keys,
    training_settings,
    without_added_off,
)
from pipeline.base.fingerprints import (
    file_digest,
    fingerprint,
    folds_fingerprint,
    images_fingerprint,
    once,
    rows_fingerprint,
    table_fingerprint,
)
from pipeline.base.task import best_epochs, targets_of
from pipeline.base.utils import PipelineError, make_command
from pipeline.data.duplicates import read_duplicates
from pipeline.data.tables import (
    MAX_IMAGE_PIXELS,
    load_test_ids,
    load_train_table,
    test_image_paths,
    train_image_paths,
)
from pipeline.experiments.layout import Experiment, Layout, Part
from pipeline.experiments.manifests import Manifest, outputs_problems, read_manifest
from pipeline.models.names import built_stem
from pipeline.training.lr_path import FoldPath, steps_per_epoch

# What each input means to a user, for the messages that say what changed.
INPUT_NAMES = {
    "rows": "the labelled rows or the class list (train.csv)",
    "folds": "the fold assignment (folds/<competition>.csv)",
    "fold_settings": "the fold settings (folds.*, the group rule, data.drop_bad_images)",
    "settings": "the settings",
    "train_images": "the training images (files added, removed or modified)",
    "pseudo": "the pseudo-label set",
    "checkpoint": "the checkpoint (best.pt was retrained)",
    "test": "the test set (ids, or image files added, removed or modified)",
    "tta": "the TTA settings",
    "epochs": "the refit's epoch count",
    "members": "the member predictions or ensemble settings",
    "duplicates": "the duplicate groups (audit/<competition>/duplicates.csv)",
    "exclude": "the rows left out of training (train.exclude)",
    "oof": "how an EMA run's oof.csv is predicted (from best.pt's EMA weights since pipeline "
           "0.2; before, from the last epoch's)",
}
# An EMA run records how its oof.csv was predicted: runs made before the fix lack the input
# and are stale once (retrain them: FORCE=1); other runs are unaffected.
EMA_OOF = "the EMA oof predicted with the best epoch's weights"


class StaleError(PipelineError):
    """A stage's earlier outputs were made from other inputs and redoing them would lose work."""


# --------------------------------------------------------------------------------------------
# The one freshness rule


@dataclass
class Freshness:
    """Whether a stage's outputs are current, and if not, why (in words a user can act on)."""

    state: str  # "current", "missing" (never finished) or "stale"
    reasons: list[str] = field(default_factory=list)
    manifest: Manifest | None = None

    @property
    def current(self) -> bool:
        return self.state == "current"

    def why(self) -> str:
        return "; ".join(self.reasons) if self.reasons else self.state


def input_changes(recorded: dict[str, str], now: dict[str, str],
                  details_then: dict[str, Any] | None = None,
                  details_now: dict[str, Any] | None = None) -> list[str]:
    """What differs between two sets of input fingerprints, named for a user.

    A changed `settings` input names the keys that changed when both sides recorded them.
    """
    reasons = []
    for name in sorted(set(recorded) | set(now)):
        if recorded.get(name) == now.get(name):
            continue
        what = INPUT_NAMES.get(name, name)
        if name in ("settings", "fold_settings") and details_then and details_now and \
                "settings" in details_then and "settings" in details_now:
            what = _settings_change(details_then["settings"], details_now["settings"],
                                    "the fold settings" if name == "fold_settings" else
                                    "the settings")
        reasons.append(f"{what} changed" if name in recorded and name in now
                       else f"{what} {'not recorded' if name in now else 'no longer used'}")
    return reasons


def _settings_change(then: dict[str, Any], now: dict[str, Any], what: str) -> str:
    keys = changed_keys(then, now)
    if not keys:  # equal values, other keys: the pipeline's settings were added or removed
        return f"the set of {what[4:]} (this version of the pipeline has other ones)"
    return f"{what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"


def freshness(path, inputs: dict[str, str], details: dict[str, Any] | None = None) -> Freshness:
    """The one rule: current = a manifest with these inputs and its outputs unchanged on disk."""
    manifest = read_manifest(path)
    if manifest is None:
        return Freshness("missing", ["not run yet" if not path.exists() else
                                     f"{path.name} unreadable or of an older format"])
    reasons = input_changes(manifest.inputs, inputs, manifest.details, details)
    reasons += outputs_problems(path, manifest)
    return Freshness("stale" if reasons else "current", reasons, manifest)


def refuse_stale(what: str, fresh: Freshness, remedy: str) -> StaleError:
    """The error for stale work that redoing would throw away."""
    return StaleError(f"{what} was made from other inputs: {fresh.why()}.\n{remedy}")


def stale_remedy(what: str) -> str:
    return (f"FORCE=1 retrains {what} under the new inputs (its old results are deleted); to keep "
            f"both, give the new settings a name of their own: NAME=<new name>, or a new "
            f"experiment file configs/<new name>.yaml")


# --------------------------------------------------------------------------------------------
# The competition's files, read once per command (fingerprints.remembered)


def _files_key(data: DataConfig) -> str:
    """Every data setting: which files are read and how (the key of what is read once)."""
    return data.model_dump_json()


def labelled_rows(data: DataConfig) -> pd.DataFrame:
    """The labelled rows (`load_train_table`), read once per command; a copy the caller owns."""
    return once(("labelled rows", _files_key(data)), lambda: load_train_table(data)).copy()


def test_ids(data: DataConfig) -> list[str]:
    """The test ids in order (`load_test_ids`), read once per command; a list the caller owns."""
    return list(once(("test ids", _files_key(data)), lambda: load_test_ids(data)))


def image_files(data: DataConfig, part: str, ids: list[str]) -> list[Path]:
    """The image of each id of `part` ("train" or "test"), built once per command and id list
    (the experiments' and the audit's fingerprints ask for the same ones; ~15 us an image, a
    second at 35,000); a list the caller owns."""
    paths_of = train_image_paths if part == "train" else test_image_paths
    return list(once((f"{part} paths", _files_key(data), tuple(ids)),
                     lambda: paths_of(data, ids)))


def train_images_fingerprint(data: DataConfig, ids: list[str]) -> str:
    """The training images of `ids` (each one's size and mtime), stat'ed once per command and
    id list: every experiment and every submission asks for it."""
    return once(("train images", _files_key(data), tuple(ids)),
                lambda: images_fingerprint(ids, image_files(data, "train", ids)))


# --------------------------------------------------------------------------------------------
# Folds


def fold_inputs(data: DataConfig, folds: FoldsConfig, layout: Layout | None,
                table: pd.DataFrame | None = None) -> tuple[dict, dict]:
    """(input fingerprints, readable details) of the folds stage, from the files as they are now.

    Reads train.csv and stats every labelled image (no decoding): cheap enough for every stage
    that reads the folds to ask whether they still fit the data.
    """
    table = labelled_rows(data) if table is None else table
    settings = {"n_splits": folds.n_splits, "seed": folds.seed,
                "group_column": data.group_column, "group_pattern": data.group_pattern,
                "drop_bad_images": data.drop_bad_images}
    # the settings added since 0.2 are named only when set, so that folds made before keep
    # their fingerprint
    if data.max_image_pixels != MAX_IMAGE_PIXELS:  # it decides which images are bad
        settings["max_image_pixels"] = data.max_image_pixels
    if not folds.duplicates or folds.duplicate_conflicts != "keep":
        settings.update(duplicates=folds.duplicates, duplicate_conflicts=folds.duplicate_conflicts)
    inputs = {"rows": rows_fingerprint(table, data.classes),
              "train_images": train_images_fingerprint(data, table["id"].tolist()),
              "fold_settings": fingerprint(settings)}
    groups = duplicate_groups(layout) if folds.duplicates and layout is not None else None
    if groups is not None:  # an audit found copies: they are part of what the folds are made of
        inputs["duplicates"] = table_fingerprint(groups, ["group", "id"])
    return inputs, {"settings": settings, "rows": len(table)}


def unvouched_duplicates(layout: Layout) -> str:
    """Why the competition's duplicates.csv is not the one a finished audit wrote ('' when it
    is, or when there is none): the audit writes its manifest last, so a file without one, or
    other than its manifest recorded, is of an audit that stopped mid-way (or was edited)."""
    path = layout.findings.duplicates
    if not path.is_file():
        return ""
    manifest = read_manifest(layout.findings.manifest(path))
    if manifest is None or path.name not in manifest.outputs:
        return "no finished audit wrote it (it has no manifest: an audit stopped mid-way?)"
    if file_digest(path) != manifest.outputs[path.name]:
        return ("it differs from what the audit recorded (changed after `make audit`, or an "
                "audit stopped before its manifest)")
    return ""


def duplicate_groups(layout: Layout) -> pd.DataFrame | None:
    """The labelled rows in duplicate groups of the competition's audit (group, id, label) that
    hold two labelled images or more: only those constrain the folds. None without such a group
    (or a finished audit: `unvouched_duplicates`), so that an audit finding only test copies
    leaves the folds current."""
    table = None if unvouched_duplicates(layout) else read_duplicates(layout.findings.duplicates)
    if table is None:
        return None
    train = table[table["part"] == "train"]
    train = train[train["group"].map(train["group"].value_counts()) > 1]
    return None if train.empty else train[["group", "id", "label"]].reset_index(drop=True)


def folds_freshness(data: DataConfig, folds: FoldsConfig, layout: Layout) -> Freshness:
    inputs, details = fold_inputs(data, folds, layout)
    return freshness(layout.folds_manifest, inputs, details)


def read_folds_unchecked(data: DataConfig, layout: Layout) -> pd.DataFrame:
    """The fold file as written (ids as strings, `target` the class index, -1 for a label of
    another class list), without asking whether it still fits the data."""
    frame = pd.read_csv(layout.folds_csv, dtype={"id": str, "label": str, "group": str},
                        keep_default_na=False)
    return frame.assign(target=targets_of(frame["label"], data.classes))


def read_folds(data: DataConfig, folds: FoldsConfig, layout: Layout) -> pd.DataFrame:
    """folds/<competition>.csv, refused unless it fits the data as it is now.

    A train.csv edited since `make folds` (a fixed label, new rows), other fold settings or
    changed training images make the folds stale: every stage that reads them stops here and
    says so, instead of training on the old labels.
    """
    path = layout.folds_csv
    if not path.is_file():
        hint = ""
        if layout.old_folds_csv.is_file():
            hint = (f" ({layout.old_folds_csv} is of the old layout, shared by every "
                    f"competition; it is not read)")
        raise PipelineError(f"{path} not found{hint}: run `{make_command('folds', data.name)}` "
                            f"first")
    inputs, details = fold_inputs(data, folds, layout)
    fresh = freshness(layout.folds_manifest, inputs, details)
    if not fresh.current:
        raise PipelineError(f"{path} does not fit {data.name} as it is now: {fresh.why()}. "
                            f"{_folds_remedy(data, fresh, details['settings'])}; runs "
                            f"trained on the old folds are then reported as stale")
    return read_folds_unchecked(data, layout)


# The fold settings (fold_inputs) as overrides: these are folds.*, the others data.*
FOLD_SECTION_KEYS = ("n_splits", "seed", "duplicates", "duplicate_conflicts")


def _fold_override(key: str, value: Any) -> str:
    section = "folds" if key in FOLD_SECTION_KEYS else "data"
    text = json.dumps(value) if value is None or isinstance(value, bool) else value  # YAML's
    return f"{section}.{key}={text}"


def _folds_remedy(data: DataConfig, fresh: Freshness, now: dict[str, Any]) -> str:
    """Split again, with this command's fold settings where they differ from the folds' (so
    `make folds ARGS=folds.n_splits=2` then a command without it is told both ways out)."""
    then = (fresh.manifest.details if fresh.manifest else {}).get("settings") or {}
    changed = [key for key in now if key in then and then[key] != now[key]]
    if not changed:
        return (f"Run `{make_command('folds', data.name)}` to split again (add "
                f"ARGS=data.drop_bad_images=true to leave bad images out)")
    keep = " ".join(_fold_override(key, then[key]) for key in changed)
    again = " ".join(_fold_override(key, now[key]) for key in changed)
    return (f"To use the folds as they are, give this command ARGS=\"{keep}\"; to split again "
            f"with this command's settings, run `{make_command('folds', data.name, ARGS=again)}`")


def fold_numbers(folds: pd.DataFrame) -> list[int]:
    return sorted(int(f) for f in folds["fold"].unique())


# --------------------------------------------------------------------------------------------
# Training


def pseudo_fingerprint(train_pseudo: str | None, layout: Layout) -> str | None:
    """The training input of a pseudo-label set (train.pseudo): its manifest, which holds the
    digests of every part; None without one."""
    if not train_pseudo:
        return None
    path = layout.pseudo_set(train_pseudo).manifest
    if not path.is_file():
        remedy = make_command("pseudo", layout.competition, MODEL="<round-two experiment>")
        raise PipelineError(f"no pseudo-label set {train_pseudo} in {layout.pseudo}: run "
                            f"`{remedy}` first")
    return fingerprint(path.read_text())


def training_inputs(experiment: Config, folds: pd.DataFrame,
                    layout: Layout) -> tuple[dict[str, str], dict[str, Any]]:
    """(input fingerprints, readable details) of every fold's training: the fold assignment, the
    result-changing settings, the training images and the pseudo-label set."""
    data = experiment.data
    ids = folds["id"].tolist()
    settings = training_settings(experiment.to_dict())
    # the stem the model is built with, not `auto`: a run of `auto` that takes the ImageNet
    # stem is the run it was before `auto` existed, and stays current
    settings["model"]["stem"] = built_stem(experiment.model, experiment.augment.image_size)[0]
    inputs = {"folds": folds_fingerprint(folds), "settings": fingerprint(settings),
              "train_images": train_images_fingerprint(data, ids)}
    pseudo = pseudo_fingerprint(experiment.train.pseudo, layout)
    if pseudo is not None:
        inputs["pseudo"] = pseudo
    if experiment.train.exclude:
        inputs["exclude"] = fingerprint(sorted(excluded_ids(experiment.train.exclude, layout)))
    if experiment.train.ema:
        inputs["oof"] = fingerprint(EMA_OOF)
    return inputs, {"settings": settings}


def excluded_ids(path: str, layout: Layout | None = None) -> set[str]:
    """The ids of train.exclude's CSV: rows left out of training. `layout`: the competition's,
    for the remedy (training_inputs checks the file first, with it)."""
    source = Path(path)
    if not source.is_file():
        where = layout.findings.label_issues("<m>") if layout else "label_issues_<m>.csv"
        remedy = make_command("audit", layout.competition, MODEL="<m>") if layout else "make audit"
        raise PipelineError(f"train.exclude={path}: no such file; `{remedy}` writes {where}")
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    if "id" not in frame.columns:
        raise PipelineError(f"train.exclude={path}: no `id` column (columns: "
                            f"{list(frame.columns)})")
    return set(frame["id"])


def train_freshness(part: Part, inputs: dict[str, str], details: dict[str, Any]) -> Freshness:
    return freshness(part.train_manifest, inputs, details)


# --------------------------------------------------------------------------------------------
# Prediction


def read_test_set(data: DataConfig) -> tuple[list[str], str]:
    """(test ids, fingerprint of the ids in order and of each test image's size and mtime)."""
    ids = test_ids(data)
    fingerprinted = once(("test images", _files_key(data)),
                         lambda: images_fingerprint(ids, image_files(data, "test", ids)))
    return ids, fingerprint([ids, fingerprinted])


def predict_inputs(part: Part, tta: TTAConfig, test_fingerprint: str,
                   valid: pd.DataFrame | None) -> dict[str, str]:
    """What a prediction is made from: the checkpoint's bytes, the test set, the TTA settings and,
    for the out-of-fold rows, the fold's rows."""
    inputs = {"checkpoint": file_digest(part.best), "test": test_fingerprint,
              "tta": fingerprint(without_added_off("tta", tta.model_dump()))}
    if valid is not None:
        inputs["folds"] = fingerprint(valid[["id", "label"]].astype(str).to_numpy().tolist())
    return inputs


def recorded_tta(part: Part) -> TTAConfig | None:
    """The TTA settings a part's predictions were made with (from its predict manifest)."""
    manifest = read_manifest(part.predict_manifest)
    if manifest is None or "tta" not in manifest.details:
        return None
    return TTAConfig(**manifest.details["tta"])


def prediction_freshness(part: Part, tta: TTAConfig, test_fingerprint: str,
                         valid: pd.DataFrame | None) -> Freshness:
    """Whether a part's predictions are current, under the TTA they were made with (else `tta`):
    TTA is chosen at predict time (`make predict TTA=d4`), so a later stage takes the views as
    made and checks only that the checkpoint, the test set and the rows are the ones of now."""
    made = recorded_tta(part) or tta
    return freshness(part.predict_manifest,
                     predict_inputs(part, made, test_fingerprint, valid))


# --------------------------------------------------------------------------------------------
# The refit


@dataclass(frozen=True)
class RefitPlan:
    """What a full-data refit is made from: the fold runs' inputs, its epoch count (and where
    that came from) and the learning-rate path of the folds it walks again."""

    inputs: dict[str, str]
    details: dict[str, Any]
    epochs: int
    source: str
    path: FoldPath


def fold_best_epochs(exp: Experiment, folds: list[int], metric: str) -> list[int]:
    """Each listed fold's best epoch (1-based), from its log, as it chose its best.pt."""
    return best_epochs([pd.read_csv(exp.fold(k).log) for k in folds], metric)


def refit_epochs(refit: RefitConfig, name: str, validated: list[int],
                 competition: str) -> tuple[int, str]:
    """(epochs, where the number came from): refit.epochs, else the median best epoch of the
    current folds (`validated`) of experiment `name`."""
    if refit.epochs is not None:
        return refit.epochs, "refit.epochs"
    if not validated:
        raise PipelineError(f"no current trained fold of {name} to take the epoch count from: "
                            f"run `{make_command('train', competition, MODEL=name)}` first, or "
                            f"set ARGS=refit.epochs=N")
    return int(round(float(np.median(validated)))), f"median best epoch of folds {validated}"


def fold_path(train: TrainConfig, folds: pd.DataFrame, epochs: int,
              validated: list[int]) -> FoldPath:
    """The folds' learning-rate path up to the epoch CV chose (the median of the current folds'
    best epochs `validated`; `epochs` when there are none), for the refit to walk again."""
    train_sizes = [int((folds["fold"] != k).sum()) for k in folds["fold"].unique()]
    steps = steps_per_epoch(int(np.median(train_sizes)), train.batch_size, train.max_batches)
    until = float(np.median(validated)) if validated else float(epochs)
    return FoldPath(steps_per_epoch=steps, epochs=train.epochs, until=until)


def refit_plan(experiment: Config, folds: pd.DataFrame, layout: Layout) -> RefitPlan:
    """The refit's inputs: the fold runs' inputs plus its epoch count and learning-rate path."""
    exp = layout.experiment(experiment.run_name)
    current = current_folds(experiment, folds, layout)
    validated = fold_best_epochs(exp, current, experiment.data.metric)
    epochs, source = refit_epochs(experiment.refit, experiment.run_name, validated,
                                   experiment.data.name)
    path = fold_path(experiment.train, folds, epochs, validated)
    inputs, details = training_inputs(experiment, folds, layout)
    inputs["epochs"] = fingerprint([epochs, source, path.steps_per_epoch, path.epochs, path.until])
    details = {**details, "epochs": epochs, "epochs_from": source,
               "lr_path": {"fold_steps_per_epoch": path.steps_per_epoch,
                           "fold_epochs": path.epochs, "until_fold_epoch": path.until}}
    return RefitPlan(inputs, details, epochs, source, path)


def current_folds(experiment: Config, folds: pd.DataFrame, layout: Layout) -> list[int]:
    """The folds of the fold file whose training is current (the same inputs, files intact)."""
    inputs, details = training_inputs(experiment, folds, layout)
    exp = layout.experiment(experiment.run_name)
    return [k for k in fold_numbers(folds)
            if train_freshness(exp.fold(k), inputs, details).current]


# --------------------------------------------------------------------------------------------
# Which experiment a command means


def audited_images(data: DataConfig) -> tuple[pd.DataFrame, list[Path]]:
    """(part, id, label of every labelled and test image; their paths), labelled rows first."""
    train, test = labelled_rows(data), test_ids(data)
    frame = pd.DataFrame({"part": ["train"] * len(train) + ["test"] * len(test),
                          "id": [*train["id"], *test],
                          "label": [*train["label"], *[""] * len(test)]})
    paths = image_files(data, "train", train["id"].tolist()) + image_files(data, "test", test)
    return frame, paths


def audit_image_inputs(data: DataConfig, frame: pd.DataFrame, paths: list[Path]) -> dict[str, str]:
    """The fingerprints every finding is made from: the labelled rows and every image file."""
    train = frame[frame["part"] == "train"]
    return {"rows": rows_fingerprint(train, data.classes),
            "images": images_fingerprint(frame["part"] + "/" + frame["id"], paths)}
