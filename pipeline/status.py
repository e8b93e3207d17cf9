"""Each stage's inputs, the one freshness rule, and the state of an experiment.

    python -m pipeline status --data digits --model resnet18     # make status MODEL=resnet18

Every stage writes a manifest of what it read (pipeline/provenance.py); this module says what each
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

`ExperimentState` is the one answer to "which folds of an experiment are trained, predicted and
current, is its refit, and can it join an ensemble?", read by ensemble, runs, status, bundle and
pseudo alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline.config import (DATA_FILE_KEYS, Config, DataConfig, EnsembleConfig, FoldsConfig,
                             RefitConfig, TrainConfig, TTAConfig, changed_keys, config_from_dict,
                             load_config, resolve_experiment, training_settings)
from pipeline.data import (MAX_IMAGE_PIXELS, load_test_ids, load_train_table, test_image_paths,
                           train_image_paths)
from pipeline.layout import Experiment, Layout, Part, part_name
from pipeline.models import is_timm_name, model_names
from pipeline.probfiles import oof_file, read_probs
from pipeline.dupes import read_duplicates
from pipeline.provenance import (Manifest, file_digest, fingerprint, folds_fingerprint,
                                 images_fingerprint, outputs_problems, read_manifest,
                                 rows_fingerprint, table_fingerprint)
from pipeline.schedule import FoldPath, steps_per_epoch
from pipeline.scoring import Scorer, best_epochs, targets_of
from pipeline.utils import PipelineError

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
        if name == "settings" and details_then and details_now and \
                "settings" in details_then and "settings" in details_now:
            what = _settings_change(details_then["settings"], details_now["settings"])
        reasons.append(f"{what} changed" if name in recorded and name in now
                       else f"{what} {'not recorded' if name in now else 'no longer used'}")
    return reasons


def _settings_change(then: dict[str, Any], now: dict[str, Any]) -> str:
    keys = changed_keys(then, now)
    if not keys:  # equal values, other keys: the pipeline's settings were added or removed
        return "the set of settings (this version of the pipeline has other ones)"
    return f"the settings ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"


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
# Folds


def fold_inputs(data: DataConfig, folds: FoldsConfig, layout: Layout | None,
                table: pd.DataFrame | None = None) -> tuple[dict, dict]:
    """(input fingerprints, readable details) of the folds stage, from the files as they are now.

    Reads train.csv and stats every labelled image (no decoding): cheap enough for every stage
    that reads the folds to ask whether they still fit the data.
    """
    table = load_train_table(data) if table is None else table
    settings = {"n_splits": folds.n_splits, "seed": folds.seed,
                "group_column": data.group_column, "group_pattern": data.group_pattern,
                "drop_bad_images": data.drop_bad_images}
    # the settings added since 0.2 are named only when set, so that folds made before keep
    # their fingerprint
    if data.max_image_pixels != MAX_IMAGE_PIXELS:  # it decides which images are bad
        settings["max_image_pixels"] = data.max_image_pixels
    if not folds.duplicates or folds.duplicate_conflicts != "keep":
        settings.update(duplicates=folds.duplicates, duplicate_conflicts=folds.duplicate_conflicts)
    paths = train_image_paths(data, table["id"].tolist())
    inputs = {"rows": rows_fingerprint(table, data.classes),
              "train_images": images_fingerprint(table["id"].tolist(), paths),
              "fold_settings": fingerprint(settings)}
    groups = duplicate_groups(layout) if folds.duplicates and layout is not None else None
    if groups is not None:  # an audit found copies: they are part of what the folds are made of
        inputs["duplicates"] = table_fingerprint(groups, ["group", "id"])
    return inputs, {"settings": settings, "rows": len(table)}


def duplicate_groups(layout: Layout) -> pd.DataFrame | None:
    """The labelled rows in duplicate groups of the competition's audit (group, id, label) that
    hold two labelled images or more: only those constrain the folds. None without such a group
    (or an audit), so that an audit finding only test copies leaves the folds current."""
    table = read_duplicates(layout.findings.duplicates)
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
        raise PipelineError(f"{path} not found{hint}: run `make folds DATA={data.name}` first")
    fresh = folds_freshness(data, folds, layout)
    if not fresh.current:
        raise PipelineError(f"{path} does not fit {data.name} as it is now: {fresh.why()}. "
                            f"Run `make folds DATA={data.name}` to split again (add "
                            f"ARGS=data.drop_bad_images=true to leave bad images out); runs "
                            f"trained on the old folds are then reported as stale")
    return read_folds_unchecked(data, layout)


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
        raise PipelineError(f"no pseudo-label set {train_pseudo} in {layout.pseudo}: run "
                            f"`make pseudo MODEL=...` first")
    return fingerprint(path.read_text())


def training_inputs(experiment: Config, folds: pd.DataFrame,
                    layout: Layout) -> tuple[dict[str, str], dict[str, Any]]:
    """(input fingerprints, readable details) of every fold's training: the fold assignment, the
    result-changing settings, the training images and the pseudo-label set."""
    data = experiment.data
    ids = folds["id"].tolist()
    settings = training_settings(experiment.to_dict())
    inputs = {"folds": folds_fingerprint(folds), "settings": fingerprint(settings),
              "train_images": images_fingerprint(ids, train_image_paths(data, ids))}
    pseudo = pseudo_fingerprint(experiment.train.pseudo, layout)
    if pseudo is not None:
        inputs["pseudo"] = pseudo
    if experiment.train.exclude:
        inputs["exclude"] = fingerprint(sorted(excluded_ids(experiment.train.exclude)))
    if experiment.train.ema:
        inputs["oof"] = fingerprint(EMA_OOF)
    return inputs, {"settings": settings}


def excluded_ids(path: str) -> set[str]:
    """The ids of train.exclude's CSV: rows left out of training."""
    source = Path(path)
    if not source.is_file():
        raise PipelineError(f"train.exclude={path}: no such file; `make audit MODEL=<m>` writes "
                            f"audit/<competition>/label_issues_<m>.csv")
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
    ids = load_test_ids(data)
    return ids, fingerprint([ids, images_fingerprint(ids, test_image_paths(data, ids))])


