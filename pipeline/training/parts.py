"""The parts of one training run, built once before the loop starts.

    parts = build_parts(config, spec, part.dataset_stats)   # model, loaders, loss, optimiser, ...
    trainer = run.make_trainer(config, spec)                 # the parts and the loop together

Each builder takes the config sections it uses. The order is part of the result: the fold's seed
is set, then the model is created (its initialisation is the only draw from the global
generators here), so a run is the same whatever else is built around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, RandomSampler

from pipeline.base import distributed
from pipeline.base.config import AugmentConfig, Config, ModelConfig, TrainConfig
from pipeline.data.augment import (
    Normalizer,
    at_size,
    build_transforms,
    compute_dataset_stats,
    epoch_size,
    resolve_normalization,
)
from pipeline.data.dataset import ImageDataset, SeededSampler
from pipeline.data.imagecache import image_loader
from pipeline.data.tables import train_image_paths
from pipeline.experiments.layout import Part
from pipeline.inference.engine import (
    amp_dtype,
    loader_settings,
    make_loader,
    output_size,
    resolve_device,
)
from pipeline.models.factory import create_model, model_input_config
from pipeline.models.names import built_stem
from pipeline.training.losses import (
    balanced_sampler,
    build_loss,
    build_mixer,
    class_weights,
)
from pipeline.training.lr_path import FoldPath, optimizer_steps
from pipeline.training.schedule import build_optimizer, build_scheduler


@dataclass
class Rows:
    """Labelled rows of one split: ids, labels as spelled, class indices."""

    ids: list[str]
    labels: list[str]
    targets: np.ndarray

    @classmethod
    def of(cls, frame: pd.DataFrame) -> Rows:
        return cls(frame["id"].tolist(), frame["label"].tolist(), frame["target"].to_numpy())


@dataclass(kw_only=True)
class RunSpec:
    """What one run trains on: a fold (valid rows) or the full-data refit (valid None)."""

    part: Part
    train_rows: Rows
    valid_rows: Rows | None
    seed: int
    tag: str  # "fold 2" or "full": the prefix of its lines and progress bars
    inputs: dict[str, str]  # the input fingerprints (experiments/freshness.py), kept in last.pt
    path: FoldPath | None = None  # the refit: the folds' learning-rate path to walk again
    # the pseudo-labelled test images (paths, target distributions (N, C)) that join the
    # training part only, read when the run is built (not for a run that is current)
    pseudo: Callable[[], tuple[list[Path], np.ndarray] | None] | None = None
    micro_batches: Path | None = None  # train.micro_batch: auto's measurements (Layout)


class SizedLoaders:
    """The training loader at each epoch's size (augment.sizes, progressive resizing): the one
    at augment.image_size is built with the parts, another when a phase of another size starts.
    A loader's workers keep the transform they started with (persistent workers), so a new
    size is a new loader; the sampler, its generator and the images' seeds are the same, so an
    epoch's images and order do not depend on the size or on a resume."""

    def __init__(self, augment: AugmentConfig, full: DataLoader,
                 build: Callable[[AugmentConfig], DataLoader]):
        self.augment, self.full, self.build = augment, full, build
        self.current: tuple[int, DataLoader] = (augment.image_size, full)

    def size(self, epoch: int) -> int:
        return epoch_size(self.augment, epoch)

    def log_fields(self, epoch: int) -> dict[str, int]:
        """The epoch's training size, for its log row, under a schedule."""
        return {"size": self.size(epoch)} if self.augment.sizes else {}

    def at(self, epoch: int) -> DataLoader:
        size = self.size(epoch)
        if size == self.augment.image_size:
            self.current = (size, self.full)  # the last phase's workers end with its loader
            return self.full
        if self.current[0] != size:
            self.current = (size, self.build(at_size(self.augment, size)))
        return self.current[1]


@dataclass
class Parts:
    """Everything the loop trains with."""

    device: torch.device
    dtype: torch.dtype | None  # autocast precision; None: float32
    model: torch.nn.Module  # the bare model: its weights are what checkpoints hold
    forward_model: torch.nn.Module  # training forward: DDP and/or compiled
    eval_model: torch.nn.Module  # validation forward: the bare (or compiled) model, or the EMA's
    ema: ModelEmaV3 | None
    normalizer: Normalizer
    normalization: tuple[tuple, tuple]  # (mean, std), 0..1 scale, saved in every checkpoint
    train_loader: DataLoader  # at augment.image_size (the largest size)
    sized_loaders: SizedLoaders  # the loader of each epoch's size (augment.sizes)
    valid_loader: DataLoader | None
    sampler: SeededSampler
    generator: torch.Generator  # the training order; reseeded each epoch from (seed, epoch)
    criterion: torch.nn.Module  # on the device
    valid_criterion: torch.nn.Module  # the same loss on the CPU, for the gathered logits
    mixer: object | None  # timm's Mixup
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int  # optimiser steps (train.accumulate micro-batches each)


