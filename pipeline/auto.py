"""`make auto [DATA=] BUDGET=2h`: the whole chain for a competition in the time given.

    python -m pipeline auto --data aptos --budget 2h [--portfolio my.yaml] [key=value ...]

The folds (with the duplicate pass), then the portfolio's members (pipeline/training/
portfolio.py) in order, each under its share of the budget: half of what is left for each
member but the last, which gets 90% of the rest (the earlier members are the stronger ones by the
suite's tables; the later ones add variety to the ensemble). A member's share per fold becomes
its `train.time_budget`, so the epochs that fit are measured for its model and data (pipeline/
training/budget.py) and recorded with it; a second call keeps each started member's share, so
its folds stay current and it goes on where it stopped. With EPOCHS= (or train.epochs or
train.time_budget in ARGS= or the portfolio file) the members train those epochs instead, and
the budget only decides which of them start.

Before each member a timing probe of its real model and data (or the pace recorded for it, or
for another seed of it) says whether MIN_EPOCHS epochs of each fold fit its share (one that
does not is not started; the cheaper ones after it still get their shares), or, at fixed
epochs, whether its folds fit what is left. Once the time left runs out, or a member stops
before its last fold, no member with training left starts. A started member trains fold by
fold and stops between folds when the next would not fit (at the pace of its last fold, where
that was slower). Each member is an experiment like any other (`auto-<what>`), trained, then
predicted: with flips as TTA where they score better out of fold than without, unless the
competition or the user set the TTA. A finished member counts whatever comes after, and a
second `make auto` skips it (its folds are current) and goes on with the next. A portfolio
member whose ImageNet weights cannot be had here (offline, none in weights/) trains from
scratch as `<name>-scratch`, said once per model. A member that fails (out of memory) fails
alone. Then `make ensemble` of every finished
member with `ensemble.method=auto` (chosen out of fold, its CV nested), the submission and the
report, in the 5% of the budget kept for them.

The budget is this command's wall clock, checked before each fold: a fold once started runs to
its end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from pipeline.base.config import Config, TTAConfig, load_config, minutes, save_config
from pipeline.base.log import log
from pipeline.base.metrics import is_better
from pipeline.base.task import Scorer
from pipeline.base.utils import WRITE_ERRNOS, PipelineError, format_table, make_command
from pipeline.experiments.budgets import (
    matching_record,
    recorded_budget,
    sibling_record,
    with_budget,
)
from pipeline.experiments.freshness import (
    fold_numbers,
    read_folds,
    read_test_set,
    recorded_tta,
)
from pipeline.experiments.layout import Layout
from pipeline.experiments.runner import on_main
from pipeline.experiments.state import (
    ExperimentState,
    experiment_state,
    load_experiment,
    oof_scores,
)
from pipeline.inference.experiment import predict_experiment
from pipeline.models.weights import weights_file
from pipeline.stages.ensemble import ensemble_runs
from pipeline.stages.folds import make_folds
from pipeline.stages.report import build_report
from pipeline.training.budget import device_name, epoch_seconds, epochs_within, explicit_keys
from pipeline.training.experiment import probe_spec, train_folds
from pipeline.training.portfolio import Member, portfolio, read_portfolio, typical_side

PREDICT_SHARE = 0.15  # a member's predictions (TTA views of the test set and its folds) on top
RESERVE = 0.05  # of the budget, kept for the ensemble and the report after the members
SHARE = 0.5  # of the time left, for each member but the last
LAST_SHARE = 0.9  # for the last: a member stopped before its last fold is time lost
FIXED_EPOCHS = {"train.epochs", "train.time_budget"}  # set by the user: auto leaves them
# under a share, a member that fits fewer epochs is not started: the suite's members trained
# 1-2 epochs were near chance, and added nothing to the ensemble but noise
MIN_EPOCHS = 5
TRIED_VIEWS = "flips"  # the TTA tried on each member where neither competition nor user set one


@dataclass
class Clock:
    """The budget of this command, in seconds from its start."""

    budget: float
    started: float
    # a fold's seconds against its share, the slowest yet: what a fold does besides its
    # epochs (start-up, predictions, plots) the probe does not see; later shares allow for it
    pace: float = 1.0
    finished: int = 0  # members that count: the first to finish is never left unfinished

    @property
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)


def how_long(seconds: float) -> str:
    seconds = max(seconds, 0)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def member_state(config: Config, layout: Layout) -> ExperimentState | None:
    """Which of the member's folds are trained and predicted under its settings of now."""
    folds = read_folds(config.data, config.folds, layout)
    _, test_fingerprint = read_test_set(config.data)
    return experiment_state(config.data, layout, config.run_name, folds,
                            test_fingerprint=test_fingerprint, experiment=config,
                            with_refit=False)


