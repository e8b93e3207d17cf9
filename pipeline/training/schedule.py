"""The optimiser and the learning-rate schedule of a run, and the path a refit walks again.

The optimiser comes from timm's factory (`create_optimizer_v2`) over our parameter groups (head
and body at their own learning rates, no weight decay on biases and norms: models/finetune.py).
The schedule is our own `LambdaLR` factor per optimiser step rather than timm's schedulers: the
full-data refit walks the folds' schedule (warm-up, milestones, cosine over the folds' length) up
to the epoch cross-validation chose, at another number of steps per epoch (`FoldPath`), which
none of timm's schedulers expresses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.base.config import TrainConfig
from pipeline.models.finetune import param_groups


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


def build_optimizer(train: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (Nesterov unless train.nesterov is false), Adam or AdamW over our parameter groups."""
    # imported here: timm.optim pulls in torch's compiler stack (~2 s), which the stages that only
    # read a schedule's shape (status: the refit's path) need not pay
    from timm.optim import create_optimizer_v2

    groups = param_groups(model, train.lr, train.body_lr_mult, train.weight_decay)
    if train.optimizer == "sgd":
        name = "sgd" if train.nesterov else "momentum"  # timm's names for the two SGDs
        return create_optimizer_v2(groups, opt=name, lr=train.lr, momentum=train.momentum)
    return create_optimizer_v2(groups, opt=train.optimizer, lr=train.lr)


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


def build_scheduler(train: TrainConfig, optimizer: torch.optim.Optimizer, steps: int,
                    path: FoldPath | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train, steps, path))


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
