"""Train one model per fold.

    python -m pipeline train --data digits --model resnet18 [--folds 0,2] [--force] [train.epochs=3]
    make train MODEL=resnet18 [FOLDS=0,2] [EPOCHS=3] [FORCE=1] [NAME=my-run] [SEEDS=0,1,2]
    make train MODEL=resnet18 GPUS=4                 # each fold on 4 GPUs (torchrun, DDP)
    make train MODEL=resnet20 GPUS=0,1 PARALLEL=folds  # two folds at once, one per GPU

Writes runs/<competition>/<experiment>/fold<k>/: config.yaml, best.pt (by the competition metric),
last.pt (every epoch, with optimiser, scheduler, scaler and epoch), log.csv, oof.csv,
confusion.csv|png, curves.png and, last, train.manifest.json (provenance.py); then summary.csv|md
over the current folds. A fold whose manifest matches the inputs of now (fold assignment,
settings, training images) is skipped; one made from other inputs is refused, naming what changed
(FORCE=1 retrains it, NAME= keeps both); an interrupted one resumes from last.pt at the next epoch
when last.pt was made from the same inputs, and ends with the same weights as an uninterrupted run
(each epoch's randomness is derived from (seed, epoch), not carried over).
Under torchrun the same code runs on every rank; pipeline/distributed.py says who does what and
why the results do not depend on the number of GPUs (train.batch_size is the global batch).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch.utils.data import RandomSampler

from pipeline import distributed, plots
from pipeline.augment import Normalizer, build_transforms, compute_dataset_stats, resolve_normalization
from pipeline.cache import image_loader
from pipeline.config import Config, config_from_dict, save_config, training_settings
from pipeline.data import ImageDataset, SeededSampler, test_image_paths, train_image_paths
from pipeline.engine import (
    amp_dtype,
    autocast,
    clean_image_errors,
    load_checkpoint,
    loader_settings,
    make_loader,
    output_size,
    outputs_to_probs,
    predict_logits,
    progress,
    resolve_device,
    save_checkpoint,
    unwrap,
)
from pipeline.decode import decoded_score, decoder_kind
from pipeline.folds import read_folds
from pipeline.predict import probability_frame
from pipeline.pseudo import pseudo_fingerprint, read_pseudo
from pipeline.provenance import (Freshness, fingerprint, folds_fingerprint, freshness,
                                 images_fingerprint, input_changes, manifest_path, refuse_stale,
                                 write_manifest)
from pipeline.losses import balanced_sampler, build_loss, build_mixer, class_weights
from pipeline.metrics import higher_is_better, is_better, report_metrics, score
from pipeline.models import create_model, model_input_config, small_input_warning
from pipeline.models.finetune import freeze_body, param_groups, unfreeze
from pipeline.utils import (PipelineError, format_table, markdown_table, warn, write_csv_atomic,
                            write_text_atomic)

@dataclass
class Rows:
    """Labelled rows of one split: ids, labels as spelled, class indices."""
    ids: list[str]
    labels: list[str]
    targets: np.ndarray

    @classmethod
    def of(cls, frame: pd.DataFrame) -> Rows:
        return cls(frame["id"].tolist(), frame["label"].tolist(), frame["target"].to_numpy())


def epoch_seed(base: int, epoch: int) -> int:
    return int(np.random.SeedSequence([base, epoch, 7]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# Optimiser and schedule


def build_optimizer(config: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = config.train
    groups = param_groups(model, t.lr, t.body_lr_mult, t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr)
    return torch.optim.AdamW(groups, lr=t.lr)


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


def lr_factor(config: Config, steps_per_epoch: int, path: FoldPath | None = None):
    """Learning-rate multiplier per optimiser step: linear warm-up, then cosine/multistep/constant.

    With `path` (the refit), the steps walk the folds' schedule instead (see FoldPath).
    """
    t = config.train
    schedule_steps = path.steps_per_epoch if path else steps_per_epoch
    warmup = t.warmup_epochs * schedule_steps
    total = (path.epochs if path else t.epochs) * schedule_steps
    scale = (path.until * schedule_steps / (t.epochs * steps_per_epoch)) if path else 1.0

    def factor(step: int) -> float:
        step = step * scale
        if step < warmup:
            return (step + 1) / warmup
        if t.scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if t.scheduler == "multistep":
            epoch = step // schedule_steps
            return t.gamma ** sum(epoch >= m for m in t.milestones)
        return 1.0

    return factor


def steps_per_epoch(n_images: int, batch_size: int, max_batches: int | None) -> int:
    """Optimiser steps of one epoch, as FoldTrainer's loader makes them (drop_last when the data
    holds more than a batch: no size-1 batch for BatchNorm)."""
    steps = n_images // batch_size if n_images > batch_size else 1
    return steps if max_batches is None else min(steps, max_batches)


# --------------------------------------------------------------------------------------------
# One training run (a fold, or the full-data refit)


class FoldTrainer:
    """Trains one model on `train_rows`, validating on `valid_rows` (None for a full-data refit)."""

    def __init__(self, config: Config, out_dir: Path, train_rows: Rows, valid_rows: Rows | None,
                 seed: int, tag: str, inputs: dict[str, str] | None = None,
                 path: FoldPath | None = None,
                 pseudo: tuple[list[Path], np.ndarray] | None = None):
        self.config, self.out_dir, self.tag, self.seed = config, out_dir, tag, seed
        self.path = path  # the refit: the folds' learning-rate path to walk again
        # pseudo-labelled test images (paths, target distributions (N, C)): training part only
        self.pseudo = pseudo
        # The input fingerprints of this training (provenance.py): stored in last.pt, so a resume
        # goes on only from a checkpoint that the same inputs made.
        self.inputs = inputs or {}
        self.train_rows, self.valid_rows = train_rows, valid_rows
        # One process: train.device. Under torchrun: cuda:LOCAL_RANK (or the CPU).
        self.device = distributed.local_device(resolve_device(config.train.device))
        self.dtype = amp_dtype(self.device, config.train.amp)
        self.metric = config.data.metric
        self.positive = config.data.positive_index if len(config.data.classes) == 2 else 1
        # Epochs are chosen by the metric of the labels the submission will hold: after the
        # thresholds or cut-off the ensemble fits (pipeline/decode.py), not after argmax.
        self.decoder = decoder_kind(config.data, config.ensemble.decode)

    # ---- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        c, data = self.config, self.config.data
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)
        num_classes = len(data.classes)
        self.head = c.model.head
        self.model = create_model(c.model.name, output_size(self.head, num_classes),
                                  pretrained=c.model.pretrained,
                                  weights=c.model.weights, weights_dir=c.model.weights_dir,
                                  drop_rate=c.model.drop_rate, zero_init_last=c.model.zero_init_last,
                                  drop_path_rate=c.model.drop_path_rate, stem=c.model.stem)
        train_paths = train_image_paths(data, self.train_rows.ids)
        valid_ids = self.valid_rows.ids if self.valid_rows is not None else []
        # cache.enabled: every image decoded and shrunk once now, read back as arrays every epoch
        self.read_image = image_loader(c.cache, c.augment, train_paths + train_image_paths(
            data, valid_ids), desc=f"{self.tag} cache")
        train_targets = self.train_rows.targets
        if self.pseudo is not None:
            train_paths, train_targets = self._with_pseudo(train_paths, num_classes)
        self.train_set = ImageDataset(train_paths, train_targets,
                                      build_transforms(c.augment, train=True), self.read_image)
        self.mean, self.std = self._normalization(train_paths)
        on_cuda = self.device.type == "cuda"
        self.normalizer = Normalizer(self.mean, self.std, channels_last=on_cuda and c.train.channels_last)
        self.model.to(self.device)
        if on_cuda and c.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if on_cuda:
            torch.backends.cudnn.benchmark = True
        self.normalizer.to(self.device)

        self.settings = loader_settings(self.device, c.train.workers)
        # train.batch_size is the global batch; under torchrun each rank loads its share of it.
        self.batch_size = distributed.per_rank_batch(c.train.batch_size)
        self.generator = torch.Generator()
        if c.train.sampler == "balanced":
            classes_drawn = np.asarray(train_targets)
            if classes_drawn.ndim == 2:  # soft pseudo-labels: their most likely class
                classes_drawn = classes_drawn.argmax(axis=1)
            base = balanced_sampler(classes_drawn, self.generator)
        else:
            base = RandomSampler(self.train_set, generator=self.generator)
        drop_last = len(self.train_set) > c.train.batch_size  # no size-1 batch for BatchNorm
        # Under torchrun each rank takes its positions of the same order (distributed.RankOrder).
        self.sampler = SeededSampler(distributed.rank_order(base, drop_last), self.seed)
        self.train_loader = make_loader(self.train_set, self.batch_size, self.sampler,
                                        self.settings, drop_last=drop_last)
        self.valid_loader = None
        if self.valid_rows is not None:
            valid_paths = train_image_paths(data, self.valid_rows.ids)
            valid_set = ImageDataset(valid_paths, self.valid_rows.targets,
                                     build_transforms(c.augment, train=False), self.read_image)
            # Under torchrun each rank predicts a contiguous shard; validate() gathers them.
            shard = distributed.shard_sampler(len(valid_set))
            self.valid_loader = make_loader(valid_set, self.batch_size * 2, shard, self.settings)

        weights = class_weights(self.train_rows.targets, num_classes, c.train.class_weights,
                                c.train.effective_beta)
        loss_args = (c.train.loss, weights, c.train.label_smoothing, c.train.focal_gamma,
                     self.head, c.train.regression_loss, num_classes)
        self.criterion = build_loss(*loss_args).to(self.device)
        # The same loss on the CPU, for the validation logits (which come back as numpy).
        self.valid_criterion = build_loss(*loss_args)
        self.mixer = build_mixer(c.train, num_classes)
        self.optimizer = build_optimizer(c, self.model)
        batches = len(self.train_loader) if c.train.max_batches is None else min(
            len(self.train_loader), c.train.max_batches)
        # train.accumulate micro-batches per optimiser step (an effective batch of
        # batch_size * accumulate); the schedule counts optimiser steps
        steps = max(1, batches // c.train.accumulate)
        self.steps_per_epoch = steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_factor(c, steps, self.path))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.forward_model, self.eval_model = self._wrap_model(on_cuda)
        self.ema = None
        if c.train.ema:
            # validated, saved in best.pt and predicted with the averaged weights
            self.ema = ModelEmaV3(unwrap(self.model), decay=c.train.ema_decay, use_warmup=True)
            self.eval_model = self.ema.module
        self.optimizer_steps = 0
        self.top: list[tuple[float, int]] = []  # (signed score, epoch) of the kept best epochs

    def _with_pseudo(self, train_paths: list[Path], num_classes: int) -> tuple[list, np.ndarray]:
        """The training part plus the pseudo-labelled test images; every target becomes a
        distribution (N, C): the labelled rows one-hot (label smoothing applied here, as the
        soft-target loss does not), the pseudo rows as `make pseudo` wrote them."""
        paths, soft = self.pseudo
        smoothing = self.config.train.label_smoothing
        labelled = np.eye(num_classes, dtype=np.float32)[self.train_rows.targets]
        labelled = labelled * (1 - smoothing) + smoothing / num_classes
        print(f"{self.tag}: {len(paths)} pseudo-labelled test images join the training part")
        return train_paths + list(paths), np.concatenate([labelled, soft.astype(np.float32)])

    def _wrap_model(self, on_cuda: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(training forward, validation forward): the model itself, or compiled.

        Under torchrun training runs through DistributedDataParallel (which averages gradients) and
        validation through the bare model on each rank's own shard: DDP's forward may broadcast
        buffers, a collective that ranks with unequal shards would not all reach.
        """
        c = self.config.train
        compile_model = c.compile and on_cuda
        if not distributed.is_distributed():
            model = torch.compile(self.model) if compile_model else self.model
            return model, model
        ddp = distributed.wrap_ddp(self.model, self.device, c.sync_bn,
                                   find_unused=c.head_only_epochs > 0)  # a frozen body sits out
        self.model = ddp.module  # with SyncBatchNorm layers when train.sync_bn
        train = torch.compile(ddp) if compile_model else ddp
        return train, torch.compile(self.model) if compile_model else self.model

    def _normalization(self, train_paths) -> tuple[tuple, tuple]:
        stats = None
        if self.config.augment.normalize == "dataset":
            # Statistics of the resized training images, computed once per run and reused.
            plain = ImageDataset(train_paths, None, build_transforms(self.config.augment, False),
                                 self.read_image)
            stats = compute_dataset_stats(plain, self.out_dir.parent / "dataset_stats.json")
        return resolve_normalization(self.config.augment, model_input_config(self.model), stats)

    # ---- checkpoints ---------------------------------------------------------------------

    def evaluated_weights(self) -> dict[str, torch.Tensor]:
        """The weights validation saw (the EMA's when train.ema): what best.pt holds."""
        return (self.ema.module if self.ema is not None else unwrap(self.model)).state_dict()

    def _payload(self, epoch: int, **extra: Any) -> dict[str, Any]:
        return {"model": self.evaluated_weights(), "config": self.config.to_dict(),
                "epoch": epoch, "classes": list(self.config.data.classes),
                "normalization": {"mean": list(self.mean), "std": list(self.std)}, **extra}

    def save_last(self, epoch: int, best: float | None, best_epoch: int, finished: bool) -> None:
        np_state = np.random.get_state()
        payload = self._payload(
            epoch, optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), best_score=best, best_epoch=best_epoch,
            finished=finished, inputs=self.inputs,
            rng={"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].copy()),
                 "generator": self.generator.get_state()},
            optimizer_steps=self.optimizer_steps, top=self.top)
        payload["model"] = unwrap(self.model).state_dict()  # the raw weights: a resume trains on
        if self.ema is not None:
            payload["ema"] = self.ema.module.state_dict()
        save_checkpoint(payload, self.out_dir / "last.pt")

    def resume(self) -> tuple[int, float | None, int]:
        """Load last.pt if present: (next epoch, best score, best epoch)."""
        path = self.out_dir / "last.pt"
        if not path.is_file():
            return 0, None, -1
        checkpoint = load_checkpoint(path)
        # Rebuilt through the schema, so keys added since the checkpoint compare as defaults.
        saved = config_from_dict(checkpoint["config"]).to_dict()
        changed = input_changes(checkpoint.get("inputs", {}), self.inputs,
                                {"settings": training_settings(saved)},
                                {"settings": training_settings(self.config.to_dict())})
        if changed:
            raise PipelineError(f"{path} (an unfinished run) was made from other inputs: "
                                f"{'; '.join(changed)}. FORCE=1 restarts it, or undo the change "
                                f"to resume")
        unwrap(self.model).load_state_dict(checkpoint["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(checkpoint["ema"])
        self.optimizer_steps = int(checkpoint.get("optimizer_steps", 0))
        self.top = [tuple(item) for item in checkpoint.get("top", [])]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        print(f"{self.tag}: resuming after epoch {checkpoint['epoch'] + 1}")
        return checkpoint["epoch"] + 1, checkpoint["best_score"], checkpoint["best_epoch"]

    # ---- epochs --------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> float:
        c = self.config.train
        head_stage = epoch < c.head_only_epochs
        freeze_body(unwrap(self.model)) if head_stage else unfreeze(unwrap(self.model))
        self.forward_model.train()  # the DDP wrapper too, under torchrun
        # Everything random in this epoch derives from (seed, epoch): a resume replays it exactly.
        seed = epoch_seed(self.seed, epoch)
        # Dropout differs per rank (each has its own images); the order generator does not.
        torch.manual_seed(seed + distributed.rank())
        self.generator.manual_seed(seed)
        self.sampler.set_epoch(epoch)
        if self.mixer is not None:
            np.random.seed(seed % 2**32)  # timm's Mixup draws from numpy's global generator
        running = torch.zeros((), device=self.device)
        seen, start = 0, time.perf_counter()
        micro_batches = self.steps_per_epoch * c.accumulate  # an incomplete last step is dropped
        bar = progress(self.train_loader, f"{self.tag} epoch {epoch + 1}/{c.epochs}")
        with clean_image_errors():
            for step, (images, targets) in enumerate(bar):
                if step >= micro_batches:
                    break
                loss = self.train_step(images, targets, first=step % c.accumulate == 0,
                                       last=(step + 1) % c.accumulate == 0)
                running += loss.detach() * len(targets)
                seen += len(targets)
                if step % 20 == 0:  # the only device sync: the progress bar's numbers
                    rate = seen / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{float(running) / seen:.4f}", img_s=f"{rate:.0f}",
                                    refresh=False)
        bar.close()
        total, count = distributed.all_sum([float(running), seen])  # over every rank's images
        return total / max(count, 1)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, first: bool = True,
                   last: bool = True) -> torch.Tensor:
        """One micro-batch; the optimiser steps after the `last` of train.accumulate of them."""
        c = self.config.train
        images = self.normalizer(images.to(self.device, non_blocking=True))
        targets = targets.to(self.device, non_blocking=True)
        if self.mixer is not None and len(images) % 2 == 0:  # timm mixes a batch with its reverse
            images, targets = self.mixer(images, targets)  # targets: (B, C) soft
        if first:
            self.optimizer.zero_grad(set_to_none=True)
        # Under DDP the gradients are averaged across ranks only on the step's last micro-batch.
        sync = contextlib.nullcontext() if last or not hasattr(self.forward_model, "no_sync") \
            else self.forward_model.no_sync()
        with sync:
            with autocast(self.device, self.dtype):
                loss = self.criterion(self.forward_model(images).float(), targets)
            self.scaler.scale(loss / c.accumulate).backward()
        if not last:
            return loss
        if c.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.update(unwrap(self.model), step=self.optimizer_steps)
        return loss

    def validate(self) -> tuple[float, np.ndarray]:
        distributed.sync_buffers(self.model)  # under torchrun: rank 0's BN statistics, as saved
        shard = predict_logits(self.eval_model, self.normalizer, self.valid_loader, self.device,
                               self.dtype, desc=f"{self.tag} validate")
        logits = distributed.gather_shards(shard)  # (N, K) in valid_rows order, on every rank
        targets = torch.tensor(self.valid_rows.targets)
        with torch.no_grad():
            loss = float(self.valid_criterion(torch.as_tensor(logits), targets))
        return loss, outputs_to_probs(logits, self.head, len(self.config.data.classes))

    # ---- averaging the best epochs (train.average_best) ----------------------------------

    def keep_top(self, epoch: int, selection: tuple[str, float]) -> None:
        """Keep the weights of the train.average_best best epochs in top/epoch<e>.pt."""
        k = self.config.train.average_best
        if not k or not distributed.is_main():
            return
        name, value = selection
        sign = 1.0 if higher_is_better(name) else -1.0
        self.top.append((sign * value, epoch))
        self.top.sort(reverse=True)
        folder = self.out_dir / "top"
        if (sign * value, epoch) in self.top[:k]:
            save_checkpoint({"model": self.evaluated_weights()}, folder / f"epoch{epoch}.pt")
        for _, dropped in self.top[k:]:
            (folder / f"epoch{dropped}.pt").unlink(missing_ok=True)
        self.top = self.top[:k]

    def average_top(self, best_epoch: int) -> None:
        """best.pt = the mean of the kept epochs' weights (integer buffers from the best one)."""
        if not self.config.train.average_best or not self.top or not distributed.is_main():
            return
        epochs = [epoch for _, epoch in self.top]
        states = [load_checkpoint(self.out_dir / "top" / f"epoch{e}.pt")["model"] for e in epochs]
        averaged = {}
        for key, value in states[0].items():
            averaged[key] = (torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
                             if value.is_floating_point() else value)
        payload = self._payload(best_epoch, averaged_epochs=[e + 1 for e in sorted(epochs)])
        payload["model"] = averaged
        save_checkpoint(payload, self.out_dir / "best.pt")
        print(f"{self.tag}: best.pt = the mean weights of epochs {sorted(e + 1 for e in epochs)}")

    def selection(self, row: dict[str, Any]) -> tuple[str, float]:
        """(metric, value) that picks the best epoch: the competition metric, or the validation
        loss where the metric is undefined on this fold (ROC-AUC of a fold holding one class):
        a NaN never improves, and a fold without best.pt could never be predicted."""
        value = row.get("decoded", row[self.metric])
        if not np.isnan(value):
            return self.metric, value
        if not getattr(self, "_warned_undefined", False):
            warn(f"{self.tag}: {self.metric} is undefined on this validation fold (a class is "
                 f"missing from it): its best epoch is chosen by the validation loss")
            self._warned_undefined = True
        return "log_loss", row["valid_loss"]

    def fit(self) -> dict[str, Any]:
        c = self.config.train
        start_epoch, best, best_epoch = self.resume()
        log = read_log(self.out_dir / "log.csv", start_epoch)
        for epoch in range(start_epoch, c.epochs):
            started = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            row: dict[str, Any] = {"epoch": epoch + 1, "stage": "head" if epoch < c.head_only_epochs else "all",
                                   "train_loss": train_loss}
            improved = True
            if self.valid_loader is not None:
                valid_loss, probs = self.validate()
                metrics = report_metrics(self.metric, self.valid_rows.targets, probs,
                                         self.config.data.ordinal, self.positive)
                row["valid_loss"] = valid_loss
                row.update(metrics)
                if self.decoder != "argmax":  # the metric as the submission will decode it
                    row["decoded"] = decoded_score(self.decoder, self.metric,
                                                   self.valid_rows.targets, probs, self.positive)
                improved = is_better(*self.selection(row), best)
            # Every rank computed it from the same gathered predictions; rank 0's word makes it
            # one decision (best checkpoint, early stop) even if float rounding ever differed.
            improved = distributed.broadcast_from_main(improved)
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            row["seconds"] = round(time.perf_counter() - started, 2)
            writer = distributed.is_main()  # rank 0 writes; in one process: always
            if improved:
                best = self.selection(row)[1] if "valid_loss" in row else None
                best_epoch = epoch
                if writer:
                    save_checkpoint(self._payload(epoch, score=best, metric=self.metric),
                                    self.out_dir / "best.pt")
            if "valid_loss" in row:
                self.keep_top(epoch, self.selection(row))
            stop = (self.valid_loader is not None and c.early_stopping
                    and epoch - best_epoch >= c.early_stopping)
            finished = epoch == c.epochs - 1 or bool(stop)
            log.append(row)
            if writer:
                # The log before last.pt: a kill in between leaves a row that a resume drops
                # (read_log), never a checkpoint whose epoch the log lacks.
                write_csv_atomic(pd.DataFrame(log), self.out_dir / "log.csv")
                self.save_last(epoch, best, best_epoch, finished)
            distributed.barrier()  # the other ranks may read best.pt from here on
            print_epoch(self.tag, row, self.metric, improved)
            if stop:
                print(f"{self.tag}: early stop, no improvement for {c.early_stopping} epochs")
                break
        self.average_top(best_epoch)
        return {"best_score": best, "best_epoch": best_epoch + 1, "epochs": len(log),
                "seconds": round(sum(r["seconds"] for r in log), 1)}


