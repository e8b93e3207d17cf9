"""The torch Dataset over image paths, and the seeded sampler that fixes each image's augmentation.

    dataset = ImageDataset(paths, targets, transform, loader)   # (image tensor, target) items

Kept apart from the tables (pipeline/data/tables.py), so that the verbs that only read CSVs and
image headers (`make check`, `folds`, `runs`) do not import torch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.data.augment import item_seed, reseed
from pipeline.data.images import read_image


class ImageDataset(Dataset):
    """Images as uint8 CHW tensors (normalised later, on the device), with their class index.

    `transform` is an albumentations pipeline (or any callable taking `image=` and returning a dict
    with `image`); it must keep uint8 and output the model's input size.
    """

    def __init__(self, paths: Sequence[Path], targets: Sequence[int] | None = None,
                 transform: Callable | None = None, loader: Callable[[Path], np.ndarray] = read_image):
        if targets is not None and len(targets) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = list(paths)
        # class indices (N,), or target distributions (N, C) (soft pseudo-labels)
        soft = targets is not None and np.ndim(targets) == 2
        self.targets = None if targets is None else np.asarray(
            targets, dtype=np.float32 if soft else np.int64)
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        # A (index, seed) item fixes this image's augmentation (see augment.py and SeededSampler).
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = self.loader(self.paths[index])
        if self.transform is not None:
            if seed is not None:
                reseed(self.transform, seed)
            image = self.transform(image=image)["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.targets is not None and self.targets.ndim == 2:
            return tensor, torch.from_numpy(self.targets[index])
        target = -1 if self.targets is None else int(self.targets[index])
        return tensor, target


class SeededSampler(Sampler):
    """Wraps a sampler to yield (index, seed) items; the seed depends on (base, epoch, index) only.

    Call `set_epoch` before each epoch (as with DistributedSampler, which it may wrap).
    """

    def __init__(self, sampler: Sampler, base_seed: int):
        self.sampler = sampler
        self.base_seed = base_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        for index in self.sampler:
            yield int(index), item_seed(self.base_seed, self.epoch, int(index))

    def __len__(self) -> int:
        return len(self.sampler)
