"""The stage runner: lock -> inputs -> freshness -> work -> manifest -> barrier, for every verb.

    with stage_lock(exp.lock, exp.dir, "trained"):            # one process at a time
        for fold in todo:
            run_step(Step("train", part.train_manifest, inputs, details,
                          outputs=part.trained_outputs, work=lambda: fit(fold),
                          current=f"fold {fold}: current ({part.dir}); FORCE=1 retrains",
                          on_stale="refuse", what=..., remedy=stale_remedy("the fold")), force)
    show_table(rows)                                           # the end-of-stage table

A verb declares what each of its steps reads (`inputs`, fingerprints from
pipeline/experiments/freshness.py), what it writes (`outputs`) and its `work`; this module owns the
bookkeeping around it, the shape of make and DVC: the lock, the one freshness rule (`decide`:
current -> skipped in one line; missing -> done; stale -> redone where nothing is lost, refused with
the remedy where redoing would throw away a user's work; FORCE=1 -> done), the manifest written
last and atomically by rank 0, and the barrier after which every rank may read what was written.
The granularity is the verb's: a step per fold (train), per part (predict), per submission
(ensemble), or one (folds, audit, report).

Under torchrun every rank runs `run_step`: rank 0 decides and the others follow
(`broadcast_from_main`), every rank works (the training loop and batched inference share the
work), rank 0 alone prepares the folder and writes the manifest. Locks are taken by rank 0 for all.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.base import distributed
from pipeline.base.log import log
from pipeline.base.utils import format_table
from pipeline.experiments.freshness import Freshness, freshness, refuse_stale
from pipeline.experiments.locks import holding
from pipeline.experiments.manifests import write_manifest


@contextlib.contextmanager
def stage_lock(lock: Path, what: Path | str, doing: str) -> Iterator[None]:
    """One process at a time on an experiment or a competition's files (pipeline/experiments/
    locks.py): a second one stops at once, naming the holder ("<what> is being <doing> by ...")."""
    with holding(lock, what, doing):
        yield


@dataclass(frozen=True)
class Step:
    """One unit of a verb's work with its own manifest: a fold, a part's predictions, a
    submission, the fold file, a report page."""

    name: str  # the manifest's stage: train, refit, predict, ensemble, folds, ...
    manifest: Path
    inputs: dict[str, str]  # input name -> fingerprint, as computed now
    details: dict[str, Any]  # readable: the settings, counts (for "what changed" messages)
    outputs: Callable[[], Iterable[Path]]  # the files the work wrote, listed once it is done
    work: Callable[[], Any]  # every rank; its value is run_step's
    current: str  # the one line said when the step is skipped ("": none)
    on_stale: Literal["redo", "refuse"] = "redo"  # refuse: redoing would lose a user's work
    what: str = ""  # names the outputs in a refusal ("tiny/resnet18 fold 0 (runs/...)")
    remedy: str = ""  # the refusal's remedy
    redo: str = ""  # the line when stale outputs are redone; "{why}" is replaced by what changed
    check: Callable[[], None] | None = None  # every rank, once the step is to run, before
    # FORCE=1 deletes anything: a wrong setting fails here and loses nothing
    clear: Path | None = None  # the folder the step owns: FORCE=1 empties it (rank 0)
    prepare: Callable[[], None] | None = None  # rank 0, after `clear`, before the work
    main_only: bool = False  # the work is rank 0's alone (a submission); None on the others
    recorded: Callable[[Any], dict[str, Any]] | None = None  # details known once the work is
    # done (counts), from its value; added to `details` in the manifest
    all_or_none: bool = False  # a work or manifest that fails removes the outputs and the
    # manifest (rank 0): a set read as one (a submission and its report) is never left half


@dataclass(frozen=True)
class Decision:
    action: Literal["skip", "do", "refuse"]
    fresh: Freshness


def decide(manifest: Path, inputs: dict[str, str], details: dict[str, Any] | None, force: bool,
           *, on_stale: str = "redo") -> Decision:
    """The one rule (freshness.freshness) applied: skip the current, refuse stale work that
    redoing would throw away, do the rest; FORCE=1 does everything."""
    fresh = freshness(manifest, inputs, details)
    if force:
        return Decision("do", fresh)
    if fresh.current:
        return Decision("skip", fresh)
    return Decision("refuse" if fresh.state == "stale" and on_stale == "refuse" else "do", fresh)


def run_step(step: Step, force: bool) -> Any:
    """Run a step unless it is current: its work's value, or None when it was skipped."""
    decision = decide(step.manifest, step.inputs, step.details, force, on_stale=step.on_stale)
    if distributed.broadcast_from_main(decision.action == "skip"):  # every rank, or none
        if step.current:  # empty: the verb says it in its own table
            log.info(step.current)
        return None
    if decision.action == "refuse":
        raise refuse_stale(step.what, decision.fresh, step.remedy)
    if decision.fresh.state == "stale" and not force and step.redo:
        log.info(step.redo.replace("{why}", decision.fresh.why()))
    if step.check is not None:
        step.check()
    if step.clear is not None or step.prepare is not None:
        if distributed.is_main():
            _prepare(step, force)
        distributed.barrier()  # no rank looks into the folder before it is ready
    try:
        result = step.work() if distributed.is_main() or not step.main_only else None
        if distributed.is_main():
            details = {**step.details, **(step.recorded(result) if step.recorded else {})}
            write_manifest(step.manifest, step.name, step.inputs, step.outputs(), details=details)
    except BaseException:  # an interrupt too: a kill cannot be caught, and a set without its
        # manifest is stale by the one rule
        if step.all_or_none and distributed.is_main():
            _remove_outputs(step)
        raise
    distributed.barrier()  # every rank reads the step's files once rank 0 has written them
    return result


def _remove_outputs(step: Step) -> None:
    for path in [*step.outputs(), step.manifest]:
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)


def _prepare(step: Step, force: bool) -> None:
    if step.clear is not None:
        if force and step.clear.exists():
            shutil.rmtree(step.clear)
        step.clear.mkdir(parents=True, exist_ok=True)
    if step.prepare is not None:
        step.prepare()


def on_main(action: Callable[[], Any]) -> Any:
    """Run `action` on rank 0 only (a summary, a submission read from the ranks' files), after
    every rank got here; None on the others."""
    distributed.barrier()
    return action() if distributed.is_main() else None


def show_table(rows: list[dict[str, Any]]) -> None:
    """The end-of-stage table: one row per step that ran, headed by the first row's keys."""
    if rows:
        log.info(format_table([list(r.values()) for r in rows], list(rows[0])))
