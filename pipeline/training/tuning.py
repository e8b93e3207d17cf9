"""`make tune MODEL=m TRIALS=n`: an Optuna search over an experiment's settings.

    study = tune(data, model, overrides, trials=20)     # resumable; every trial an experiment
    outcome = promote(study, ...)                        # the best trial's other folds, honestly

The search space is YAML beside the experiment file (configs/<m>.tune.yaml), else the default
of this module for the kind of competition (ordinal ones also try the `both` head). A key is a
dotted setting; a list is a choice among its values; {low, high[, log][, step]} a range (whole
numbers when low and high are). Each trial is an experiment of its own, named by its settings
(<m>-tune-<digest>): it trains fold 0 only, reporting each epoch's competition metric to the
pruner (Optuna's median pruner: a trial behind the median of the earlier trials at the same
epoch stops there), and scores fold 0's out-of-fold predictions. TPE's sampler is seeded with
train.seed. The study lives in runs/<competition>/tune/<m>/study.log (Optuna's journal: one
machine; TUNE_STORAGE=<database URL> for several, each running the same `make tune`), so a
stopped tune resumes: its interrupted trial, or the one whose process died, is tried again with
the same settings, which resumes its fold from last.pt. A study belongs to the experiment's
settings before the search (another EPOCHS= or ARGS= starts another study).

The best trial's score is optimistic: the best of n on the fold that chose it. Its experiment
then trains its other folds, which no trial ever scored (their rows were only training rows of
fold 0), and their CV is the honest figure printed beside it.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline.base import distributed
from pipeline.base.config import CONFIG_DIR, Config, resolve_experiment, training_settings
from pipeline.base.fingerprints import fingerprint
from pipeline.base.log import log
from pipeline.base.metrics import higher_is_better
from pipeline.base.task import Scorer
from pipeline.base.utils import (
    PipelineError,
    format_table,
    make_command,
    write_csv_atomic,
    write_text_atomic,
)
from pipeline.experiments.freshness import current_folds, read_folds
from pipeline.experiments.layout import Experiment, Layout
from pipeline.experiments.runner import stage_lock
from pipeline.experiments.searches import read_search, write_search
from pipeline.experiments.state import experiment_config, load_experiment
from pipeline.training.experiment import fold_result, train_folds
from pipeline.training.tracking import listening

STORAGE_ENV = "TUNE_STORAGE"
STUDY_FILE = "study.log"
SEARCHED_FOLD = 0  # every trial trains and is scored on it


def default_space(config: Config) -> dict[str, Any]:
    """The search space of an experiment without a .tune.yaml: the learning rate a decade
    either side of its own, weight decay, label smoothing, mixup and class weights; the `both`
    head for ordinal competitions."""
    lr = config.train.lr
    space: dict[str, Any] = {
        "train.lr": {"low": lr / 10, "high": lr * 10, "log": True},
        "train.weight_decay": {"low": 1e-4, "high": 0.1, "log": True},
        "train.label_smoothing": {"low": 0.0, "high": 0.2},
        "train.mixup": [0.0, 0.2, 0.4],
        "train.class_weights": ["none", "sqrt_inverse"],
    }
    if config.data.ordinal:
        space["model.head"] = ["classification", "both"]
    return space


def search_space(config: Config, model: str) -> tuple[dict[str, Any], str]:
    """(the space, where it came from): configs/<m>.tune.yaml beside the experiment file, else
    the default."""
    _, _, path = resolve_experiment(model)
    candidate = (path.with_suffix(".tune.yaml") if path is not None
                 else CONFIG_DIR / f"{model.replace('/', '-')}.tune.yaml")
    if not candidate.is_file():
        return default_space(config), "the default space"
    space = yaml.safe_load(candidate.read_text()) or {}
    if not isinstance(space, dict) or not space:
        raise PipelineError(f"{candidate}: a mapping of settings to a list of values or a "
                            f"{{low, high}} range, e.g. `train.lr: {{low: 1.0e-4, high: 1.0e-2, "
                            f"log: true}}`")
    return space, str(candidate)


def sampled(trial, space: dict[str, Any]) -> dict[str, Any]:
    """One value per setting of the space, as the trial's sampler proposes."""
    values = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            values[key] = trial.suggest_categorical(key, spec)
        elif isinstance(spec, dict) and {"low", "high"} <= set(spec):
            low, high = spec["low"], spec["high"]
            if isinstance(low, int) and isinstance(high, int) and not spec.get("log"):
                values[key] = trial.suggest_int(key, low, high, step=spec.get("step", 1))
            else:
                values[key] = trial.suggest_float(key, float(low), float(high),
                                                  log=bool(spec.get("log")), step=spec.get("step"))
        else:
            raise PipelineError(f"search space: {key}: {spec!r} is neither a list of values nor "
                                f"a {{low, high}} range")
    return values