def read_log(path: Path, next_epoch: int) -> list[dict[str, Any]]:
    """The log rows of the epochs already done (a resume drops rows past the checkpoint)."""
    if next_epoch == 0 or not path.is_file():
        return []
    frame = pd.read_csv(path)
    return frame[frame["epoch"] <= next_epoch].to_dict("records")


def print_epoch(tag: str, row: dict[str, Any], metric: str, improved: bool) -> None:
    parts = [f"{tag} epoch {row['epoch']:>3}", f"train {row['train_loss']:.4f}"]
    if "valid_loss" in row:
        parts.append(f"valid {row['valid_loss']:.4f}")
        parts += [f"{k} {row[k]:.4f}" for k in row if k not in
                  ("epoch", "stage", "train_loss", "valid_loss", "lr", "seconds")]
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
    print("  ".join(parts) + ("  *" if improved and "valid_loss" in row else ""), flush=True)


# --------------------------------------------------------------------------------------------
# Folds


def fold_dir(config: Config, fold: int) -> Path:
    return config.run_dir / (f"fold{fold}" if fold >= 0 else "full")


def training_inputs(config: Config, folds: pd.DataFrame) -> tuple[dict[str, str], dict[str, Any]]:
    """(input fingerprints, readable details) of every fold's training: the fold assignment, the
    result-changing settings and the training images (see provenance.py)."""
    data = config.data
    ids = folds["id"].tolist()
    settings = training_settings(config.to_dict())
    inputs = {"folds": folds_fingerprint(folds), "settings": fingerprint(settings),
              "train_images": images_fingerprint(ids, train_image_paths(data, ids))}
    pseudo = pseudo_fingerprint(config)
    if pseudo is not None:
        inputs["pseudo"] = pseudo
    return inputs, {"settings": settings}


