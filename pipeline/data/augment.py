"""Augmentation pipelines from config (albumentations) and the normalisation statistics.

Images stay uint8 through the CPU pipeline; the float conversion and normalisation happen on the
training device (`Normalizer`), which keeps host-to-device copies 4x smaller.

Augmentation is reproducible per image: the sampler hands each dataset item a seed made from
(run seed, epoch, index), so an image gets the same augmentation whatever the worker count, a
resume, or a distributed split of the batch.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch

from pipeline.base.config import AugmentConfig, Transform
from pipeline.base.utils import PipelineError, write_text_atomic
from pipeline.data.images import INTERPOLATIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _build_transform(spec: Transform, where: str) -> A.BasicTransform:
    (name, args), = spec.items()
    cls = getattr(A, name, None)
    if cls is None or not isinstance(cls, type):
        raise PipelineError(f"augment.{where}: unknown albumentations transform {name!r}; see "
                            f"https://albumentations.ai/docs/ for names (e.g. HorizontalFlip)")
    try:
        return cls(**(args or {}))
    except Exception as err:  # albumentations validates arguments with pydantic
        raise PipelineError(f"augment.{where}: {name}({args}) is invalid: {err}") from None


def build_transforms(augment: AugmentConfig, train: bool) -> A.Compose:
    """Resize to the model's input size, then the configured transforms; uint8 in, uint8 out."""
    specs = augment.train if train else augment.eval
    where = "train" if train else "eval"
    size = augment.image_size
    steps = [A.Resize(size, size, interpolation=INTERPOLATIONS[augment.interpolation])]
    steps += [_build_transform(spec, where) for spec in specs]
    return A.Compose(steps, seed=0)


def epoch_size(augment: AugmentConfig, epoch: int) -> int:
    """The training size of 0-based `epoch` under augment.sizes (progressive resizing): the
    size of the latest phase begun by it, else augment.image_size."""
    size = augment.image_size
    for first, phase_size in sorted(augment.sizes.items()):
        if first <= epoch + 1:
            size = phase_size
    return size


def at_size(augment: AugmentConfig, size: int) -> AugmentConfig:
    """The same augmentation at another input size (a phase of augment.sizes, tta.image_size)."""
    return augment if size == augment.image_size else augment.model_copy(
        update={"image_size": size})


def reseed(transform: A.Compose, seed: int) -> None:
    """Give a pipeline fresh random generators (cheap: two objects, not one per transform)."""
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def item_seed(base: int, epoch: int, index: int) -> int:
    """A distinct, reproducible seed for image `index` in `epoch` of a run seeded `base`."""
    return int(np.random.SeedSequence([base, epoch, index]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# Normalisation


def resolve_normalization(augment: AugmentConfig, model_config: dict,
                          dataset_stats: tuple[Sequence[float], Sequence[float]] | None = None,
                          ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on the 0..1 scale, RGB, from the chosen source."""
    if augment.normalize == "model":
        return tuple(model_config["mean"]), tuple(model_config["std"])
    if augment.normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if augment.normalize == "custom":
        return tuple(augment.mean), tuple(augment.std)
    if augment.normalize == "dataset":
        if dataset_stats is None:
            raise ValueError("normalize: dataset needs the training images' statistics")
        return tuple(dataset_stats[0]), tuple(dataset_stats[1])
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def compute_dataset_stats(dataset, path: Path, max_images: int = 2000) -> tuple[list, list]:
    """Per-channel mean and std (0..1) of the training images, computed once and saved as JSON.

    Uses up to `max_images` images spread over the set: enough for stable statistics.
    """
    if path.is_file():
        saved = json.loads(path.read_text())
        return saved["mean"], saved["std"]
    step = max(1, len(dataset) // max_images)
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for index in range(0, len(dataset), step):
        image = dataset[index][0].numpy().astype(np.float64) / 255.0  # (3, H, W)
        total += image.sum(axis=(1, 2))
        total_sq += (image ** 2).sum(axis=(1, 2))
        count += image.shape[1] * image.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
    stats = {"mean": mean.round(6).tolist(), "std": std.round(6).tolist(), "images": len(dataset)}
    write_text_atomic(path, json.dumps(stats, indent=1))
    return stats["mean"], stats["std"]


class Normalizer(torch.nn.Module):
    """uint8 (B, 3, H, W) on the device -> normalised float, optionally channels_last."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (images.float() - self.mean) / self.std