def predict_inputs(part: Part, tta: TTAConfig, test_fingerprint: str,
                   valid: pd.DataFrame | None) -> dict[str, str]:
    """What a prediction is made from: the checkpoint's bytes, the test set, the TTA settings and,
    for the out-of-fold rows, the fold's rows."""
    inputs = {"checkpoint": file_digest(part.best), "test": test_fingerprint,
              "tta": fingerprint(tta.model_dump())}
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


def refit_epochs(refit: RefitConfig, name: str, validated: list[int]) -> tuple[int, str]:
    """(epochs, where the number came from): refit.epochs, else the median best epoch of the
    current folds (`validated`) of experiment `name`."""
    if refit.epochs is not None:
        return refit.epochs, "refit.epochs"
    if not validated:
        raise PipelineError(f"no current trained fold of {name} to take the epoch count from: "
                            f"run `make train MODEL={name}` first, or set ARGS=refit.epochs=N")
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
    epochs, source = refit_epochs(experiment.refit, experiment.run_name, validated)
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


def load_experiment(data: str, model: str, overrides: list[str] | tuple[str, ...] = (),
                    name: str | None = None) -> Config:
    """The config of MODEL=...: an experiment file (configs/<name>.yaml, a YAML path), a model
    name (the defaults with that model), or else the name of an experiment the competition
    already has (runs/<competition>/<name>/config.yaml: the settings it was trained with), so a
    remedy that names an experiment (`make predict MODEL=resnet18-seed1`) works as printed."""
    if resolve_experiment(model)[2] is None and model not in model_names() \
            and not is_timm_name(model):
        exp = Layout.of(load_config(data, None, overrides)).experiment(model.replace("/", "-"))
        if exp.config.is_file():
            saved = yaml.safe_load(exp.config.read_text()) or {}
            return load_config(data, exp.name, overrides, name, saved=(saved, str(exp.config)))
    return load_config(data, model, overrides, name)