def every_fold(config: Config, layout: Layout) -> list[int]:
    return fold_numbers(read_folds(config.data, config.folds, layout))


def folds_to_train(config: Config, layout: Layout) -> list[int]:
    """The member's folds not trained under its settings of now (all, for a new one)."""
    state = member_state(config, layout)
    if state is None:
        return every_fold(config, layout)
    return [f.fold for f in state.folds if not f.train.current]


def probed_epoch(config: Config, layout: Layout) -> float:
    """An epoch of the member's fold 0, in seconds, from a timing probe."""
    return epoch_seconds(config, probe_spec(config, layout, read_folds(config.data, config.folds,
                                                                       layout)))


def member_config(data: str, member: Member, overrides: list[str]) -> Config:
    """The member's experiment: the command's settings (EPOCHS=, ARGS=), then its own."""
    return load_experiment(data, member.model, [*overrides, *member.args], name=member.name)


def fixed_epochs(config: Config) -> bool:
    """EPOCHS=, or train.epochs or train.time_budget in ARGS= or the portfolio file."""
    return bool(explicit_keys(config.overrides) & FIXED_EPOCHS)


def new_share(config: Config, clock: Clock, *, last: bool) -> float | None:
    """A new member's train.time_budget (minutes a fold): SHARE of the time left (LAST_SHARE
    for the last member with training left) over its folds and its predictions, at the pace
    the folds before it kept, rounded down to three digits; None when no time is left."""
    seconds = clock.left * (LAST_SHARE if last else SHARE)
    if seconds < 1:
        return None
    share = seconds / config.folds.n_splits / (1 + PREDICT_SHARE) / clock.pace / 60
    step = 10.0 ** (math.floor(math.log10(share)) - 2)
    return float(f"{math.floor(share / step) * step:.3g}")


def with_share(config: Config, data: str, member: Member, overrides: list[str], *,
               share: float) -> Config:
    return member_config(data, member, [*overrides, f"train.time_budget={share!r}"])


def known_epoch(config: Config, layout: Layout) -> float | None:
    """An epoch's seconds as recorded for the member's budget, or for a sibling (another seed
    of it) on this device, or None."""
    record = matching_record(config, layout)
    if record is None:
        sibling = sibling_record(config, layout, device_name())
        record = sibling[0] if sibling else {}
    seconds = record.get("seconds_per_epoch")
    return float(seconds) if seconds else None


def fold_estimate(config: Config, layout: Layout, *,
                  shared: bool) -> tuple[float, float | None, str | None]:
    """(a fold's seconds with its predictions on top, an epoch's seconds where a time budget
    needs them, why the member cannot start or None). Under a time budget: the budget, and
    under auto's own share not when fewer than MIN_EPOCHS fit it (the epoch as recorded, else
    from a probe); at fixed epochs: an epoch at the probe's pace times the epochs."""
    budget = config.train.time_budget
    if budget is None:
        return probed_epoch(config, layout) * config.train.epochs * (1 + PREDICT_SHARE), None, None
    epoch = known_epoch(config, layout) or probed_epoch(config, layout)
    if shared and epochs_within(budget, epoch) < MIN_EPOCHS:
        return epoch, epoch, (f"an epoch takes about {how_long(epoch)}: its share of the "
                              f"budget ({how_long(budget * 60)} a fold) fits "
                              f"{epochs_within(budget, epoch)} epoch(s), under {MIN_EPOCHS}")
    return budget * 60 * (1 + PREDICT_SHARE), epoch, None


