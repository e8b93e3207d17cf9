"""Train one run folder (a fold, or the full-data refit): the one way training writes a part.

    train_part(config, spec, details, force, what="tiny/resnet18 fold 0 (...)", stage="train")

A part whose manifest matches the inputs of now is skipped; one made from other inputs is refused,
naming what changed (FORCE=1 retrains it, NAME= keeps both); otherwise its folder is prepared
(FORCE=1 clears it first), the resolved config saved, the model trained (resuming from last.pt
when that was made from the same inputs), the validation fold predicted, and the manifest written
last: the done mark. `make train`, `make refit` and `make pseudo`'s round two all train here.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from pipeline.base import distributed
from pipeline.base.config import AugmentConfig, Config, save_config
from pipeline.base.log import log
from pipeline.base.utils import PipelineError, warn, write_csv_atomic
from pipeline.data.augment import at_size, build_transforms
from pipeline.experiments.freshness import pseudo_fingerprint, stale_remedy
from pipeline.experiments.layout import Layout
from pipeline.experiments.probfiles import probability_frame
from pipeline.experiments.runner import Step, run_step
from pipeline.inference.engine import load_checkpoint, unwrap
from pipeline.models.factory import small_input_warning
from pipeline.models.names import built_stem
from pipeline.reporting import plots
from pipeline.training.checkpoints import Checkpoints
from pipeline.training.fitting import micro_batch, probe_key, remember_pass
from pipeline.training.loop import Trainer, diverged
from pipeline.training.parts import RunSpec, build_model, build_parts
from pipeline.training.tracking import check_tracking, epoch_done, tracked


def preflight(config: Config, layout: Layout) -> None:
    """Build what training builds first (the model, its weights, the augmentations), so a wrong
    setting fails here, before FORCE=1 deletes anything or a fold starts."""
    build_model(config.model, len(config.data.classes), config.augment.image_size)
    stem, why = built_stem(config.model, config.augment.image_size)
    if config.model.stem == "auto":  # the choice, in the run's output
        log.info(f"model.stem: auto -> {stem} ({why})")
    small = small_input_warning(config.model.name, config.augment.image_size, stem=stem)
    if small:
        warn(small)  # rank 0's (pipeline/base/log.py)
    for size in {config.augment.image_size, *config.augment.sizes.values()}:
        check_output_size(at_size(config.augment, size))  # each phase's, now
    build_transforms(config.augment, train=False)
    if config.train.pseudo and (config.train.mixup or config.train.cutmix):
        raise PipelineError("train.pseudo with mixup/cutmix: timm's Mixup mixes class indices, "
                            "and pseudo-labels are distributions; turn one of them off")
    pseudo_fingerprint(config.train.pseudo, layout)  # a named pseudo-label set must exist
    check_tracking(config.tracking)
    distributed.per_rank_batch(config.train.batch_size)  # a batch the ranks cannot share: now


def check_schedule(augment: AugmentConfig, epochs: int) -> None:
    """The folds' size schedule reaches augment.image_size within train.epochs. (Not a check of
    the config itself: the refit trains the folds' schedule for the epochs CV chose, which may
    end before its last phase, as the folds' chosen epochs did.)"""
    late = sorted(first for first in augment.sizes if first > epochs)
    if late:
        raise PipelineError(f"augment.sizes {augment.sizes}: the phase(s) from epoch "
                            f"{', '.join(map(str, late))} begin after the last epoch ({epochs}): "
                            f"no epoch would train at {augment.image_size} px. Start them by "
                            f"epoch {epochs}, or use augment.sizes=progressive, which follows "
                            f"train.epochs")


def check_output_size(augment: AugmentConfig) -> None:
    """The training transforms of augment.image_size, run once on a blank image: a transform of
    a fixed size (RandomCrop(32) after the resize) would train every phase of augment.sizes
    at its own size instead."""
    out = build_transforms(augment, train=True)(image=np.zeros((48, 64, 3), np.uint8))["image"]
    if out.shape[:2] != (augment.image_size, augment.image_size):
        remedy = ("leave augment.sizes out" if augment.sizes else
                  f"set augment.image_size={out.shape[0]}")
        raise PipelineError(f"augment.train turns {augment.image_size} px images into "
                            f"{out.shape[1]}x{out.shape[0]}: a transform of a fixed size (a crop "
                            f"or a pad to a number of pixels) does not follow augment.image_size"
                            f"{' and augment.sizes' if augment.sizes else ''}. Give it a size "
                            f"relative to the image (CropAndPad with a percent, "
                            f"RandomResizedCrop of size {augment.image_size}), or {remedy}")


