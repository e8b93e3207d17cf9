"""The optimiser and the learning-rate schedule of a run, and the path a refit walks again.

The optimiser comes from timm's factory (`create_optimizer_v2`) over our parameter groups (head
and body at their own learning rates, no weight decay on biases and norms: models/finetune.py).
The schedule is our own `LambdaLR` factor per optimiser step rather than timm's schedulers: the
full-data refit walks the folds' schedule (warm-up, milestones, cosine over the folds' length) up
to the epoch cross-validation chose, at another number of steps per epoch (`FoldPath`), which
none of timm's schedulers expresses.
"""

from __future__ import annotations

import torch

from pipeline.base.config import TrainConfig
from pipeline.models.finetune import param_groups
from pipeline.training.lr_path import FoldPath, lr_factor


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


def build_scheduler(train: TrainConfig, optimizer: torch.optim.Optimizer, steps: int,
                    path: FoldPath | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train, steps, path))