def experiment_configs(data: str, model: str, overrides: list[str] | tuple[str, ...] = (),
                       name: str | None = None, seeds: list[int] | None = None) -> list[Config]:
    """One config per seed of SEEDS=0,1,2 (each an experiment of its own:
    <experiment>-seed<s>), or the one config of the command line."""
    if not seeds:
        return [load_experiment(data, model, overrides, name)]
    if name is not None:
        raise PipelineError("NAME= names one run; with SEEDS= each seed's run is named "
                            "<experiment>-seed<s>")
    return [load_experiment(data, model, [*overrides, f"train.seed={seed}"]) for seed in seeds]


# --------------------------------------------------------------------------------------------
# The state of an experiment


def experiment_config(exp: Experiment) -> Config | None:
    """The resolved config an experiment was trained with (its config.yaml), or None."""
    if not exp.config.is_file():
        return None
    return config_from_dict(yaml.safe_load(exp.config.read_text()) or {})


@dataclass
class FoldState:
    fold: int
    train: Freshness
    predict: Freshness | None  # None: not (currently) trained, nothing to predict


@dataclass
class ExperimentState:
    """Which folds of an experiment are trained, predicted and current, and its refit's state."""

    name: str
    config: Config
    exp: Experiment
    folds: list[FoldState] = field(default_factory=list)
    refit_train: Freshness | None = None  # None: never refitted
    refit_predict: Freshness | None = None
    refit_unchecked: str | None = None  # why the refit's inputs cannot be computed now
    error: str | None = None  # the folds file no longer fits the data: every fold is stale

    @property
    def current_folds(self) -> list[int]:
        return [f.fold for f in self.folds if f.train.current]

    @property
    def predicted_folds(self) -> list[int]:
        """Folds trained and predicted under the inputs of now: what an ensemble reads."""
        return [f.fold for f in self.folds if f.train.current and f.predict and f.predict.current]

    @property
    def missing_folds(self) -> list[int]:
        return [f.fold for f in self.folds if f.train.state == "missing"]

    @property
    def refit_current(self) -> bool:
        return bool(self.refit_train and self.refit_train.current and self.refit_predict
                    and self.refit_predict.current)

    def status(self) -> str:
        """One phrase for `make runs`: complete, partial, stale and why, what is left to do."""
        if self.error:
            return f"stale: {self.error}"
        stale = [f for f in self.folds if f.train.state == "stale"]
        if stale:
            return f"stale: fold {stale[0].fold}: {stale[0].train.why()}"
        done = self.current_folds
        if not done:
            return "not trained"
        n = len(self.folds)
        text = "complete" if len(done) == n else f"partial ({len(done)} of {n} folds)"
        unpredicted = [k for k in done if k not in self.predicted_folds]
        if unpredicted:
            text += f", fold(s) {unpredicted} to predict"
        if self.refit_train is not None:
            text += ", refit" + ("" if self.refit_train.current else " stale")
        return text

    def problems(self, use_refit: bool) -> list[str]:
        """Why the experiment cannot join an ensemble as it is, each with its remedy (missing
        folds are the caller's to judge: PARTIAL=1 allows them)."""
        problems = []
        for f in self.folds:
            if f.train.state == "stale":
                problems.append(f"fold {f.fold} is stale ({f.train.why()}): `make train "
                                f"MODEL={self.name} FORCE=1` retrains it")
            elif f.predict is not None and not f.predict.current:
                problems.append(f"fold {f.fold}'s predictions are {f.predict.state} "
                                f"({f.predict.why()}): run `make predict MODEL={self.name}`")
        if use_refit:
            problems += self._refit_problems()
        views = {json.dumps(tta.model_dump(), sort_keys=True)
                 for tta in self.ttas(use_refit and self.refit_current).values()}
        if len(views) > 1:
            problems.append(f"its folds were predicted with different TTA settings "
                            f"({sorted(views)}): `make predict MODEL={self.name} TTA=<views>` "
                            f"predicts them all alike")
        return problems

    def _refit_problems(self) -> list[str]:
        leave_out = "; or leave the refit out: ARGS=ensemble.refit_weight=0"
        if self.refit_train is None:
            return []
        if self.refit_unchecked:
            return [f"its refit cannot be checked: {self.refit_unchecked}{leave_out}"]
        if not self.refit_train.current:
            return [f"its refit is stale ({self.refit_train.why()}): `make refit "
                    f"MODEL={self.name} FORCE=1`{leave_out}"]
        if self.refit_predict is None or not self.refit_predict.current:
            state = self.refit_predict.state if self.refit_predict else "missing"
            why = self.refit_predict.why() if self.refit_predict else "not predicted"
            return [f"its refit's predictions are {state} ({why}): `make refit "
                    f"MODEL={self.name}`{leave_out}"]
        return []

    def ttas(self, with_refit: bool) -> dict[str, TTAConfig]:
        """The TTA settings each predicted part (fold<k>, full) was predicted with."""
        parts = [self.exp.fold(k) for k in self.predicted_folds]
        parts += [self.exp.refit] if with_refit else []
        found = {part.name: recorded_tta(part) for part in parts}
        return {name: tta for name, tta in found.items() if tta is not None}

    def tta(self, with_refit: bool) -> TTAConfig:
        """The one TTA setting its predictions were made with (its config's when unrecorded)."""
        return next(iter(self.ttas(with_refit).values()), self.config.tta)


