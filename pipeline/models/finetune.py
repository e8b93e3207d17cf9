"""Two-stage fine-tuning: train the new head alone, then everything with a smaller body lr.

    freeze_body(model)                      # stage 1: head only (train.head_only_epochs)
    optimizer = torch.optim.SGD(param_groups(model, lr=0.05, body_lr_mult=0.1, weight_decay=5e-4))
    ...
    unfreeze(model)                         # stage 2: the same optimizer, all parameters

The head is `model.get_classifier()` (timm's convention, which our ResNet follows); the body is
every other parameter. param_groups covers frozen parameters too, so one optimizer and one
scheduler serve both stages: a parameter without a gradient is skipped by the optimizer
(no update, no weight decay) until it is unfrozen.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier's parameters (empty for a model without a head)."""
    return list(model.get_classifier().parameters())


def body_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not the classifier's."""
    head = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def freeze_body(model: nn.Module) -> None:
    """Only the head trains. BatchNorm running stats still update in train mode, by design:
    the statistics adapt to the new images while the weights stay."""
    for p in body_parameters(model):
        p.requires_grad_(False)
    for p in head_parameters(model):
        p.requires_grad_(True)


def unfreeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def _no_decay_names(model: nn.Module) -> set[str]:
    # timm models name extra parameters that must not decay (position embeddings, tokens).
    hook = getattr(model, "no_weight_decay", None)
    return set(hook()) if callable(hook) else set()


def param_groups(model: nn.Module, lr: float, body_lr_mult: float = 1.0,
                 weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer groups: head at `lr`, body at `lr * body_lr_mult`, each split in decay/no-decay.

    Biases and norm weights (1-D tensors) get no weight decay: decaying a BN gamma or a bias only
    shrinks the scale the next layer sees, it does not regularise. Groups are named
    head, head_no_decay, body, body_no_decay; empty ones are left out.
    """
    head = {id(p) for p in head_parameters(model)}
    skip = _no_decay_names(model)
    buckets: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        part = "head" if id(p) in head else "body"
        no_decay = p.ndim <= 1 or name in skip
        buckets.setdefault(part + ("_no_decay" if no_decay else ""), []).append(p)
    rates = {"head": lr, "body": lr * body_lr_mult}
    order = ("head", "head_no_decay", "body", "body_no_decay")
    return [{"name": key, "params": buckets[key], "lr": rates[key.split("_")[0]],
             "weight_decay": 0.0 if key.endswith("no_decay") else weight_decay}
            for key in order if key in buckets]