def predicted(config: Config, layout: Layout) -> None:
    predict_experiment(config, layout, read_folds(config.data, config.folds, layout), None,
                       force=False, test=read_test_set(config.data))


def with_views(config: Config, views: str) -> Config:
    return config.model_copy(update={"tta": config.tta.model_copy(update={"views": views})})


def sets_tta(config: Config) -> bool:
    """The competition's YAML, the experiment file or the command (ARGS=, TTA=, the portfolio
    file) chose the TTA: auto keeps it."""
    return ("tta" in config.data.defaults or config.tta != TTAConfig()
            or any(key.startswith("tta.") for key in explicit_keys(config.overrides)))


def current_views(config: Config, layout: Layout) -> str | None:
    """The TTA views every fold of the member is predicted with now (an earlier call's choice,
    or the user's `make predict TTA=`, which stands too), or None: not every fold is predicted
    under its settings of now."""
    state = member_state(config, layout)
    if state is None or not state.folds or len(state.predicted_folds) < len(state.folds):
        return None
    exp = layout.experiment(config.run_name)
    made = {getattr(recorded_tta(exp.fold(f.fold)), "views", None) for f in state.folds}
    return made.pop() if len(made) == 1 else None


def predicted_with_choice(config: Config, layout: Layout) -> None:
    """Predict the member. Where the TTA is auto's to choose: with TRIED_VIEWS, kept only when
    its out-of-fold score beats the same folds without TTA (a mirrored digit is another
    digit), else predicted again without; an earlier call's choice stands."""
    if sets_tta(config):
        return predicted(config, layout)
    if current_views(config, layout) is not None:
        return None
    tried = with_views(config, TRIED_VIEWS)
    predicted(tried, layout)
    scorer, folds = Scorer.of(config.data), every_fold(config, layout)
    plain, with_tta = oof_scores(layout.experiment(config.run_name), folds, scorer)
    if is_better(scorer.metric, with_tta, plain):
        # its settings say so: `make predict` and `make refit` of it later keep the flips
        on_main(lambda: save_config(tried, layout.experiment(config.run_name).config))
        log.info(f"auto: {config.run_name}: {TRIED_VIEWS} TTA kept, out-of-fold "
                 f"{scorer.metric} {with_tta:.4f} against {plain:.4f} without")
        return None
    log.info(f"auto: {config.run_name}: {TRIED_VIEWS} TTA scores {scorer.metric} "
             f"{with_tta:.4f} out of fold against {plain:.4f} without: predicted again "
             f"without TTA")
    return predicted(with_views(config, "none"), layout)


def run_member(config: Config, layout: Layout, todo: list[int], *, clock: Clock,
               per_fold: float, epoch: float | None) -> str:
    """Train the member's folds one at a time while the budget lasts, then predict; what
    happened (a member stopped between folds resumes there on the next call). The next fold
    is judged at the pace of the last one where that was slower than the estimate; while no
    member has finished, a started one finishes over the budget (a timing probe can be off
    when the machine gets busier; an empty result would waste all of it)."""
    for k in todo:
        if k != todo[0] and per_fold > clock.left:
            short = (f"the next needs about {how_long(per_fold)}, {how_long(clock.left)} "
                     f"left")
            if clock.finished:
                return f"stopped after {todo.index(k)} of {len(todo)} fold(s): {short}"
            log.warning(f"auto: {config.run_name}: {short}; it trains on over the budget: "
                        f"without it no member would finish")
        started = time.perf_counter()
        train_folds(config, layout, [k], force=False, epoch=epoch)
        took = time.perf_counter() - started
        per_fold = max(per_fold, took * (1 + PREDICT_SHARE))
        if config.train.time_budget is not None:
            clock.pace = max(clock.pace, took / (config.train.time_budget * 60))
    predicted_with_choice(with_budget(config, layout), layout)  # the epochs its probe chose
    return "trained" if todo else "done before"