def _fold_state(tta: TTAConfig, part: Part, fold: int, folds: pd.DataFrame,
                trained: Freshness, test_fingerprint: str, folds_error: str | None) -> FoldState:
    if folds_error and trained.current:
        trained = Freshness("stale", [folds_error], trained.manifest)
    predicted = None
    if trained.current:
        predicted = prediction_freshness(part, tta, test_fingerprint,
                                         folds[folds["fold"] == fold])
    return FoldState(fold, trained, predicted)


def _refit_state(state: ExperimentState, folds: pd.DataFrame, layout: Layout,
                 test_fingerprint: str) -> None:
    part = state.exp.refit
    if not part.train_manifest.is_file():
        return
    try:
        plan = refit_plan(state.config, folds, layout)
    except PipelineError as err:
        state.refit_unchecked = str(err)
        state.refit_train = Freshness("stale", [f"it cannot be checked: {err}"])
        return
    state.refit_train = freshness(part.train_manifest, plan.inputs, plan.details)
    if state.refit_train.current:
        state.refit_predict = prediction_freshness(part, state.config.tta, test_fingerprint, None)


def experiment_state(data: DataConfig, layout: Layout, name: str, folds: pd.DataFrame,
                     test_fingerprint: str, folds_error: str | None = None,
                     experiment: Config | None = None,
                     with_refit: bool = True) -> ExperimentState | None:
    """The state of experiment `name` under the fold file, test set and data of now (None: no
    such experiment). `folds_error`: the fold file no longer fits the data (every fold is stale).

    Judged against `experiment` (the settings of a command line, as `make train` would judge
    them) or else the settings it was trained with (its config.yaml), read with the competition's
    file settings of now (`with_data_files`). `with_refit`: judge its refit too.
    """
    exp = layout.experiment(name)
    inputs_layout = layout
    if experiment is None:
        experiment = experiment_config(exp)
        if experiment is None:
            return None
        experiment = with_data_files(experiment, data)
        # its pseudo-label set is where it was trained from (a where-setting of its own)
        inputs_layout = replace(layout, pseudo=Path(experiment.pseudo_dir) / data.name)
    experiment = experiment.model_copy(update={"run_name": name})
    state = ExperimentState(name, experiment, exp, error=folds_error)
    try:
        inputs, details = training_inputs(experiment, folds, inputs_layout)
    except PipelineError as err:  # e.g. its pseudo-label set is gone: every fold is stale
        inputs, details = {"unreadable": str(err)}, {}
        state.error = state.error or str(err)
    for k in fold_numbers(folds):
        part = exp.fold(k)
        trained = train_freshness(part, inputs, details)
        state.folds.append(_fold_state(experiment.tta, part, k, folds, trained,
                                       test_fingerprint, state.error))
    if with_refit and not state.error:
        _refit_state(state, folds, inputs_layout, test_fingerprint)
    return state