def train_freshness(config: Config, fold: int, inputs: dict[str, str],
                    details: dict[str, Any]) -> Freshness:
    return freshness(manifest_path(fold_dir(config, fold), "train"), inputs, details)


def stale_remedy(config: Config, what: str) -> str:
    return (f"FORCE=1 retrains {what} under the new inputs (its old results are deleted); to keep "
            f"both, give the new settings a name of their own: NAME=<new name>, or a new "
            f"experiment file configs/<new name>.yaml")


def write_oof(trainer: FoldTrainer, out_dir: Path) -> pd.DataFrame | None:
    """Predict the validation fold with the best checkpoint.

    Under torchrun every rank loads best.pt and predicts its shard; rank 0 writes (others: None).
    """
    best = load_checkpoint(out_dir / "best.pt")
    unwrap(trainer.model).load_state_dict(best["model"])
    _, probs = trainer.validate()
    if not distributed.is_main():
        return None
    classes = trainer.config.data.classes
    rows = trainer.valid_rows
    oof = probability_frame(rows.ids, probs, classes, rows.labels, trainer.head)
    plots.write_confusion(rows.targets, probs.argmax(1), classes, out_dir)
    plots.write_curves(pd.read_csv(out_dir / "log.csv"), trainer.metric, out_dir / "curves.png")
    write_csv_atomic(oof, out_dir / "oof.csv")
    return oof


