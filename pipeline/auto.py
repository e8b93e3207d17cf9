"""`make auto [DATA=] BUDGET=2h`: the whole chain for a competition in the time given.

    python -m pipeline auto --data aptos --budget 2h [--portfolio my.yaml] [key=value ...]

The folds (with the duplicate pass), then the portfolio's members (pipeline/training/
portfolio.py) in order: before each, a timing probe of its real model and data says how long
its folds and their predictions will take, and a member that cannot finish in what is left of
the budget is not started (nor any after it: the order is the expected value per minute).
Each member is an experiment like any other (`auto-<what>`), trained, then predicted with its
TTA; a finished one counts whatever comes after, and a second `make auto` skips it (its folds
are current) and goes on with the next. Then `make ensemble` of every finished member with
`ensemble.method=auto` (chosen out of fold, its CV nested), the submission and the report.

The budget is this command's wall clock. The members' settings do not depend on it, so a
larger BUDGET on a second call continues the same experiments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.base.config import Config, load_config, minutes
from pipeline.base.log import log
from pipeline.base.utils import PipelineError, format_table, make_command
from pipeline.experiments.freshness import read_folds, read_test_set
from pipeline.experiments.layout import Layout
from pipeline.experiments.state import experiment_state, load_experiment
from pipeline.inference.experiment import predict_experiment
from pipeline.stages.ensemble import ensemble_runs
from pipeline.stages.folds import make_folds
from pipeline.stages.report import build_report
from pipeline.training.budget import epoch_seconds
from pipeline.training.experiment import probe_spec, train_folds
from pipeline.training.portfolio import Member, portfolio, read_portfolio, typical_side

PREDICT_SHARE = 0.15  # a member's predictions (TTA views of the test set and its folds) on top


@dataclass
class Clock:
    """The budget of this command, in seconds from its start."""

    budget: float
    started: float

    @property
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)


def folds_to_train(config: Config, layout: Layout) -> list[int]:
    """The member's folds not trained under its settings of now (all, for a new one)."""
    folds = read_folds(config.data, config.folds, layout)
    _, test_fingerprint = read_test_set(config.data)
    state = experiment_state(config.data, layout, config.run_name, folds,
                             test_fingerprint=test_fingerprint, experiment=config,
                             with_refit=False)
    every = sorted(int(k) for k in folds["fold"].unique())
    if state is None:
        return every
    return [f.fold for f in state.folds if not f.train.current]


def estimated_seconds(config: Config, layout: Layout, todo: list[int]) -> float:
    """Its folds to train at the probe's pace, with the predictions on top (nothing to train:
    its predictions alone, about nothing)."""
    if not todo:
        return 0.0
    folds = read_folds(config.data, config.folds, layout)
    epoch = epoch_seconds(config, probe_spec(config, layout, folds))
    return epoch * config.train.epochs * len(todo) * (1 + PREDICT_SHARE)


def run_member(config: Config, layout: Layout) -> None:
    train_folds(config, layout, None, force=False)
    predict_experiment(config, layout, read_folds(config.data, config.folds, layout), None,
                       force=False, test=read_test_set(config.data))


def member_config(data: str, member: Member, overrides: list[str]) -> Config:
    """The member's experiment: the command's settings (EPOCHS=, ARGS=), then its own."""
    return load_experiment(data, member.model, [*overrides, *member.args], name=member.name)


def train_members(data: str, members: list[Member], overrides: list[str],
                  clock: Clock) -> list[list[str]]:
    """Each member in order while the budget lasts: (member, what happened, minutes, why)."""
    rows, stopped = [], None
    for member in members:
        config = member_config(data, member, overrides)
        layout = Layout.of(config)
        if stopped is not None:
            rows.append([member.name, "not started", "-", stopped])
            continue
        todo = folds_to_train(config, layout)
        needed = estimated_seconds(config, layout, todo)
        if needed > clock.left:
            stopped = (f"needs about {needed / 60:.1f} min, {max(clock.left, 0) / 60:.1f} left: "
                       f"a larger BUDGET= goes on with it")
            rows.append([member.name, "not started", "-", stopped])
            continue
        started = time.perf_counter()
        log.info(f"== auto: {member.name} ({member.why}); about {needed / 60:.1f} min, "
                 f"{clock.left / 60:.1f} left")
        try:
            run_member(config, layout)
        except PipelineError as err:  # a member that cannot train (no weights offline): the
            rows.append([member.name, "failed", "-", str(err).splitlines()[0]])  # others go on
            continue
        spent = (time.perf_counter() - started) / 60
        rows.append([member.name, "trained" if todo else "done before", f"{spent:.1f}",
                     member.why])
    return rows


def run_auto(data: str, budget: str, overrides: list[str], *, portfolio_file: str | None) -> dict:
    clock = Clock(60 * float(minutes(budget)), time.perf_counter())
    config = load_config(data, None, overrides)
    make_folds(config, force=False)
    members = (read_portfolio(portfolio_file) if portfolio_file else
               portfolio(config, typical_side(config.data)))
    rows = train_members(data, members, overrides, clock)
    log.info(format_table(rows, ["member", "auto", "minutes", "why"]))
    finished = [row[0] for row in rows if row[1] in ("trained", "done before")]
    if not finished:
        first = next((row[3] for row in rows if row[1] == "not started"), "")
        raise PipelineError(f"no member finished within BUDGET={budget} ({first}); "
                            f"{make_command('auto', config.data.name, BUDGET='<more>')}")
    chosen_out_of_fold = [*overrides, "ensemble.method=auto"]
    outcome = ensemble_runs(load_config(data, None, chosen_out_of_fold), finished,
                            overrides=chosen_out_of_fold)
    page = build_report(config)
    used = (clock.budget - clock.left) / 60
    log.info(f"auto: {len(finished)} member(s) in the submission {outcome.submission} (CV "
             f"{outcome.cv_score:.4f}, nested); {used:.1f} of {clock.budget / 60:.0f} min used; "
             f"report: {page}")
    return {"members": finished, "submission": outcome.submission, "cv": outcome.cv_score,
            "minutes": used}


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "budget", "portfolio", "overrides")


def main(args) -> None:
    if not args.budget:
        raise PipelineError(f"auto needs a time budget: {make_command('auto', args.data, BUDGET='2h')}")
    run_auto(args.data, args.budget, args.overrides, portfolio_file=args.portfolio)
