"""`make auto [DATA=] BUDGET=2h`: the whole chain for a competition in the time given.

    python -m pipeline auto --data aptos --budget 2h [--portfolio my.yaml] [key=value ...]

The folds (with the duplicate pass), then the portfolio's members (pipeline/training/
portfolio.py) in order, each under its share of the budget: half of what is left for each
member but the last, which gets the rest (the earlier members are the stronger ones by the
suite's tables; the later ones add variety to the ensemble). A member's share per fold becomes
its `train.time_budget`, so the epochs that fit are measured for its model and data (pipeline/
training/budget.py) and recorded with it; a second call keeps each started member's share, so
its folds stay current and it goes on where it stopped. With EPOCHS= (or train.epochs or
train.time_budget in ARGS= or the portfolio file) the members train those epochs instead, and
the budget only decides which of them start.

Before each member a timing probe of its real model and data says whether one epoch of each
fold fits its share (or, at fixed epochs, whether its folds fit what is left); one that cannot
is not started, nor any after it that has training left. A started member trains fold by fold
and stops between folds when the next would not fit (at the pace of its last fold). Each
member is an experiment like any other (`auto-<what>`), trained, then predicted with its TTA;
a finished one counts whatever comes after, and a second `make auto` skips it (its folds are
current) and goes on with the next. A member that fails (no weights offline, out of memory)
fails alone. Then `make ensemble` of every finished member with `ensemble.method=auto` (chosen
out of fold, its CV nested), the submission and the report, in the 5% of the budget kept for
them.

The budget is this command's wall clock, checked before each fold: a fold once started runs to
its end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.base.config import Config, load_config, minutes
from pipeline.base.log import log
from pipeline.base.utils import WRITE_ERRNOS, PipelineError, format_table, make_command
from pipeline.experiments.budgets import read_budget
from pipeline.experiments.freshness import read_folds, read_test_set
from pipeline.experiments.layout import Layout
from pipeline.experiments.state import experiment_state, load_experiment
from pipeline.inference.experiment import predict_experiment
from pipeline.stages.ensemble import ensemble_runs
from pipeline.stages.folds import make_folds
from pipeline.stages.report import build_report
from pipeline.training.budget import BUDGET_SHARE, epoch_seconds, explicit_keys
from pipeline.training.experiment import probe_spec, train_folds
from pipeline.training.portfolio import Member, portfolio, read_portfolio, typical_side

PREDICT_SHARE = 0.15  # a member's predictions (TTA views of the test set and its folds) on top
RESERVE = 0.05  # of the budget, kept for the ensemble and the report after the members
SHARE = 0.5  # of the time left, for each member but the last (which gets all of it)
FIXED_EPOCHS = {"train.epochs", "train.time_budget"}  # set by the user: auto leaves them


@dataclass
class Clock:
    """The budget of this command, in seconds from its start."""

    budget: float
    started: float

    @property
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)


def how_long(seconds: float) -> str:
    seconds = max(seconds, 0)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


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


def probed_epoch(config: Config, layout: Layout) -> float:
    """An epoch of the member's fold 0, in seconds, from a timing probe."""
    return epoch_seconds(config, probe_spec(config, layout, read_folds(config.data, config.folds,
                                                                       layout)))


def member_config(data: str, member: Member, overrides: list[str]) -> Config:
    """The member's experiment: the command's settings (EPOCHS=, ARGS=), then its own."""
    return load_experiment(data, member.model, [*overrides, *member.args], name=member.name)


def shared_config(config: Config, data: str, member: Member, overrides: list[str], *,
                  clock: Clock, last: bool) -> Config:
    """The member with its share of the budget as train.time_budget (minutes a fold): the
    share it started with where it has one (recorded beside its folds, so they stay current),
    else SHARE of the time left (all of it for the last member) over its folds. Unchanged
    where the epochs are fixed (EPOCHS=, or the portfolio file's or ARGS=' train.epochs)."""
    if explicit_keys(config.overrides) & FIXED_EPOCHS:
        return config
    recorded = read_budget(Layout.of(config).experiment(config.run_name))
    if recorded is not None:
        share = float(recorded["time_budget"])
    else:
        seconds = max(clock.left, 1.0) * (1.0 if last else SHARE)  # > 0: the probe says no
        share = float(f"{seconds / config.folds.n_splits / (1 + PREDICT_SHARE) / 60:.3g}")
    return member_config(data, member, [*overrides, f"train.time_budget={share:g}"])


