"""Losses for imbalanced classes: weighted cross-entropy, focal loss, a class-balanced sampler.

Class weights come from the training fold's counts only (never the validation fold's).
Every scheme is scaled so that a training image weighs 1 on average (sum_c n_c * w_c = N): the
loss keeps the scale of unweighted training and the learning rate needs no retuning.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import WeightedRandomSampler

from pipeline.base.config import ConfigError


def class_weights(targets: Sequence[int], num_classes: int, scheme: str | Sequence[float],
                  beta: float = 0.999) -> np.ndarray | None:
    """Per-class loss weights (C,) for `scheme`; None for 'none'.

    inverse:      w_c ~ 1 / n_c
    sqrt_inverse: w_c ~ 1 / sqrt(n_c)          (milder; common for retina grading)
    effective:    w_c ~ (1 - beta) / (1 - beta**n_c)   (Cui et al. 2019, effective number)
    a list:       taken as given (one number per class)
    """
    if not isinstance(scheme, str):
        weights = np.asarray(scheme, dtype=np.float64)
        if weights.shape != (num_classes,):
            raise ConfigError(f"train.class_weights has {len(weights)} numbers for {num_classes} "
                              f"classes; give one weight per class, in the order of `classes`")
        return weights
    if scheme == "none":
        return None
    targets = np.asarray(targets, dtype=np.int64)
    # A class absent from the training fold gets the weight of a class seen once.
    counts = np.maximum(np.bincount(targets, minlength=num_classes), 1).astype(np.float64)
    if scheme == "inverse":
        # sklearn's "balanced" weights, N / (C * n_c), are already scaled so that an image weighs
        # 1 on average; an absent class joins once, as above
        absent = np.flatnonzero(np.bincount(targets, minlength=num_classes) == 0)
        raw = compute_class_weight("balanced", classes=np.arange(num_classes),
                                   y=np.concatenate([targets, absent]))
    elif scheme == "sqrt_inverse":
        raw = 1.0 / np.sqrt(counts)
    elif scheme == "effective":
        raw = (1.0 - beta) / (1.0 - np.power(beta, counts))
    else:
        raise ValueError(f"unknown class weight scheme {scheme!r}")
    return raw * counts.sum() / (raw * counts).sum()


class FocalLoss(torch.nn.Module):
    """Focal loss (Lin et al. 2017) with optional class weights and label smoothing.

    loss = -sum_k q_k * (1 - p_k)**gamma * log p_k, with q the (smoothed) target distribution;
    for one-hot q this is the usual -(1 - p_t)**gamma * log p_t. Weighted mean over the batch,
    as cross-entropy with `weight=` does.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        log_probs = F.log_softmax(logits.float(), dim=1)
        q = F.one_hot(targets, num_classes).float()
        if self.label_smoothing:
            q = q * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        per_sample = -(q * (1 - log_probs.exp()).pow(self.gamma) * log_probs).sum(dim=1)
        if self.weight is None:
            return per_sample.mean()
        sample_weight = self.weight[targets]
        return (per_sample * sample_weight).sum() / sample_weight.sum()


class SoftTargetLoss(torch.nn.Module):
    """Cross-entropy (or focal loss) against soft targets q (B, C), as mixup and cutmix make them.

    loss = sum_i s_i * l_i / sum_i s_i with l_i = -sum_c q_ic (1 - p_ic)**gamma log p_ic and the
    sample weight s_i = sum_c q_ic w_c: a mixed image weighs its classes' weights in the shares it
    holds them, so for one-hot q this is the weighted loss of the hard label.
    """

    def __init__(self, weight: torch.Tensor | None = None, gamma: float = 0.0):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)
        focus = (1 - log_probs.exp()).pow(self.gamma) if self.gamma else 1.0
        per_sample = -(soft * focus * log_probs).sum(dim=1)
        if self.weight is None:
            return per_sample.mean()
        sample_weight = soft @ self.weight
        return (per_sample * sample_weight).sum() / sample_weight.sum()