def base_digest(config: Config) -> str:
    """The searched experiment's settings before the search (its file, EPOCHS=, ARGS=): a study
    and its trials belong to them, so other settings start another study."""
    return fingerprint(training_settings(config.to_dict()))[:6]


def trial_name(model: str, values: dict[str, Any], base: str = "") -> str:
    """A trial's experiment: the model and a digest of the base settings and its own (the same
    settings: the same experiment, so a trial tried again resumes its fold)."""
    return f"{model.replace('/', '-')}-tune-{fingerprint([base, values])[:8]}"


@dataclass
class Search:
    """What every trial of one `make tune` shares."""

    data: str
    model: str
    overrides: list[str]
    space: dict[str, Any]
    layout: Layout
    metric: str
    base: str  # base_digest of the searched experiment

    def config(self, values: dict[str, Any], name: str | None = None) -> Config:
        """A trial's experiment (`name`: the same settings under the user's NAME=)."""
        settings = [f"{key}={value}" for key, value in values.items()]
        return load_experiment(self.data, self.model, [*self.overrides, *settings],
                               name=name or trial_name(self.model, values, self.base))

    def objective(self, trial) -> float:
        import optuna

        values = sampled(trial, self.space)
        try:
            config = self.config(values)
        except ValueError as err:  # ConfigError: a sampled combination the settings refuse
            raise PipelineError(f"trial {trial.number}: {err}") from None
        trial.set_user_attr("experiment", config.run_name)
        trial.set_user_attr("process", f"{socket.gethostname()}:{os.getpid()}")

        def report(row: dict[str, Any]) -> None:
            value = row.get(self.metric)
            if value is None or not np.isfinite(value):
                return
            trial.report(float(value), int(row["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {row['epoch']}: {self.metric} {value:.4f} "
                                         f"behind the median of the earlier trials")

        try:
            with listening(report):
                train_folds(config, self.layout, [SEARCHED_FOLD], force=False)
        except KeyboardInterrupt:  # Optuna closes the trial as failed: say it was stopped,
            trial.set_user_attr("interrupted", True)  # so the next `make tune` goes on with it
            raise
        exp = self.layout.experiment(config.run_name)
        return float(fold_result(exp, SEARCHED_FOLD, Scorer.of(config.data))[self.metric])


def storage(layout: Layout, model: str):
    """TUNE_STORAGE's database (with heartbeats: a trial of a machine that died is tried
    again), else the journal file of one machine."""
    import optuna

    url = os.environ.get(STORAGE_ENV)
    if url:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=60, grace_period=300,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=2))
    folder = layout.tune_dir(model)
    folder.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(str(folder / STUDY_FILE))
    return optuna.storages.JournalStorage(backend)


def revive_killed_trials(study, *, journal: bool) -> int:
    """Trials of a tune that was stopped: interrupted (Ctrl-C: Optuna closed them as failed)
    or, in the journal of one machine, left running by a process of this machine that is gone
    (a database's trials are the heartbeats' to judge). Their settings are tried again first,
    once, so their fold resumes from last.pt. How many."""
    import optuna

    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    revived = 0
    for trial in trials:
        if trial.user_attrs.get("experiment") is None or trial.number in retried:
            continue
        died = journal and trial.state == state.RUNNING and process_gone(
            trial.user_attrs.get("process", ""))
        stopped = trial.state == state.FAIL and trial.user_attrs.get("interrupted")
        if not (died or stopped):
            continue
        if died:
            study._storage.set_trial_state_values(trial._trial_id, state.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number},
                            skip_if_exists=False)
        revived += 1
    return revived