FOLD_OUTPUTS = ("best.pt", "log.csv", "oof.csv", "config.yaml")


def train_fold(config: Config, folds: pd.DataFrame, fold: int, inputs: dict[str, str],
               details: dict[str, Any], force: bool = False) -> None:
    """Train one fold unless it is current; its manifest is written last (the done mark)."""
    out_dir = fold_dir(config, fold)
    fresh = train_freshness(config, fold, inputs, details)
    if fresh.current and not force:
        print(f"fold {fold}: current ({out_dir}); FORCE=1 retrains")
        return
    if fresh.state == "stale" and not force:
        raise refuse_stale(f"{config.data.name}/{config.run_name} fold {fold} ({out_dir})", fresh,
                           stale_remedy(config, "the fold"))
    if distributed.is_main():
        if force and out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
    distributed.barrier()  # under torchrun: no rank looks for last.pt before a FORCE clean-up
    trainer = FoldTrainer(config, out_dir, Rows.of(folds[folds["fold"] != fold]),
                          Rows.of(folds[folds["fold"] == fold]), config.train.seed + fold,
                          f"fold {fold}", inputs, pseudo=pseudo_rows(config, f"fold{fold}"))
    trainer.setup()
    trainer.fit()
    write_oof(trainer, out_dir)
    if distributed.is_main():
        write_manifest(manifest_path(out_dir, "train"), "train", inputs,
                       [out_dir / name for name in FOLD_OUTPUTS],
                       {**details, "fold": fold, "train_rows": len(trainer.train_rows.ids),
                        "valid_rows": len(trainer.valid_rows.ids)})
    distributed.barrier()  # every rank reads the fold's files once rank 0 has written them