def build_model(model: ModelConfig, n_classes: int, image_size: int) -> torch.nn.Module:
    """The model of `model.*` with its pretrained weights (a timm model's fetched from the hub on
    first use: pipeline/models/weights.py), for images of `image_size` (what `model.stem: auto`
    chooses by)."""
    return create_model(model.name, output_size(model.head, n_classes),
                        pretrained=model.pretrained, weights=model.weights,
                        weights_dir=model.weights_dir, drop_rate=model.drop_rate,
                        zero_init_last=model.zero_init_last,
                        drop_path_rate=model.drop_path_rate,
                        stem=built_stem(model, image_size)[0])


def with_pseudo(spec: RunSpec, pseudo: tuple[list[Path], np.ndarray], train_paths: list[Path],
                n_classes: int, *, label_smoothing: float) -> tuple[list[Path], np.ndarray]:
    """The training part plus the pseudo-labelled test images; every target becomes a
    distribution (N, C): the labelled rows one-hot (label smoothing applied here, as the
    soft-target loss does not), the pseudo rows as `make pseudo` wrote them."""
    paths, soft = pseudo
    labelled = np.eye(n_classes, dtype=np.float32)[spec.train_rows.targets]
    labelled = labelled * (1 - label_smoothing) + label_smoothing / n_classes
    print(f"{spec.tag}: {len(paths)} pseudo-labelled test images join the training part")
    return train_paths + list(paths), np.concatenate([labelled, soft.astype(np.float32)])


def normalization(augment: AugmentConfig, model: torch.nn.Module, dataset: ImageDataset,
                  stats_path: Path) -> tuple[tuple, tuple]:
    """(mean, std) of augment.normalize; `dataset`: the resized training images, whose
    statistics are computed once per experiment when asked for."""
    stats = None
    if augment.normalize == "dataset":
        plain = ImageDataset(dataset.paths, None, build_transforms(augment, False), dataset.loader)
        stats = compute_dataset_stats(plain, stats_path)
    return resolve_normalization(augment, model_input_config(model), stats)


def training_loader(train: TrainConfig, dataset: ImageDataset, targets: np.ndarray, seed: int,
                    *, settings: dict) -> tuple[DataLoader, SeededSampler, torch.Generator]:
    """The training loader: shuffled (or class-balanced) by a generator reseeded every epoch;
    under torchrun each rank takes its positions of the same order (distributed.RankOrder).
    Its loader at another size: `resized_loader`."""
    generator = torch.Generator()
    if train.sampler == "balanced":
        drawn = np.asarray(targets)
        drawn = drawn.argmax(axis=1) if drawn.ndim == 2 else drawn  # soft: most likely class
        base = balanced_sampler(drawn, generator)
    else:
        base = RandomSampler(dataset, generator=generator)
    drop_last = len(dataset) > train.batch_size  # no size-1 batch for BatchNorm
    sampler = SeededSampler(distributed.rank_order(base, drop_last), seed)
    # train.batch_size is the global batch; under torchrun each rank loads its share of it.
    loader = make_loader(dataset, distributed.per_rank_batch(train.batch_size), sampler,
                         settings, drop_last=drop_last)
    return loader, sampler, generator


def resized_loader(loader: DataLoader, augment: AugmentConfig, settings: dict) -> DataLoader:
    """`loader` (a training loader) with its images at augment.image_size: the same images,
    targets, sampler and batches through the training transforms of that size."""
    dataset = loader.dataset
    resized = ImageDataset(dataset.paths, dataset.targets, build_transforms(augment, train=True),
                           dataset.loader)
    return make_loader(resized, loader.batch_size, loader.sampler, settings,
                       drop_last=loader.drop_last)


def validation_loader(augment: AugmentConfig, paths: list[Path], targets: np.ndarray,
                      read, *, batch_size: int, settings: dict) -> DataLoader:
    """Each rank predicts a contiguous shard of the validation rows (gathered by the loop)."""
    dataset = ImageDataset(paths, targets, build_transforms(augment, train=False), read)
    return make_loader(dataset, batch_size * 2, distributed.shard_sampler(len(dataset)), settings)


