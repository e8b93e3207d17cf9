"""The state of an experiment: which folds are trained, predicted and current, its refit, its
submissions and the audit's findings about it.

    python -m pipeline status --data digits --model resnet18     # make status MODEL=resnet18
    state = experiment_state(data, layout, name, folds, test_fingerprint)

`ExperimentState` is the one answer to "which folds of an experiment are trained, predicted and
current, is its refit, and can it join an ensemble?", read by ensemble, runs, status, bundle,
pseudo and the report alike. Every judgement in it asks the one rule of
pipeline/experiments/freshness.py. It also resolves which experiment a command means
(`load_experiment`: a file, a model name, or a saved experiment's name).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline.base.config import (
    DATA_FILE_KEYS,
    Config,
    DataConfig,
    EnsembleConfig,
    FoldsConfig,
    TTAConfig,
    config_from_dict,
    identity_suffix,
    load_config,
    resolve_experiment,
)
from pipeline.base.fingerprints import file_digest, fingerprint
from pipeline.base.task import Scorer
from pipeline.base.utils import PipelineError, make_command
from pipeline.experiments.budgets import with_budget
from pipeline.experiments.freshness import (
    Freshness,
    audit_image_inputs,
    audited_images,
    fold_numbers,
    freshness,
    prediction_freshness,
    read_folds,
    read_test_set,
    recorded_tta,
    refit_plan,
    train_freshness,
    training_inputs,
)
from pipeline.experiments.layout import REFIT, Experiment, Layout, Part, part_name
from pipeline.experiments.manifests import Manifest, read_manifest
from pipeline.experiments.probfiles import oof_file, read_probs
from pipeline.experiments.searches import searched_folds, searched_note
from pipeline.models.names import is_timm_name, model_names


# What each input means to a user, for the messages that say what changed.
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
            defined = defined_experiment(data, exp.name, saved, overrides=overrides, new_name=name)
            return defined or load_config(data, exp.name, overrides, name,
                                          saved=(saved, str(exp.config)))
    config = load_config(data, model, overrides, name)
    return with_budget(config, Layout.of(config))


def defined_experiment(data: str, name: str, saved: dict[str, Any], *,
                       overrides: list[str] | tuple[str, ...] = (),
                       new_name: str | None = None) -> Config | None:
    """Experiment `name` as its command defines it now: the experiment file it was trained
    from, as that file reads today, with the overrides of then (None: it came from no file, or
    the file is gone). Every command that names a saved experiment judges it so, as `make train`
    would: an edited experiment file makes its runs stale in `make runs` and `make ensemble` as
    in `make status`, not complete in some and stale in others. New `overrides` that change a
    result name another experiment, `name` with their suffix (or `new_name`, NAME=)."""
    source = saved.get("experiment_file")
    if not source or not Path(source).is_file():
        return None
    then = list(saved.get("overrides") or [])
    config = load_config(data, source, [*then, *overrides], name=new_name or name)
    if overrides and new_name is None:
        base = load_config(data, source, then, name=name)
        suffix = identity_suffix(base.to_dict(), config.to_dict())
        config = config.model_copy(update={"run_name": f"{name}-{suffix}" if suffix else name})
    return with_budget(config, Layout.of(config))


def experiment_configs(data: str, model: str, overrides: list[str] | tuple[str, ...] = (),
                       name: str | None = None, *, seeds: list[int] | None = None) -> list[Config]:
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
    searched: list[int] = field(default_factory=list)  # folds that chose its settings (make tune)

    @property
    def current_folds(self) -> list[int]:
        return [f.fold for f in self.folds if f.train.current]

    @property
    def scored_folds(self) -> list[int]:
        """The current folds its CV is made of: those no search chose its settings on."""
        return [k for k in self.current_folds if k not in self.searched]

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
        if self.searched:
            text += f"; {searched_note(self.exp)}"
        return text

    def remedy(self, verbs: str, **variables: object) -> str:
        """A printed command for this experiment, complete (DATA= included: base/utils.py)."""
        return make_command(verbs, self.config.data.name, MODEL=self.name, **variables)

    def problems(self, use_refit: bool) -> list[str]:
        """Why the experiment cannot join an ensemble as it is, each with its remedy (missing
        folds are the caller's to judge: PARTIAL=1 allows them)."""
        problems = []
        for f in self.folds:
            if f.train.state == "stale":
                problems.append(f"fold {f.fold} is stale ({f.train.why()}): "
                                f"`{self.remedy('train', FORCE=1)}` retrains it")
            elif f.predict is not None and not f.predict.current:
                problems.append(f"fold {f.fold}'s predictions are {f.predict.state} "
                                f"({f.predict.why()}): run `{self.remedy('predict')}`")
        if use_refit:
            problems += self._refit_problems()
        return problems + self._tta_problems(use_refit and self.refit_current)

    def _tta_problems(self, with_refit: bool) -> list[str]:
        """Parts predicted with other TTA settings than the rest, each named with its views, and
        the command that aligns them: the refit to its folds when the folds agree, else the folds
        to the setting most of them have (and the refit to it too)."""
        ttas = self.ttas(with_refit)
        if len({_tta_text(t) for t in ttas.values()}) <= 1:
            return []
        said = ", ".join(f"{_part_label(part)}: {_tta_text(t)}" for part, t in ttas.items())
        folds = [t for part, t in ttas.items() if part != REFIT]
        target = Counter(folds).most_common(1)[0][0]
        refit = ttas.get(REFIT)
        steps = []
        if any(t != target for t in folds):
            steps.append(f"`{self.remedy('predict', **self._tta_variables(target))}`")
        if refit is not None and refit != target:
            steps.append(f"`{self.remedy('refit', **self._tta_variables(target))}`")
        return [f"its parts were predicted with different TTA settings ({said}): "
                f"{' then '.join(steps)} predicts them all alike"]

    def _tta_variables(self, tta: TTAConfig) -> dict[str, str | None]:
        """TTA= and, for its other settings where they differ from the experiment's, ARGS=."""
        others = [f"tta.{key}={value}" for key, value in tta.model_dump().items()
                  if key != "views" and value != getattr(self.config.tta, key)]
        return {"TTA": tta.views, "ARGS": " ".join(others) or None}

    def _refit_problems(self) -> list[str]:
        leave_out = "; or leave the refit out: ARGS=ensemble.refit_weight=0"
        if self.refit_train is None:
            return []
        if self.refit_unchecked:
            return [f"its refit cannot be checked: {self.refit_unchecked}{leave_out}"]
        if not self.refit_train.current:
            return [f"its refit is stale ({self.refit_train.why()}): "
                    f"`{self.remedy('refit', FORCE=1)}`{leave_out}"]
        if self.refit_predict is None or not self.refit_predict.current:
            state = self.refit_predict.state if self.refit_predict else "missing"
            why = self.refit_predict.why() if self.refit_predict else "not predicted"
            return [f"its refit's predictions are {state} ({why}): "
                    f"`{self.remedy('refit')}`{leave_out}"]
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


def _part_label(part: str) -> str:
    """`fold 0`, `the refit`: a part as a message names it."""
    return "the refit" if part == REFIT else part.replace("fold", "fold ")


def _tta_text(tta: TTAConfig) -> str:
    """`flips`, or `flips (reduce=geomean)` where a setting besides the views is not the default."""
    others = [f"{key}={value}" for key, value in tta.model_dump().items()
              if key != "views" and value != getattr(TTAConfig(), key)]
    return tta.views + (f" ({', '.join(others)})" if others else "")


def _fold_state(tta: TTAConfig, part: Part, fold: int, folds: pd.DataFrame,
                *, trained: Freshness, test_fingerprint: str, folds_error: str | None) -> FoldState:
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
                     *, test_fingerprint: str, folds_error: str | None = None,
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
        experiment = _judged_by(data, exp)
        if experiment is None:
            return None
        # its pseudo-label set is where it was trained from (a where-setting of its own)
        inputs_layout = replace(layout, pseudo=Path(experiment.pseudo_dir) / data.name)
    experiment = experiment.model_copy(update={"run_name": name})
    state = ExperimentState(name, experiment, exp, error=folds_error, searched=searched_folds(exp))
    try:
        inputs, details = training_inputs(experiment, folds, inputs_layout)
    except PipelineError as err:  # e.g. its pseudo-label set is gone: every fold is stale
        inputs, details = {"unreadable": str(err)}, {}
        state.error = state.error or str(err)
    for k in fold_numbers(folds):
        part = exp.fold(k)
        trained = train_freshness(part, inputs, details)
        state.folds.append(_fold_state(experiment.tta, part, k, folds, trained=trained,
                                       test_fingerprint=test_fingerprint, folds_error=state.error))
    if with_refit and not state.error:
        _refit_state(state, folds, inputs_layout, test_fingerprint)
    return state


def _judged_by(data: DataConfig, exp: Experiment) -> Config | None:
    """The settings a saved experiment is judged by: its experiment file of now where it has one
    (defined_experiment), else the settings it was trained with, with the data files of now."""
    if not exp.config.is_file():
        return None
    saved = yaml.safe_load(exp.config.read_text()) or {}
    defined = data.config_file and defined_experiment(data.config_file, exp.name, saved)
    return defined or with_data_files(config_from_dict(saved), data)


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


def cv_numbers(state: ExperimentState, scorer: Scorer,
               test_like: set[str] | None = None) -> dict[str, Any]:
    """Mean ± std of the current folds' metric, the OOF metric, the TTA gain and training time;
    with `test_like` (the audit's training rows most like the test set), the OOF metric on
    those rows alone: a CV nearer what the leaderboard sees when the test set differs. A fold
    that chose the experiment's settings (make tune) counts in its minutes, not its CV."""
    exp, done = state.exp, state.scored_folds
    numbers: dict[str, Any] = {"cv_mean": np.nan, "cv_std": np.nan, "oof": np.nan,
                               "oof_test_like": np.nan, "tta_gain": np.nan, "minutes": "0.0"}
    seconds = sum(float(pd.read_csv(exp.fold(k).log)["seconds"].sum())
                  for k in state.current_folds)
    numbers["minutes"] = f"{seconds / 60:.1f}"
    if not done:
        return numbers
    scores = [scorer.score_frame(read_probs(exp.fold(k).oof)) for k in done]
    oof = joined_oof(exp, done)
    numbers.update(cv_mean=float(np.mean(scores)), cv_std=float(np.std(scores)),
                   oof=scorer.score_frame(oof))
    like = oof[oof["id"].astype(str).isin(test_like)] if test_like else oof.iloc[:0]
    if len(like) and like["label"].nunique() > 1:  # a metric of one class says nothing
        numbers["oof_test_like"] = scorer.score_frame(like)
    predicted = [k for k in state.predicted_folds if k in done]
    if len(predicted) == len(done) and state.tta(False).views != "none":
        numbers["tta_gain"] = tta_gain(exp, predicted, scorer)
    return numbers


def oof_scores(exp: Experiment, folds: list[int], scorer: Scorer) -> tuple[float, float]:
    """The OOF metric over the listed (predicted) folds: (without TTA, with it)."""
    return (scorer.score_frame(joined_oof(exp, folds)),
            scorer.score_frame(joined_oof(exp, folds, tta=True)))


def tta_gain(exp: Experiment, folds: list[int], scorer: Scorer) -> float:
    """The OOF metric with TTA minus without, over the listed (predicted) folds."""
    plain, with_tta = oof_scores(exp, folds, scorer)
    return with_tta - plain


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
        if state.searched:  # the CV leaves those folds out: a CV of before is another figure
            manifests[f"{state.name}/searched"] = str(state.searched)
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
        states = [experiment_state(data, layout, name, folds, test_fingerprint=test_fingerprint)
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
            stale[name] = _changed(manifest, now, "the images or labelled rows changed since",
                                   make_command("audit", data.name))
    by_name = {s.name: s for s in states}
    for experiment, path in findings.label_issue_files().items():
        manifest, state = read_manifest(findings.manifest(path)), by_name.get(experiment)
        inputs = label_issue_inputs(state) if state and state.current_folds else {"oof": ""}
        stale[f"label suspects of {experiment}"] = _changed(
            manifest, inputs, f"{experiment}'s out-of-fold predictions changed since",
            make_command("audit", data.name, MODEL=experiment))
    return stale


def _changed(manifest: Manifest | None, now: dict[str, str], what: str, remedy: str) -> str:
    if manifest is None or any(manifest.inputs.get(k) != v for k, v in now.items()):
        return f"stale: {what} the audit (`{remedy}` again)"
    return ""