def pseudo_rows(config: Config, part: str) -> tuple[list[Path], np.ndarray] | None:
    """train.pseudo's test images and targets for `part` (fold<k> or full), or None."""
    if not config.train.pseudo:
        return None
    ids, targets = read_pseudo(config, part)
    return test_image_paths(config.data, ids), targets


def best_log_row(log: pd.DataFrame, metric: str) -> pd.Series:
    """The log row of the best epoch: by the metric as the submission decodes it (`decoded`),
    else the metric, or the validation loss where it is undefined on the fold (as
    FoldTrainer.selection chose it)."""
    column = "decoded" if "decoded" in log and log["decoded"].notna().any() else metric
    if column in log and log[column].notna().any():
        values = log[column]
        return log.loc[values.idxmax() if higher_is_better(metric) else values.idxmin()]
    return log.loc[log["valid_loss"].idxmin()]


def fold_result(config: Config, fold: int) -> dict[str, Any]:
    """A finished fold's numbers, read back from its files."""
    out_dir = fold_dir(config, fold)
    log = pd.read_csv(out_dir / "log.csv")
    oof = pd.read_csv(out_dir / "oof.csv", dtype={"id": str, "label": str}, keep_default_na=False)
    metric = config.data.metric
    best = best_log_row(log, metric)
    return {"fold": fold, "best_epoch": int(best["epoch"]), "epochs": len(log),
            metric: score(metric, _targets(config, oof), oof[config.data.classes].to_numpy(),
                          _positive(config)),
            "seconds": round(float(log["seconds"].sum()), 1)}