def process_gone(process: str) -> bool:
    """Whether `host:pid` names a process of this machine that no longer runs."""
    host, _, pid = process.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class StopAfterFailures:
    """Stops the study after `limit` failed trials in a row: a setting, a file or a lock that
    fails every trial would otherwise fail them forever (failed trials count to no TRIALS=)."""

    def __init__(self, limit: int = 3):
        self.limit, self.row = limit, 0

    def __call__(self, study, trial) -> None:
        import optuna

        self.row = self.row + 1 if trial.state == optuna.trial.TrialState.FAIL else 0
        if self.row >= self.limit:
            log.info(f"tune: {self.row} trials in a row failed (above): stopping")
            study.stop()


def tune(data: str, model: str, overrides: list[str], *, trials: int):
    """Run the study of `model` until it has `trials` finished (complete or pruned) trials."""
    import optuna

    if distributed.launched_world_size() > 1:
        raise PipelineError("make tune trains one trial per process: run it without GPUS=; on "
                            "several GPUs start one `make tune` per GPU (CUDA_VISIBLE_DEVICES) "
                            "on the same study")
    if trials < 1:
        raise PipelineError(f"TRIALS={trials}: the study needs one trial or more")
    base = load_experiment(data, model, overrides)
    layout = Layout.of(base)
    read_folds(base.data, base.folds, layout)  # no folds: one clear error, not a failed trial each
    space, source = search_space(base, model)
    search = Search(data, model, list(overrides), space, layout, base.data.metric,
                    base_digest(base))
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the pipeline says what happens
    journal = not os.environ.get(STORAGE_ENV)
    study = optuna.create_study(
        study_name=f"{base.data.name}/{model}-{search.base}", storage=storage(layout, model),
        load_if_exists=True,
        direction="maximize" if higher_is_better(base.data.metric) else "minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2,
                                           n_warmup_steps=base.train.warmup_epochs + 1))
    # seeded, and on from where the study is: a resumed tune or a second process proposes
    # other settings than the first did
    study.sampler = optuna.samplers.TPESampler(seed=base.train.seed + len(study.trials))
    revived = revive_killed_trials(study, journal=journal)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    log.info(f"tune {model} on {base.data.name}: {', '.join(space)} ({source}); "
             f"{done} of {trials} trials done" + (f", {revived} killed one(s) tried again"
                                                   if revived else ""))
    if done < trials:
        study.optimize(search.objective, catch=(PipelineError,),
                       callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished),
                                  StopAfterFailures()])
    return study, search


def trials_table(study) -> pd.DataFrame:
    """One row per trial: number, state, its score on fold 0, experiment, settings."""
    rows = [{"trial": t.number, "state": t.state.name.lower(),
             "fold 0": t.value if t.value is not None else np.nan,
             "epochs": max(t.intermediate_values, default=np.nan),
             "experiment": t.user_attrs.get("experiment", ""), **t.params}
            for t in study.get_trials(deepcopy=False)]
    return pd.DataFrame(rows)