def resolved_member(data: str, member: Member, overrides: list[str]) -> tuple[Config, str]:
    """(the member's experiment with the share it started with, recorded beside its folds;
    "fixed": the user fixed its epochs, "kept": it keeps that share, "new": it needs one)."""
    config = member_config(data, member, overrides)
    if fixed_epochs(config):
        return config, "fixed"
    share = recorded_budget(Layout.of(config).experiment(config.run_name))
    if share is None:
        return config, "new"
    return with_share(config, data, member, overrides, share=share), "kept"


def start_member(data: str, member: Member, overrides: list[str], *, clock: Clock,
                 last: bool, after: str | None) -> tuple[str, bool]:
    """Train and predict one member, or say why it does not start: (what happened, whether
    members after it with training left must not start either). `after`: why an earlier
    member did not finish, which holds this one back too when it has training left."""
    config, share_state = resolved_member(data, member, overrides)
    fresh = share_state == "new"
    if fresh:
        if after is not None:
            return f"not started: {after}", True
        share = new_share(config, clock, last=last)
        if share is None:
            return "not started: no time left", True
        config = with_share(config, data, member, overrides, share=share)
    layout = Layout.of(config)
    todo = folds_to_train(config, layout)
    if todo and after is not None:
        return f"not started: {after}", True
    per_fold, epoch, cannot = (fold_estimate(config, layout, shared=share_state != "fixed")
                               if todo else (0.0, None, None))
    if cannot is not None:  # a later, cheaper member may fit what is left
        return f"not started: {cannot}", False
    if not fresh and per_fold * len(todo) > clock.left:  # a new share fits by its making
        return (f"not started: needs about {how_long(per_fold * len(todo))}, "
                f"{how_long(clock.left)} left"), True
    budget = config.train.time_budget
    log.info(f"== auto: {member.name} ({member.why}); about {how_long(per_fold * len(todo))}"
             f"{f' ({budget:g} min a fold)' if budget else ''}, {how_long(clock.left)} left")
    what = run_member(config, layout, todo, clock=clock, per_fold=per_fold, epoch=epoch)
    return what, what.startswith("stopped")


def with_training_left(data: str, members: list[Member], overrides: list[str]) -> list[str]:
    """The members that have folds to train (all of a member never started under a share)."""
    names = []
    for member in members:
        try:
            config, share_state = resolved_member(data, member, overrides)
            if share_state == "new" or folds_to_train(config, Layout.of(config)):
                names.append(member.name)
        except PipelineError:  # it fails alone in its turn, saying why
            names.append(member.name)
    return names


def train_members(data: str, members: list[Member], overrides: list[str],
                  clock: Clock) -> list[list[str]]:
    """Each member in order while the budget lasts: (member, what happened, minutes, why). A
    member with nothing left to train always counts; one that fails (no weights offline, out
    of memory, a setting it refuses) fails alone; after one that stopped or did not fit what
    was left, none with training left starts (one whose share fits too few epochs does not
    hold the cheaper ones after it back)."""
    rows, after = [], None
    left = with_training_left(data, members, overrides)
    for member in members:
        started = time.perf_counter()
        try:
            what, blocks = start_member(data, member, overrides, clock=clock, after=after,
                                        last=member.name == (left or [None])[-1])
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one member's failure is its own
            if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
                raise  # a full disk fails every member: main says what to free
            log.error(f"auto: {member.name} failed: {err}")
            what = f"failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            blocks = False
        if blocks and after is None:
            after = f"after {member.name}: {what.removeprefix('not started: ')}"
        if what.startswith("not started"):
            rows.append([member.name, "not started", "-", what.removeprefix("not started: ")])
            continue
        clock.finished += what in ("trained", "done before")
        rows.append([member.name, what, f"{(time.perf_counter() - started) / 60:.1f}",
                     member.why])
    return rows