def _positive(config: Config) -> int:
    return config.data.positive_index if len(config.data.classes) == 2 else 1


def _targets(config: Config, frame: pd.DataFrame) -> np.ndarray:
    index = {c: i for i, c in enumerate(config.data.classes)}
    return frame["label"].map(index).to_numpy()


def current_folds(config: Config, folds: pd.DataFrame) -> list[int]:
    """The folds of the fold file whose training is current (the same inputs, files intact)."""
    inputs, details = training_inputs(config, folds)
    return [k for k in sorted(int(f) for f in folds["fold"].unique())
            if train_freshness(config, k, inputs, details).current]


def write_summary(config: Config, folds: pd.DataFrame) -> pd.DataFrame | None:
    """runs/<c>/<model>/summary.csv|md: per-fold scores, mean, std, and the OOF score of the
    current folds (a stale or missing fold is left out, and the count says so)."""
    metric, classes = config.data.metric, config.data.classes
    done = current_folds(config, folds)
    n_folds = folds["fold"].nunique()
    for path in (config.run_dir / "summary.csv", config.run_dir / "summary.md"):
        path.unlink(missing_ok=True)  # never a summary of folds that are no longer current
    if not done:
        return None
    results = pd.DataFrame([fold_result(config, k) for k in done])
    oof = pd.concat([pd.read_csv(config.run_dir / f"fold{k}" / "oof.csv", dtype={"id": str, "label": str},
                                 keep_default_na=False) for k in done])
    targets, probs = _targets(config, oof), oof[classes].to_numpy()
    overall = report_metrics(metric, targets, probs, config.data.ordinal, _positive(config))
    write_csv_atomic(results, config.run_dir / "summary.csv")
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(targets, probs.argmax(1), labels=range(len(classes)))
    table = [[r["fold"], r["best_epoch"], r["epochs"], r[metric], r["seconds"]]
             for r in results.to_dict("records")]
    headers = ["fold", "best epoch", "epochs", metric, "seconds"]
    partial = "" if len(done) == n_folds else f" (PARTIAL: {len(done)} of {n_folds} folds)"
    text = (f"# {config.run_name} on {config.data.name}{partial}\n\n" + markdown_table(table, headers) +
            f"\n\nmean {metric} {results[metric].mean():.4f} ± {results[metric].std(ddof=0):.4f} "
            f"over {len(done)} of {n_folds} fold(s)\n\nout-of-fold over {len(oof)} images: " +
            ", ".join(f"{k} {v:.4f}" for k, v in overall.items()) +
            "\n\n## Out-of-fold confusion matrix (rows: true, columns: predicted)\n\n" +
            markdown_table([[c, *row] for c, row in zip(classes, matrix.tolist())], ["", *classes]) + "\n")
    write_text_atomic(config.run_dir / "summary.md", text)
    print(format_table(table + [["mean", "", "", float(results[metric].mean()), ""],
                                ["oof", "", "", overall[metric], ""]], headers))
    print(f"{config.run_name}: out-of-fold {metric} {overall[metric]:.4f} over {len(oof)} images"
          f"{partial} -> {config.run_dir}/summary.md")
    return results