def importances(study) -> dict[str, float]:
    """Optuna's importance of each setting (fANOVA, seeded) over the complete trials; empty
    under two."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    try:
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError):  # every trial the same values: nothing to apportion
        return {}


@dataclass
class Promoted:
    experiment: str
    search_score: float  # fold 0 of the best trial: the best of n, optimistic
    honest: float  # the mean of its other folds, which no trial scored
    honest_std: float
    folds: list[int]
    trials: int  # the completed trials the best was chosen from


def promote(study, search: Search, name: str | None = None) -> Promoted:
    """The best trial's settings train every fold: in the trial's own experiment, or under
    `name` (NAME=), which takes over what the trial's experiment trained (fold 0 at least)
    instead of training it again. Fold 0 chose them (recorded in both: every CV leaves it
    out); the others' CV is the honest figure."""
    best = study.best_trial
    trial = search.config(best.params)
    config = trial if name is None else search.config(best.params, name=name)
    folds = read_folds(config.data, config.folds, search.layout)
    others = sorted(int(k) for k in folds["fold"].unique() if int(k) != SEARCHED_FOLD)
    if not others:
        raise PipelineError("make tune needs two folds or more: the search scores fold 0, the "
                            "others give the honest figure (folds.n_splits)")
    record = {"folds": [SEARCHED_FOLD], "trial": best.number,
              "trials": sum(t.state.name == "COMPLETE" for t in study.trials),
              "study": str(search.layout.tune_dir(search.model)), "search_score": float(best.value)}
    exp, trial_exp = (search.layout.experiment(c.run_name) for c in (config, trial))
    done = current_folds(trial, folds, search.layout)
    if SEARCHED_FOLD not in done:
        retrain = make_command("train", search.layout.competition, MODEL=trial.run_name,
                               FOLDS=SEARCHED_FOLD, FORCE=1, ARGS=" ".join(search.overrides))
        raise PipelineError(
            f"the best trial's fold {SEARCHED_FOLD} ({trial_exp.dir}) is not current (the data, "
            f"folds or code changed since the search): its score is of other inputs. "
            f"`{retrain}` retrains it; another ARGS= starts a new study")
    if name is not None:
        check_name_free(exp, config, record, search=search, trials=len(study.trials))
        with stage_lock(exp.lock, exp.dir, "taken over from the best trial"):
            take_over(trial_exp, exp, done)
    for searched in {exp.dir: exp, trial_exp.dir: trial_exp}.values():
        write_search(searched, record)
    train_folds(config, search.layout, [SEARCHED_FOLD, *others], force=False)
    scorer = Scorer.of(config.data)
    scores = [float(fold_result(exp, k, scorer)[search.metric]) for k in others]
    spread = float(np.std(scores, ddof=1)) if len(scores) > 1 else math.nan
    return Promoted(config.run_name, float(best.value), float(np.mean(scores)), spread, others,
                    record["trials"])


def check_name_free(target: Experiment, config: Config, record: dict[str, Any], *,
                    search: Search, trials: int) -> None:
    """NAME= names the best trial's settings: an experiment of that name with other settings
    (another experiment, or an earlier best of this search) is refused before a file is
    touched."""
    saved = experiment_config(target)
    if saved is None or same_training(saved, config):
        return
    earlier = read_search(target) or {}
    why = (f"it holds trial {earlier.get('trial')}, the best when it was promoted; the best is "
           f"now trial {record['trial']}" if earlier.get("study") == record["study"]
           else "it is an experiment of other settings")
    again = make_command("tune", search.layout.competition, MODEL=search.model, TRIALS=trials,
                         NAME=f"{target.name}-2", ARGS=" ".join(search.overrides))
    raise PipelineError(f"NAME={target.name}: {why} ({target.dir}); name the best another way: "
                        f"`{again}`")


def same_training(a: Config, b: Config) -> bool:
    return fingerprint(training_settings(a.to_dict())) == \
        fingerprint(training_settings(b.to_dict()))


def take_over(source: Experiment, target: Experiment, folds: list[int]) -> None:
    """The trial's current `folds`, copied into the named experiment (the same settings: the
    freshness rule finds them current there), where the name has none yet, with the epochs a
    time budget became."""
    if source.budget.is_file() and not target.budget.exists():
        write_text_atomic(target.budget, source.budget.read_text())
    for k in folds:
        done, into = source.fold(k).dir, target.fold(k).dir
        if into.exists() or not done.is_dir():
            continue
        partial = into.with_name(f".{into.name}.copying")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(done, partial)
        partial.rename(into)  # whole or not at all: a killed copy leaves no half fold


def write_tables(study, search: Search) -> tuple[pd.DataFrame, dict[str, float]]:
    """trials.csv and importance.csv in the study's folder; the trials shown."""
    layout = search.layout
    table, weights = trials_table(study), importances(study)
    write_csv_atomic(table, layout.tune_trials(search.model))
    write_csv_atomic(pd.DataFrame({"setting": list(weights), "importance": list(weights.values())}),
                     layout.tune_importance(search.model))
    log.info(format_table(table.values.tolist(), list(table.columns)))
    if weights:
        log.info(format_table([[k, v] for k, v in weights.items()], ["setting", "importance"]))
    return table, weights
