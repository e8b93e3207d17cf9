"""The learning-rate path of a run as plain arithmetic: the multiplier per optimiser step, the steps
of an epoch, and the path a full-data refit walks again (FoldPath).

    factor = lr_factor(config.train, steps_per_epoch(n_images, batch, max_batches))
    factor(step)                                   # the multiplier of train.lr at that step

No torch here: the freshness rule reads a refit's path (experiments/freshness.py) in verbs that
load no model (`make runs`, `make status`); training/schedule.py builds torch's optimiser and
scheduler on top of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.base.config import TrainConfig


@dataclass(frozen=True)
class FoldPath:
    """The learning-rate path the fold runs walked, for the full-data refit to walk again.

    The refit's E_r epochs are mapped onto the folds' schedule from its start to `until` (the
    fold epoch cross-validation chose): its step s of E_r * S_r stands for the folds' step
    s * until * S_f / (E_r * S_r). Warm-up, milestones and the cosine keep the folds' epochs and
    length, so the refit ends where the validated models were, not at the end of a schedule
    squeezed into fewer epochs; its epochs hold K/(K-1) times the folds' steps (more images,
    the same batch), and a refit.epochs other than `until` stretches the path over it.
    """

    steps_per_epoch: int  # the folds' optimiser steps per epoch
    epochs: int  # the folds' train.epochs: the length of the schedule they walked
    until: float  # the fold epoch the refit's last step reaches


def lr_factor(train: TrainConfig, steps_per_epoch: int,
              path: FoldPath | None = None) -> Callable[[int], float]:
    """Learning-rate multiplier per optimiser step: linear warm-up, then cosine/multistep/constant.

    With `path` (the refit), the steps walk the folds' schedule instead (see FoldPath).
    """
    schedule_steps = path.steps_per_epoch if path else steps_per_epoch
    warmup = train.warmup_epochs * schedule_steps
    total = (path.epochs if path else train.epochs) * schedule_steps
    scale = (path.until * schedule_steps / (train.epochs * steps_per_epoch)) if path else 1.0

    def factor(step: int) -> float:
        step = step * scale
        if step < warmup:
            return (step + 1) / warmup
        if train.scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if train.scheduler == "multistep":
            epoch = step // schedule_steps
            return train.gamma ** sum(epoch >= m for m in train.milestones)
        return 1.0

    return factor


def optimizer_steps(batches: int, max_batches: int | None, accumulate: int) -> int:
    """Optimiser steps of an epoch of `batches` loader batches: at most train.max_batches of
    them, `accumulate` micro-batches per step (an incomplete last step is dropped)."""
    batches = batches if max_batches is None else min(batches, max_batches)
    return max(1, batches // accumulate)


def steps_per_epoch(n_images: int, batch_size: int, max_batches: int | None) -> int:
    """Loader batches of one epoch over `n_images` (drop_last when the data holds more than a
    batch: no size-1 batch for BatchNorm), at most train.max_batches. The refit's FoldPath
    counts these; with train.accumulate its steps scale alike, so the path is the same."""
    batches = n_images // batch_size if n_images > batch_size else 1
    return optimizer_steps(batches, max_batches, 1)