def select_folds(config: Config, folds_to_train: list[int] | None) -> tuple[pd.DataFrame, list[int]]:
    """The folds table and the folds to train, checked before any expensive work."""
    folds = read_folds(config)
    available = sorted(folds["fold"].unique())
    selected = folds_to_train if folds_to_train is not None else available
    unknown = sorted(set(selected) - set(available))
    if unknown:
        raise PipelineError(f"fold(s) {unknown} not in {config.folds_csv} (folds {available})")
    missing = [p for p in train_image_paths(config.data, folds["id"].tolist()) if not p.is_file()]
    if missing:
        raise PipelineError(f"{len(missing)} training image(s) missing, e.g. {missing[0]}; "
                            f"run `make check` to list them")
    return folds, [int(fold) for fold in selected]


def preflight(config: Config) -> None:
    """Build what training builds first (the model, its weights, the augmentations), so a wrong
    setting fails here, before FORCE=1 deletes anything or a fold starts."""
    create_model(config.model.name, output_size(config.model.head, len(config.data.classes)),
                 pretrained=config.model.pretrained, weights=config.model.weights,
                 weights_dir=config.model.weights_dir, drop_rate=config.model.drop_rate,
                 zero_init_last=config.model.zero_init_last,
                 drop_path_rate=config.model.drop_path_rate, stem=config.model.stem)
    small = small_input_warning(config.model.name, config.augment.image_size,
                                stem=config.model.stem)
    if small and distributed.is_main():
        warn(small)
    build_transforms(config.augment, train=True)
    build_transforms(config.augment, train=False)
    if config.train.pseudo and (config.train.mixup or config.train.cutmix):
        raise PipelineError("train.pseudo with mixup/cutmix: timm's Mixup mixes class indices, "
                            "and pseudo-labels are distributions; turn one of them off")
    pseudo_fingerprint(config)  # a named pseudo-label set must exist
    distributed.per_rank_batch(config.train.batch_size)  # a batch the ranks cannot share: now


def plan_folds(config: Config, folds: pd.DataFrame, selected: list[int], force: bool,
               inputs: dict[str, str], details: dict[str, Any]) -> list[int]:
    """The folds to train now; stale folds refused (all of them named) before any work starts."""
    todo, stale = [], []
    for fold in selected:
        fresh = train_freshness(config, fold, inputs, details)
        if fresh.current and not force:
            print(f"fold {fold}: current ({fold_dir(config, fold)}); FORCE=1 retrains")
        elif fresh.state == "stale" and not force:
            stale.append((fold, fresh))
        else:
            todo.append(fold)
    if stale:
        lines = "\n  ".join(f"fold {k}: {fresh.why()}" for k, fresh in stale)
        raise PipelineError(f"{config.data.name}/{config.run_name} ({config.run_dir}) was trained "
                            f"from other inputs:\n  {lines}\n" + stale_remedy(config, "these folds"))
    return todo