def with_data_files(experiment: Config, data: DataConfig) -> Config:
    """A saved experiment with the competition's file settings of now (where its files are, how
    the test side is submitted: config.DATA_FILE_KEYS), its result-changing data settings kept:
    a moved data folder is the same experiment, another metric or class list is not."""
    files = {key: getattr(data, key) for key in DATA_FILE_KEYS}
    return experiment.model_copy(update={"data": experiment.data.model_copy(update=files)})


def joined_oof(exp: Experiment, folds: list[int], tta: bool = False) -> pd.DataFrame:
    """The OOF rows of the listed folds in one table (oof_tta.csv with `tta`)."""
    return pd.concat([read_probs(exp.fold(k).oof_tta if tta else exp.fold(k).oof)
                      for k in folds])


def cv_numbers(state: ExperimentState, scorer: Scorer) -> dict[str, Any]:
    """Mean ± std of the current folds' metric, the OOF metric, the TTA gain and training time."""
    exp, done = state.exp, state.current_folds
    numbers: dict[str, Any] = {"cv_mean": np.nan, "cv_std": np.nan, "oof": np.nan,
                               "tta_gain": np.nan, "minutes": "0.0"}
    if not done:
        return numbers
    scores = [scorer.score_frame(read_probs(exp.fold(k).oof)) for k in done]
    seconds = sum(float(pd.read_csv(exp.fold(k).log)["seconds"].sum()) for k in done)
    numbers.update(cv_mean=float(np.mean(scores)), cv_std=float(np.std(scores)),
                   oof=scorer.score_frame(joined_oof(exp, done)), minutes=f"{seconds / 60:.1f}")
    predicted = state.predicted_folds
    if len(predicted) == len(done) and state.tta(False).views != "none":
        numbers["tta_gain"] = tta_gain(exp, predicted, scorer)
    return numbers


def tta_gain(exp: Experiment, folds: list[int], scorer: Scorer) -> float:
    """The OOF metric with TTA minus without, over the listed (predicted) folds."""
    return (scorer.score_frame(joined_oof(exp, folds, tta=True))
            - scorer.score_frame(joined_oof(exp, folds)))


# --------------------------------------------------------------------------------------------
# Submissions


def member_fingerprint(states: list[ExperimentState], refits: dict[str, bool],
                       settings: EnsembleConfig) -> str:
    """An ensemble's input: every member prediction it read (by its manifest) and its settings."""
    manifests = {}
    for state in states:
        for k in state.predicted_folds:
            manifests[f"{state.name}/{part_name(k)}"] = state.exp.fold(k).predict_manifest.read_text()
        if refits.get(state.name):
            manifests[f"{state.name}/{state.exp.refit.name}"] = \
                state.exp.refit.predict_manifest.read_text()
    return fingerprint([manifests, settings.model_dump()])