def make_trainer(config: Config, spec: RunSpec,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Trainer:
    """The loop of one run with its parts built (dataset statistics kept beside its folder)."""
    parts = build_parts(config, spec, spec.part.dataset_stats)
    checkpoints = Checkpoints(spec.part, config.to_dict(), list(config.data.classes),
                              spec.inputs, config.train.average_best)
    size, n_classes = config.augment.image_size, len(config.data.classes)
    key = probe_key(parts, config.train, model=config.model.name, image_size=size,
                    stem=built_stem(config.model, size)[0], n_classes=n_classes)
    passes = micro_batch(parts, config.train, cache=spec.micro_batches, key=key, tag=spec.tag)
    remember = None if config.train.micro_batch != "auto" else \
        (lambda images: remember_pass(spec.micro_batches, key, images))
    # The task alone (config.task: data, model.head, train.epoch_rule), never ensemble.decode
    # nor the sample's header: every part of it is a training setting, in the fingerprint.
    return Trainer(config.train, parts, spec, checkpoints, config.task, micro_batch=passes,
                   remember_pass=remember, on_epoch=on_epoch)


def train_part(config: Config, spec: RunSpec, details: dict[str, Any], force: bool, *, what: str,
               stage: str = "train", before: Callable[[], None] | None = None) -> bool:
    """Train spec.part unless it is current; False when it was current (skipped).

    `what` names the part in a refusal ("tiny/resnet18 fold 0 (runs/...)"); `stage` is the
    manifest's stage name (train, or refit for the full-data refit); `before` runs once the part
    is to be trained, before FORCE=1 clears its folder (a preflight of the settings).
    """
    part = spec.part

    def work() -> bool:
        with tracked(config, spec) as tracker:  # tracking: mlflow|tensorboard (none: nothing)
            trainer = make_trainer(config, spec, on_epoch=lambda row: epoch_done(tracker, row))
            trainer.fit()
            if spec.valid_rows is not None:
                write_oof(trainer, config.data.classes)
            tracker.finish([part.log, part.confusion_csv, part.confusion_png, part.curves])
        return True

    current = (f"{part.dir}: refit is current (FORCE=1 retrains)" if part.is_refit else
               f"{spec.tag}: current ({part.dir}); FORCE=1 retrains")
    step = Step(stage, part.train_manifest, spec.inputs, details, part.trained_outputs, work,
                current, on_stale="refuse", what=what,
                remedy=stale_remedy("the refit" if part.is_refit else "the fold"),
                check=before, clear=part.dir, prepare=lambda: save_config(config, part.config))
    return bool(run_step(step, force))


def write_oof(trainer: Trainer, classes: list[str]) -> pd.DataFrame | None:
    """Predict the validation fold with the best checkpoint: oof.csv, the confusion matrix and
    the learning curves. Under torchrun every rank predicts its shard; rank 0 writes."""
    part, rows = trainer.spec.part, trainer.spec.valid_rows
    best = load_checkpoint(part.best)
    unwrap(trainer.parts.model).load_state_dict(best["model"])
    if trainer.parts.ema is not None:  # validation reads the EMA: give it best.pt's weights,
        trainer.parts.ema.module.load_state_dict(best["model"])  # not the last epoch's
    _, probs, grade = trainer.validate()
    if not np.isfinite(probs).all():
        raise diverged(str(part.best), trainer.train.lr)
    if not distributed.is_main():
        return None
    oof = probability_frame(rows.ids, probs, classes, rows.labels, grade=grade)
    plots.write_confusion(rows.targets, probs.argmax(1), classes, part.confusion_csv,
                          png_path=part.confusion_png)
    plots.write_curves(pd.read_csv(part.log), trainer.scorer.metric, part.curves)
    write_csv_atomic(oof, part.oof)
    return oof


def clear_parts(parts: list, force: bool) -> None:
    """FORCE=1 before parallel folds: clear their folders here, where their logs will live."""
    if force:
        for part in parts:
            if part.dir.exists():
                shutil.rmtree(part.dir)