def place_model(model: torch.nn.Module, train: TrainConfig, device: torch.device) -> None:
    model.to(device)
    if device.type == "cuda" and train.channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def wrap_model(model: torch.nn.Module, train: TrainConfig,
               device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(bare model, training forward, validation forward): the model itself, or compiled.

    Under torchrun training runs through DistributedDataParallel (which averages gradients) and
    validation through the bare model on each rank's own shard: DDP's forward may broadcast
    buffers, a collective that ranks with unequal shards would not all reach.
    """
    compile_model = train.compile and device.type == "cuda"
    if not distributed.is_distributed():
        forward = torch.compile(model) if compile_model else model
        return model, forward, forward
    ddp = distributed.wrap_ddp(model, device, train.sync_bn,
                               find_unused=train.head_only_epochs > 0)  # a frozen body sits out
    model = ddp.module  # with SyncBatchNorm layers when train.sync_bn
    forward = torch.compile(ddp) if compile_model else ddp
    return model, forward, torch.compile(model) if compile_model else model


def losses(train: TrainConfig, head: str, targets: np.ndarray, n_classes: int,
           *, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(training loss on the device, the same on the CPU for validation), class weights from
    the training rows' counts only."""
    weights = class_weights(targets, n_classes, train.class_weights, train.effective_beta)
    def build() -> torch.nn.Module:
        return build_loss(train.loss, weights, train.label_smoothing, train.focal_gamma, head=head,
                          regression_loss=train.regression_loss, num_classes=n_classes,
                          grade_weight=train.grade_loss_weight)

    return build().to(device), build()


def build_parts(config: Config, spec: RunSpec, stats_path: Path) -> Parts:
    """Every part of one run, in the order that keeps its randomness (module docstring)."""
    c, data, n_classes = config, config.data, len(config.data.classes)
    device = distributed.local_device(resolve_device(c.train.device))  # under torchrun: its GPU
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed % 2**32)
    model = build_model(c.model, n_classes, c.augment.image_size)
    train_paths = train_image_paths(data, spec.train_rows.ids)
    valid_paths = train_image_paths(data, spec.valid_rows.ids) if spec.valid_rows else []
    # cache.enabled: every image decoded and shrunk once now, read back as arrays every epoch
    read = image_loader(c.cache, c.augment, train_paths + valid_paths, desc=f"{spec.tag} cache",
                        max_pixels=data.max_image_pixels)
    targets = spec.train_rows.targets
    pseudo = spec.pseudo() if spec.pseudo is not None else None
    if pseudo is not None:
        train_paths, targets = with_pseudo(spec, pseudo, train_paths, n_classes,
                                           label_smoothing=c.train.label_smoothing)
    train_set = ImageDataset(train_paths, targets, build_transforms(c.augment, train=True), read)
    mean_std = normalization(c.augment, model, train_set, stats_path)
    channels_last = device.type == "cuda" and c.train.channels_last
    normalizer = Normalizer(*mean_std, channels_last=channels_last).to(device)
    place_model(model, c.train, device)
    settings = loader_settings(device, c.train.workers)
    train_loader, sampler, generator = training_loader(c.train, train_set, targets, spec.seed,
                                                       settings=settings)
    valid_loader = None if spec.valid_rows is None else validation_loader(
        c.augment, valid_paths, spec.valid_rows.targets, read,
        batch_size=distributed.per_rank_batch(c.train.batch_size), settings=settings)
    criterion, valid_criterion = losses(c.train, c.model.head, spec.train_rows.targets,
                                        n_classes, device=device)
    optimizer = build_optimizer(c.train, model)
    steps = optimizer_steps(len(train_loader), c.train.max_batches, c.train.accumulate)
    dtype = amp_dtype(device, c.train.amp)
    model, forward, evaluate = wrap_model(model, c.train, device)
    # EMA weights are validated, saved in best.pt and predicted (timm's ModelEmaV3, warm-up on)
    ema = (ModelEmaV3(model, decay=c.train.ema_decay, use_warmup=True) if c.train.ema else None)
    return Parts(device=device, dtype=dtype, model=model, forward_model=forward,
                 eval_model=ema.module if ema is not None else evaluate, ema=ema,
                 normalizer=normalizer, normalization=mean_std, train_loader=train_loader,
                 sized_loaders=SizedLoaders(c.augment, train_loader,
                                            lambda augment: resized_loader(train_loader, augment,
                                                                           settings)),
                 valid_loader=valid_loader, sampler=sampler, generator=generator,
                 criterion=criterion, valid_criterion=valid_criterion,
                 mixer=build_mixer(c.train, n_classes), optimizer=optimizer,
                 scheduler=build_scheduler(c.train, optimizer, steps, spec.path),
                 scaler=torch.amp.GradScaler("cuda", enabled=dtype == torch.float16),
                 steps_per_epoch=steps)