def submission_freshness(data: DataConfig, folds_cfg: FoldsConfig, layout: Layout,
                         manifest_file) -> Freshness:
    """Whether a submission still reflects its members as they are now (for runs and bundle)."""
    manifest = read_manifest(manifest_file)
    if manifest is None:
        return Freshness("missing", ["no manifest"])
    if manifest.stage != "ensemble":
        return freshness(manifest_file, manifest.inputs)  # e.g. a refit's own submission
    try:
        folds = read_folds(data, folds_cfg, layout)
        _, test_fingerprint = read_test_set(data)
        settings = EnsembleConfig(**manifest.details.get("settings", {}))
        refits = {name: weight > 0 for name, weight in
                  manifest.details.get("refit_weights", {}).items()}
        states = [experiment_state(data, layout, name, folds, test_fingerprint)
                  for name in manifest.details.get("members", [])]
    except (PipelineError, ValueError) as err:
        return Freshness("stale", [str(err)])
    problems = [f"{name}: no longer an experiment" for name, state in
                zip(manifest.details.get("members", []), states) if state is None]
    problems += [f"{s.name}: {p}" for s in states if s is not None
                 for p in s.problems(refits.get(s.name, False))]
    problems += [f"{s.name}: its refit, which this submission used, is missing or stale"
                 for s in states if s is not None and refits.get(s.name) and not s.refit_current
                 and not s.problems(True)]
    if problems:
        return Freshness("stale", problems, manifest)
    return freshness(manifest_file, {"members": member_fingerprint(states, refits, settings)})


# --------------------------------------------------------------------------------------------
# The audit's findings


def audited_images(data: DataConfig) -> tuple[pd.DataFrame, list[Path]]:
    """(part, id, label of every labelled and test image; their paths), labelled rows first."""
    train = load_train_table(data)
    test_ids = load_test_ids(data)
    frame = pd.DataFrame({"part": ["train"] * len(train) + ["test"] * len(test_ids),
                          "id": [*train["id"], *test_ids],
                          "label": [*train["label"], *[""] * len(test_ids)]})
    paths = train_image_paths(data, train["id"].tolist()) + test_image_paths(data, test_ids)
    return frame, paths


def audit_image_inputs(data: DataConfig, frame: pd.DataFrame, paths: list[Path]) -> dict[str, str]:
    """The fingerprints every finding is made from: the labelled rows and every image file."""
    train = frame[frame["part"] == "train"]
    return {"rows": rows_fingerprint(train, data.classes),
            "images": images_fingerprint(frame["part"] + "/" + frame["id"], paths)}


def label_issue_inputs(state: ExperimentState) -> dict[str, str]:
    """What an experiment's label suspects are made from: its current folds' OOF files (with
    TTA where predicted)."""
    files = [oof_file(state.exp.fold(k)) for k in state.current_folds]
    return {"oof": fingerprint([file_digest(path) for path in files])}


def findings_staleness(data: DataConfig, layout: Layout,
                       states: list[ExperimentState]) -> dict[str, str]:
    """For each finding of the audit on disk ("duplicates", "shift", "label suspects of <e>"):
    "" when it was made from the images, rows and OOF files of now, else what changed (its
    settings aside: a finding is what `make audit` found with the settings it had)."""
    findings, stale = layout.findings, {}
    frame, paths = audited_images(data)
    now = audit_image_inputs(data, frame, paths)
    for name, path in (("duplicates", findings.duplicates), ("shift", findings.shift)):
        manifest = read_manifest(findings.manifest(path))
        if path.is_file():
            stale[name] = _changed(manifest, now, "the images or labelled rows changed since")
    by_name = {s.name: s for s in states}
    for experiment, path in findings.label_issue_files().items():
        manifest, state = read_manifest(findings.manifest(path)), by_name.get(experiment)
        inputs = label_issue_inputs(state) if state and state.current_folds else {"oof": ""}
        stale[f"label suspects of {experiment}"] = _changed(
            manifest, inputs, f"{experiment}'s out-of-fold predictions changed since")
    return stale


def _changed(manifest: Manifest | None, now: dict[str, str], what: str) -> str:
    if manifest is None or any(manifest.inputs.get(k) != v for k, v in now.items()):
        return f"stale: {what} the audit (make audit again)"
    return ""
