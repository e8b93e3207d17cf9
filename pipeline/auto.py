"""`make auto [DATA=] BUDGET=2h`: the whole chain for a competition in the time given.

    python -m pipeline auto --data aptos --budget 2h [--portfolio my.yaml] [key=value ...]

The folds (with the duplicate pass), then the portfolio's members (pipeline/training/
portfolio.py) in order: before each, a timing probe of its real model and data says how long
its folds and their predictions will take, and a member that cannot finish in what is left of
the budget is not started (nor any after it that has training left: the order is the expected
value per minute). A started member trains fold by fold, and stops between folds when the next
would not fit (a second call resumes it there). Each member is an experiment like any other
(`auto-<what>`), trained, then predicted with its TTA; a finished one counts whatever comes
after, and a second `make auto` skips it (its folds are current) and goes on with the next. A
member that fails (no weights offline, out of memory) fails alone. Then `make ensemble` of every
finished member with `ensemble.method=auto` (chosen out of fold, its CV nested), the submission
and the report, in the 5% of the budget kept for them.

The budget is this command's wall clock, checked before each fold: a fold once started runs to
its end. The members' settings do not depend on it, so a second call continues the same
experiments (with the same EPOCHS= and ARGS=: under other settings a member's folds are stale,
training refuses them, and the table says so for that member).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.base.config import Config, load_config, minutes
from pipeline.base.log import log
from pipeline.base.utils import WRITE_ERRNOS, PipelineError, format_table, make_command
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
RESERVE = 0.05  # of the budget, kept for the ensemble and the report after the members


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


def fold_seconds(config: Config, layout: Layout) -> float:
    """One fold of the member at the probe's pace, its predictions on top."""
    folds = read_folds(config.data, config.folds, layout)
    epoch = epoch_seconds(config, probe_spec(config, layout, folds))
    return epoch * config.train.epochs * (1 + PREDICT_SHARE)


def member_config(data: str, member: Member, overrides: list[str]) -> Config:
    """The member's experiment: the command's settings (EPOCHS=, ARGS=), then its own."""
    return load_experiment(data, member.model, [*overrides, *member.args], name=member.name)


def predicted(config: Config, layout: Layout) -> None:
    predict_experiment(config, layout, read_folds(config.data, config.folds, layout), None,
                       force=False, test=read_test_set(config.data))


def run_member(config: Config, layout: Layout, todo: list[int], *, clock: Clock,
               per_fold: float) -> str:
    """Train the member's folds one at a time while the budget lasts, then predict; what
    happened (a member stopped between folds resumes there on the next call)."""
    for k in todo:
        if k != todo[0] and per_fold > clock.left:
            return (f"stopped after {todo.index(k)} of {len(todo)} fold(s): the next needs "
                    f"about {per_fold / 60:.1f} min, {max(clock.left, 0) / 60:.1f} left")
        train_folds(config, layout, [k], force=False)
    predicted(config, layout)
    return "trained" if todo else "done before"


def train_members(data: str, members: list[Member], overrides: list[str],
                  clock: Clock) -> list[list[str]]:
    """Each member in order while the budget lasts: (member, what happened, minutes, why). A
    member with nothing left to train always counts; one that fails (no weights offline, out
    of memory, a setting it refuses) fails alone."""
    rows, stopped = [], None
    for member in members:
        started = time.perf_counter()
        try:
            config = member_config(data, member, overrides)
            layout = Layout.of(config)
            todo = folds_to_train(config, layout)
            if todo and stopped is not None:
                rows.append([member.name, "not started", "-", stopped])
                continue
            per_fold = fold_seconds(config, layout) if todo else 0.0
            if per_fold * len(todo) > clock.left:
                stopped = (f"needs about {per_fold * len(todo) / 60:.1f} min, "
                           f"{max(clock.left, 0) / 60:.1f} left")
                rows.append([member.name, "not started", "-", stopped])
                continue
            log.info(f"== auto: {member.name} ({member.why}); about "
                     f"{per_fold * len(todo) / 60:.1f} min, {clock.left / 60:.1f} left")
            what = run_member(config, layout, todo, clock=clock, per_fold=per_fold)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one member's failure is its own
            if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
                raise  # a full disk fails every member: main says what to free
            log.error(f"auto: {member.name} failed: {err}")
            what = f"failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        spent = f"{(time.perf_counter() - started) / 60:.1f}"
        if what.startswith("stopped"):
            stopped = what
        rows.append([member.name, what, spent, member.why])
    return rows


def run_auto(data: str, budget: str, overrides: list[str], *, portfolio_file: str | None) -> dict:
    try:
        total = 60 * float(minutes(budget))
    except ValueError as err:
        raise PipelineError(f"BUDGET={budget}: {err}") from None
    if total <= 0:
        raise PipelineError(f"BUDGET={budget}: a time above zero, e.g. BUDGET=2h")
    # a share kept for the ensemble and the report, which run after the members
    clock = Clock(total * (1 - RESERVE), time.perf_counter())
    config = load_config(data, None, overrides)
    members = (read_portfolio(portfolio_file) if portfolio_file else
               portfolio(config, typical_side(config.data)))
    for member in members:  # a setting a member refuses: now, before anything trains
        member_config(data, member, overrides)
    make_folds(config, force=False)
    rows = train_members(data, members, overrides, clock)
    log.info(format_table(rows, ["member", "auto", "minutes", "why"]))
    finished = [row[0] for row in rows if row[1] in ("trained", "done before")]
    if not finished:
        again = make_command("auto", config.data.name, BUDGET="<more>", PORTFOLIO=portfolio_file)
        if all(row[1].startswith("failed") for row in rows):
            raise PipelineError("every member failed (above); fix the first error and run again")
        raise PipelineError(f"no member finished within BUDGET={budget} (the table above says "
                            f"what each needs); `{again}` (with the same EPOCHS= and ARGS=) "
                            f"goes on where this one stopped")
    chosen_out_of_fold = [*overrides, "ensemble.method=auto"]
    outcome = ensemble_runs(load_config(data, None, chosen_out_of_fold), finished,
                            overrides=chosen_out_of_fold)
    page = build_report(config)
    used = (time.perf_counter() - clock.started) / 60
    log.info(f"auto: {len(finished)} member(s) in the submission {outcome.submission} (CV "
             f"{outcome.cv_score:.4f}, nested); {used:.1f} of {total / 60:.0f} min used; "
             f"report: {page}")
    return {"members": finished, "submission": outcome.submission, "cv": outcome.cv_score,
            "minutes": used}


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "budget", "portfolio", "overrides")


def main(args) -> None:
    if not args.budget:
        raise PipelineError(f"auto needs a time budget: {make_command('auto', args.data, BUDGET='2h')}")
    run_auto(args.data, args.budget, args.overrides, portfolio_file=args.portfolio)