def with_weights_or_scratch(data: str, members: list[Member],
                            overrides: list[str]) -> list[Member]:
    """The portfolio's members that start from ImageNet weights, where those can be had here
    (found, or fetched now while the network allows), else the same members from scratch
    (`<name>-scratch`), said once per model: a notebook without internet trains something
    instead of failing every member. A member an earlier call started, either way, goes on as
    it started (its predictions need no weights; a new start would lose its folds)."""
    # model -> (why its weights cannot be had, None: found; where they were looked for)
    missing: dict[str, tuple[str | None, str]] = {}
    chosen = []
    for member in members:
        model = member_config(data, member, overrides).model
        scratch = Member(f"{member.name}-scratch", member.model,
                         [*member.args, "model.pretrained=false"],
                         f"{member.why}; no ImageNet weights here: from scratch")
        if not model.pretrained or model.weights is not None or \
                started(data, member, overrides):
            chosen.append(member)
            continue
        if started(data, scratch, overrides):
            chosen.append(scratch)
            continue
        if model.name not in missing:
            missing[model.name] = (weights_missing(model.name, model.weights_dir),
                                   model.weights_dir)
        chosen.append(member if missing[model.name][0] is None else scratch)
    for name, (why, folder) in missing.items():
        if why is not None:
            log.warning(f"auto: no ImageNet weights for {name} here ({why}): its members train "
                        f"from scratch, weaker on few images. `make weights MODEL={name}` where "
                        f"the download works fills {folder}/ (in a notebook: upload it, "
                        f"model.weights_dir=<its folder>), and a new call uses them")
    return chosen


def started(data: str, member: Member, overrides: list[str]) -> bool:
    """Whether an earlier call started the member (its experiment holds its settings)."""
    config = member_config(data, member, overrides)
    return Layout.of(config).experiment(config.run_name).config.is_file()


def weights_missing(name: str, weights_dir: str) -> str | None:
    """Why model `name`'s pretrained weights cannot be had here (the last place looked at), or
    None: found (fetched now where the network allows)."""
    try:
        weights_file(name, None, weights_dir)
    except PipelineError as err:  # not found, unreadable, a timm name timm does not know
        looked = [line.strip() for line in str(err).splitlines() if line.startswith("  ")]
        return looked[-1] if looked else str(err).splitlines()[0]
    return None


def run_auto(data: str, budget: str, overrides: list[str], *, portfolio_file: str | None) -> dict:
    try:
        total = 60 * float(minutes(budget))
    except ValueError as err:
        raise PipelineError(f"BUDGET={budget}: {err}") from None
    if total <= 0:
        raise PipelineError(f"BUDGET={budget}: a time above zero, e.g. BUDGET=2h")
    config = load_config(data, None, overrides)
    members = (read_portfolio(portfolio_file) if portfolio_file else
               portfolio(config, typical_side(config.data)))
    for member in members:  # a setting a member refuses: now, before anything trains
        member_config(data, member, overrides)
    if not portfolio_file:  # one's own portfolio's weights are one's own to provide
        members = with_weights_or_scratch(data, members, overrides)  # before the clock: a
        # download's minutes are the network's, not the members'
    # a share kept for the ensemble and the report, which run after the members
    clock = Clock(total * (1 - RESERVE), time.perf_counter())
    make_folds(config, force=False)
    rows = train_members(data, members, overrides, clock)
    log.info(format_table(rows, ["member", "auto", "minutes", "why"]))
    finished = [row[0] for row in rows if row[1] in ("trained", "done before")]
    if not finished:
        more = f"{2 * total / 60:.3g}"  # a command to run as printed: twice the budget
        again = make_command("auto", config.data.name, BUDGET=more, PORTFOLIO=portfolio_file)
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