class GradeLoss(torch.nn.Module):
    """A regression head's loss on the grade (the class index of an ordinal competition).

    Targets are class indices (B,) or soft targets (B, C) from mixup, whose grade is
    sum_c c * q_c (the mix of the two grades). Class weights weigh each sample as its grade's
    class (its soft shares, when mixed).
    """

    def __init__(self, kind: str, weight: torch.Tensor | None, num_classes: int):
        super().__init__()
        self.kind = kind
        self.register_buffer("weight", weight)
        self.register_buffer("grades", torch.arange(num_classes, dtype=torch.float32))

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        predicted = outputs.float().reshape(len(outputs))
        soft = targets.float() if targets.ndim == 2 else F.one_hot(
            targets, len(self.grades)).float()
        grade = soft @ self.grades
        if self.kind == "mse":
            per_sample = F.mse_loss(predicted, grade, reduction="none")
        else:
            per_sample = F.smooth_l1_loss(predicted, grade, reduction="none")
        if self.weight is None:
            return per_sample.mean()
        sample_weight = soft @ self.weight
        return (per_sample * sample_weight).sum() / sample_weight.sum()


class TrainingLoss(torch.nn.Module):
    """The training loss for class-index targets (B,) and soft targets (B, C) alike."""

    def __init__(self, hard: torch.nn.Module, soft: torch.nn.Module):
        super().__init__()
        self.hard, self.soft = hard, soft

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.soft(outputs, targets) if targets.ndim == 2 else self.hard(outputs, targets)


class BothLoss(torch.nn.Module):
    """model.head: both: the class logits' loss plus `weight` times the grade output's loss."""

    def __init__(self, classes: torch.nn.Module, grade: torch.nn.Module, n_classes: int,
                 weight: float):
        super().__init__()
        self.classes, self.grade, self.n_classes, self.weight = classes, grade, n_classes, weight

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = self.n_classes
        return self.classes(outputs[:, :n], targets) + \
            self.weight * self.grade(outputs[:, n:n + 1], targets)


def build_loss(kind: str, weights: np.ndarray | None, label_smoothing: float,
               focal_gamma: float, *, head: str = "classification",
               regression_loss: str = "smooth_l1", num_classes: int | None = None, grade_weight: float = 1.0) -> torch.nn.Module:
    """The training loss; its `class_weight` (None, or (C,)) is what each image's loss is
    weighted by: a batch's loss is the mean over its images weighted by their classes'."""
    loss = _build_loss(kind, None if weights is None else torch.tensor(weights, dtype=torch.float32),
                       label_smoothing, focal_gamma, head=head, regression_loss=regression_loss,
                       num_classes=num_classes or len(weights), grade_weight=grade_weight)
    loss.register_buffer("class_weight", None if weights is None else
                         torch.tensor(weights, dtype=torch.float32))
    return loss


def image_weights(class_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) each image's weight in a class-weighted mean: its class's, or, for a soft target
    (B, C), its classes' in the shares it holds them (as the losses above weigh it)."""
    return targets.float() @ class_weight if targets.ndim == 2 else class_weight[targets]


def _build_loss(kind: str, weight: torch.Tensor | None, label_smoothing: float,
                focal_gamma: float, *, head: str, regression_loss: str, num_classes: int,
                grade_weight: float) -> torch.nn.Module:
    n_classes = num_classes
    if head == "regression":
        grade = GradeLoss(regression_loss, weight, n_classes)
        return TrainingLoss(grade, grade)
    soft = SoftTargetLoss(weight, focal_gamma if kind == "focal" else 0.0)
    if kind == "focal":
        classes = TrainingLoss(FocalLoss(focal_gamma, weight, label_smoothing), soft)
    else:
        classes = TrainingLoss(torch.nn.CrossEntropyLoss(weight=weight,
                                                         label_smoothing=label_smoothing), soft)
    if head == "both":
        grade = GradeLoss(regression_loss, weight, n_classes)
        return BothLoss(classes, TrainingLoss(grade, grade), n_classes, grade_weight)
    return classes


def balanced_sampler(targets: Sequence[int], generator: torch.Generator) -> WeightedRandomSampler:
    """Draws every class equally often (with replacement), one epoch = len(targets) draws."""
    targets = np.asarray(targets)
    counts = np.bincount(targets)
    sample_weights = 1.0 / counts[targets]
    return WeightedRandomSampler(torch.as_tensor(sample_weights, dtype=torch.double),
                                 num_samples=len(targets), replacement=True, generator=generator)


def build_mixer(train, num_classes: int):
    """timm's Mixup for train.mixup / train.cutmix (None when both are 0).

    It mixes a batch with its reverse and returns soft targets (B, C), label smoothing included;
    TrainingLoss then takes the soft-target branch (SoftTargetLoss, GradeLoss).
    """
    if not train.mixup and not train.cutmix:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=train.mixup, cutmix_alpha=train.cutmix, prob=train.mix_prob,
                 label_smoothing=train.label_smoothing, num_classes=num_classes)