def fold_estimate(config: Config, layout: Layout) -> tuple[float, str | None]:
    """(a fold's seconds, its predictions on top; why the member cannot start, or None).
    Under a share: the share, unless one epoch is longer than it; at fixed epochs: an epoch
    at the probe's pace times the epochs."""
    epoch = probed_epoch(config, layout)
    budget = config.train.time_budget
    if budget is None:
        return epoch * config.train.epochs * (1 + PREDICT_SHARE), None
    if epoch > budget * 60 * BUDGET_SHARE:
        return epoch, (f"one epoch takes about {how_long(epoch)}, its share of the budget "
                       f"{how_long(budget * 60 * BUDGET_SHARE)} a fold")
    return budget * 60 * (1 + PREDICT_SHARE), None


def predicted(config: Config, layout: Layout) -> None:
    predict_experiment(config, layout, read_folds(config.data, config.folds, layout), None,
                       force=False, test=read_test_set(config.data))


def run_member(config: Config, layout: Layout, todo: list[int], *, clock: Clock,
               per_fold: float) -> str:
    """Train the member's folds one at a time while the budget lasts, then predict; what
    happened (a member stopped between folds resumes there on the next call). The next fold
    is judged at the pace of the last one where that was slower than the estimate."""
    for k in todo:
        if k != todo[0] and per_fold > clock.left:
            return (f"stopped after {todo.index(k)} of {len(todo)} fold(s): the next needs "
                    f"about {how_long(per_fold)}, {how_long(clock.left)} left")
        started = time.perf_counter()
        train_folds(config, layout, [k], force=False)
        per_fold = max(per_fold, time.perf_counter() - started)
    predicted(config, layout)
    return "trained" if todo else "done before"


def start_member(data: str, member: Member, overrides: list[str], *, clock: Clock,
                 last: bool, stopped: str | None) -> str:
    """Train and predict one member, or say why it does not start: what happened."""
    config = member_config(data, member, overrides)
    config = shared_config(config, data, member, overrides, clock=clock, last=last)
    layout = Layout.of(config)
    todo = folds_to_train(config, layout)
    if todo and stopped is not None:
        return f"not started: {stopped}"
    per_fold, cannot = fold_estimate(config, layout) if todo else (0.0, None)
    if cannot is None and per_fold * len(todo) > clock.left:
        cannot = f"needs about {how_long(per_fold * len(todo))}, {how_long(clock.left)} left"
    if cannot is not None:
        return f"not started: {cannot}"
    budget = config.train.time_budget
    log.info(f"== auto: {member.name} ({member.why}); about {how_long(per_fold * len(todo))}"
             f"{f' ({budget:g} min a fold)' if budget else ''}, {how_long(clock.left)} left")
    return run_member(config, layout, todo, clock=clock, per_fold=per_fold)


def train_members(data: str, members: list[Member], overrides: list[str],
                  clock: Clock) -> list[list[str]]:
    """Each member in order while the budget lasts: (member, what happened, minutes, why). A
    member with nothing left to train always counts; one that fails (no weights offline, out
    of memory, a setting it refuses) fails alone; after one that did not start or stopped,
    none with training left starts."""
    rows, stopped = [], None
    for i, member in enumerate(members):
        started = time.perf_counter()
        try:
            what = start_member(data, member, overrides, clock=clock,
                                last=i == len(members) - 1, stopped=stopped)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one member's failure is its own
            if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
                raise  # a full disk fails every member: main says what to free
            log.error(f"auto: {member.name} failed: {err}")
            what = f"failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        if what.startswith(("stopped", "not started")):
            stopped = stopped or what.removeprefix("not started: ")
        if what.startswith("not started"):
            rows.append([member.name, "not started", "-", what.removeprefix("not started: ")])
            continue
        rows.append([member.name, what, f"{(time.perf_counter() - started) / 60:.1f}",
                     member.why])
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
        again = make_command("auto", args.data, BUDGET="2h")
        raise PipelineError(f"auto needs a time budget: {again}")
    run_auto(args.data, args.budget, args.overrides, portfolio_file=args.portfolio)