def start_experiment(config: Config) -> None:
    """runs/<c>/<exp>/config.yaml: the experiment's resolved settings, read by `runs`/`ensemble`."""
    if distributed.is_main():
        save_config(config, config.run_dir / "config.yaml")


def prepare_training(config: Config, folds_to_train: list[int] | None,
                     force: bool) -> tuple[pd.DataFrame, dict, dict, list[int]]:
    """(folds, inputs, details, folds to train): everything checked and the experiment's
    settings saved before any fold starts or FORCE=1 deletes anything."""
    folds, selected = select_folds(config, folds_to_train)
    inputs, details = training_inputs(config, folds)
    todo = plan_folds(config, folds, selected, force, inputs, details)
    if todo:
        preflight(config)
        start_experiment(config)
    return folds, inputs, details, todo


def run_training(config: Config, folds_to_train: list[int] | None, force: bool) -> pd.DataFrame | None:
    """Train the folds one after another (each over every rank when started by torchrun)."""
    folds, inputs, details, todo = prepare_training(config, folds_to_train, force)
    for fold in todo:
        train_fold(config, folds, fold, inputs, details, force)
    return write_summary(config, folds) if distributed.is_main() else None


def run_parallel_folds(config: Config, folds_to_train: list[int] | None, force: bool,
                       gpus: str | None, command: list[str]) -> pd.DataFrame | None:
    """Train the folds side by side: one single-process run per fold, at most one per GPU.

    `command` is the `python -m pipeline train ...` of one fold without `--folds`; each child gets
    `--folds k` and writes what a sequential run writes, its output going to fold<k>/train.log.
    The summary is written once every fold has finished; a failed fold is an error naming it.
    """
    if distributed.launched_world_size() > 1:
        raise PipelineError("--parallel folds starts its own processes, one per GPU: run it with "
                            "python, not torchrun (make train PARALLEL=folds GPUS=0,1)")
    if config.train.device not in ("auto", "cuda", "cpu"):
        raise PipelineError(f"train.device={config.train.device} with --parallel folds: each fold "
                            f"sees only its own GPU (as cuda:0); leave train.device=auto")
    slots = distributed.gpu_slots(gpus)
    folds, _, _, todo = prepare_training(config, folds_to_train, force)
    jobs = []
    for fold in todo:
        out_dir = fold_dir(config, fold)
        if force and out_dir.exists():
            shutil.rmtree(out_dir)  # here, not in the child: the child's log lives in out_dir
        jobs.append(distributed.Job(f"fold {fold}", [*command, "--folds", str(fold)],
                                    out_dir / "train.log"))
    failed = distributed.run_jobs(jobs, slots)
    if failed:
        names = ", ".join(f"{name} (exit {code})" for name, code in failed.items())
        raise PipelineError(f"{names} failed; see {config.run_dir}/fold<k>/train.log, fix the "
                            f"cause and re-run: finished folds are skipped")
    return write_summary(config, folds)


def fold_command(args, run_name: str) -> list[str]:
    """The single-process `python -m pipeline train` that one fold of --parallel folds runs."""
    return [sys.executable, "-m", "pipeline", "train", "--data", args.data, "--model", args.model,
            "--name", run_name, *args.overrides]


def seed_configs(args) -> list[Config]:
    """One config per seed of --seeds 0,1,2 (each a run of its own: <experiment>-seed<s>), or the
    one config of the command line."""
    from pipeline.config import load_config

    seeds = getattr(args, "seeds", None)
    name = getattr(args, "name", None)
    if not seeds:
        return [load_config(args.data, args.model, args.overrides, name=name)]
    if name is not None:
        raise PipelineError("NAME= names one run; with SEEDS= each seed's run is named "
                            "<experiment>-seed<s>")
    return [load_config(args.data, args.model, [*args.overrides, f"train.seed={seed}"])
            for seed in seeds]


def main(args) -> None:
    if args.model is None:
        raise PipelineError("train needs a model: make train MODEL=resnet18")
    configs = seed_configs(args)
    parallel, gpus = getattr(args, "parallel", None), getattr(args, "gpus", None)
    if gpus and parallel != "folds":
        raise PipelineError("--gpus goes with --parallel folds; to train each fold on several GPUs "
                            "launch with torchrun: make train GPUS=4 (see pipeline/distributed.py)")
    for config in configs:
        if len(configs) > 1:
            print(f"== {config.run_name} (train.seed={config.train.seed})", flush=True)
        if parallel == "folds":
            seed_args = [f"train.seed={config.train.seed}"] if len(configs) > 1 else []
            command = fold_command(args, config.run_name) + seed_args
            run_parallel_folds(config, args.folds, args.force, gpus, command)
            continue
        with distributed.session(resolve_device(config.train.device)):
            run_training(config, args.folds, args.force)
