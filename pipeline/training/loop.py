"""The training loop of one run: epochs of optimiser steps, validation, the best epoch.

`Trainer.fit` reads top to bottom: resume, then per epoch train, validate, choose, save, log.
Everything random in an epoch derives from (seed, epoch), not from the state the previous epoch
left, so a run resumed from last.pt ends with the same weights as an uninterrupted one. Under
torchrun the same loop runs on every rank; rank 0 alone writes (pipeline/base/distributed.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.base import distributed
from pipeline.base.config import OPTIMIZER_DEFAULTS, TrainConfig
from pipeline.base.task import EpochRule, Head, Task
from pipeline.base.utils import PipelineError, WriteError, warn, write_csv_atomic
from pipeline.ensembling.decode import cross_fitted_score, grade_to_probs
from pipeline.inference.engine import (
    clean_image_errors,
    predict_logits,
    progress,
    split_outputs,
    unwrap,
)
from pipeline.models.finetune import freeze_body, unfreeze
from pipeline.training.checkpoints import Checkpoints, LoopState
from pipeline.training.fitting import (
    backward_in_passes,
    out_of_memory,
    pass_after_out_of_memory,
)
from pipeline.training.parts import Parts, RunSpec

# Epochs in a row that a fold may predict a single class before training says so: the first
# epochs of an imbalanced competition often do (the majority class), a collapse goes on
COLLAPSE_EPOCHS = 3


def epoch_seed(base: int, epoch: int) -> int:
    return int(np.random.SeedSequence([base, epoch, 7]).generate_state(1)[0])


def start_epoch(parts: Parts, seed: int, epoch: int) -> None:
    """The model in training mode and every generator of `epoch` seeded from (seed, epoch)
    alone, so that a resume replays the epoch exactly."""
    parts.forward_model.train()  # the DDP wrapper too, under torchrun
    seed = epoch_seed(seed, epoch)
    # Dropout differs per rank (each has its own images); the order generator does not.
    torch.manual_seed(seed + distributed.rank())
    parts.generator.manual_seed(seed)
    parts.sampler.set_epoch(epoch)
    if parts.mixer is not None:
        np.random.seed(seed % 2**32)  # timm's Mixup draws from numpy's global generator


def diverged(where: str, lr: float) -> PipelineError:
    """The error of a run whose outputs became NaN or inf: the remedy is a gentler start."""
    return PipelineError(f"{where}: the model's outputs are not numbers (NaN or inf) on the "
                         f"validation fold: training diverged. Lower train.lr (now {lr:g}) or "
                         f"raise train.warmup_epochs, and retrain with FORCE=1")


class Trainer:
    """Trains one model (a fold, or the full-data refit) with the parts built for it."""

    def __init__(self, train: TrainConfig, parts: Parts, spec: RunSpec,
                 checkpoints: Checkpoints, task: Task, micro_batch: int | None = None,
                 remember_pass: Callable[[int], None] | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None):
        self.train, self.parts, self.spec = train, parts, spec
        self.on_epoch = on_epoch  # each finished epoch's log row (tracking.py), once written
        self.micro_batch = micro_batch  # images a pass (fitting.py); None: the whole batch
        self.remember_pass = remember_pass  # keeps a pass halved after out-of-memory (auto)
        # The task alone says how an epoch is scored and chosen (task.epoch_rule): never
        # ensemble.decode nor the sample submission, which are no training settings.
        self.checkpoints, self.task = checkpoints, task
        self.scorer, self.head = task, task.head  # a Task is a Scorer
        self.state = LoopState()
        self.saved_epoch = -1  # the last epoch whose last.pt was written (a resume goes on after)
        self.selection = EpochSelection(spec.tag, task)
        self.collapse = CollapseWatch(spec.tag, task, train)

    def fit(self) -> dict[str, Any]:
        c = self.train
        log = self.rewind()
        epoch = self.state.epoch
        while epoch < c.epochs:
            state, started = self.state, time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch + 1,
                                   "stage": "head" if epoch < c.head_only_epochs else "all",
                                   **self.parts.sized_loaders.log_fields(epoch)}
            try:
                row["train_loss"] = self.train_epoch(epoch)
            except RuntimeError as err:  # torch.OutOfMemoryError is one
                if not out_of_memory(err):
                    raise  # handled below: the error's tensors are freed once this block ends
            if "train_loss" not in row:
                log, epoch = self.after_out_of_memory(epoch), self.state.epoch
                continue
            improved = True  # the refit (nothing to validate): every epoch is the newest best
            if self.parts.valid_loader is not None:
                row.update(self.validation_row(epoch))
                if not np.isfinite(row["valid_loss"]):  # no epoch after it can recover
                    raise diverged(f"{self.spec.tag} epoch {epoch + 1}", c.lr)
                metric, value = self.selection(row)
                improved = self.scorer.is_better(value, state.best, metric)
                row["best"] = improved  # best_log_row reads the chosen epoch back from the log
            # Every rank computed it from the same gathered predictions; rank 0's word makes it
            # one decision (best checkpoint, early stop) even if float rounding ever differed.
            improved = distributed.broadcast_from_main(improved)
            row["lr"] = self.parts.optimizer.param_groups[0]["lr"]
            row["seconds"] = round(time.perf_counter() - started, 2)
            self.keep(epoch, row, improved)
            stop = bool(self.parts.valid_loader is not None and c.early_stopping
                        and epoch - state.best_epoch >= c.early_stopping)
            log.append(row)
            self.write(log, epoch, finished=epoch == c.epochs - 1 or stop)
            print_epoch(self.spec.tag, row, self.scorer.metric, improved)
            if self.on_epoch is not None:
                self.on_epoch(row)
            if stop:
                print(f"{self.spec.tag}: early stop, no improvement for {c.early_stopping} epochs")
                break
            epoch += 1
        state = self.state
        self.checkpoints.average_top(self.parts, state, self.spec.tag)
        distributed.barrier()  # every rank reads best.pt (the averaged one) from here on
        return {"best_score": state.best, "best_epoch": state.best_epoch + 1, "epochs": len(log),
                "seconds": round(sum(r["seconds"] for r in log), 1)}

    def rewind(self) -> list[dict[str, Any]]:
        """Go on from last.pt (a new run writes one first, so an out-of-memory error in its
        first epoch has weights to go back to): the loop's state and the log up to it."""
        if not self.checkpoints.resumable():
            with saving(self.spec, self.saved_epoch, 0):
                self.checkpoints.save_start(self.parts)
        self.state = self.checkpoints.resume(self.parts, self.spec.tag)
        self.state.micro_batch = smaller_pass(self.micro_batch, self.state.micro_batch)
        self.saved_epoch = self.state.epoch - 1
        return read_log(self.spec.part.log, self.state.epoch)

    def after_out_of_memory(self, epoch: int) -> list[dict[str, Any]]:
        """A training pass ran out of GPU memory: halve the pass and go on from last.pt with
        the same batches and optimiser steps (fitting.py; under torchrun it stops)."""
        self.parts.optimizer.zero_grad(set_to_none=True)
        self.micro_batch = pass_after_out_of_memory(
            self.state.micro_batch, distributed.per_rank_batch(self.train.batch_size),
            f"{self.spec.tag} epoch {epoch + 1}", self.spec.part.last)
        if self.remember_pass is not None:  # the next fold starts at it
            self.remember_pass(self.micro_batch)
        return self.rewind()

    # ---- one epoch -----------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> float:
        c, parts = self.train, self.parts
        model = unwrap(parts.model)
        freeze_body(model) if epoch < c.head_only_epochs else unfreeze(model)
        start_epoch(parts, self.spec.seed, epoch)
        running = torch.zeros((), device=parts.device)
        seen, start = 0, time.perf_counter()
        micro_batches = parts.steps_per_epoch * c.accumulate  # an incomplete last step is dropped
        bar = progress(parts.sized_loaders.at(epoch),
                       f"{self.spec.tag} epoch {epoch + 1}/{c.epochs}")
        with clean_image_errors(), contextlib.closing(bar):
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
        total, count = distributed.all_sum([float(running), seen])  # over every rank's images
        return total / max(count, 1)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, first: bool = True,
                   last: bool = True) -> torch.Tensor:
        """One loaded batch, its mean loss; the optimiser steps after the `last` of
        train.accumulate of them. The batch goes through the model in passes of at most
        state.micro_batch images (fitting.py), each pass's loss weighted by its share."""
        c, parts = self.train, self.parts
        images = parts.normalizer(images.to(parts.device, non_blocking=True))
        targets = targets.to(parts.device, non_blocking=True)
        if parts.mixer is not None and len(images) % 2 == 0:  # timm mixes a batch with its reverse
            images, targets = parts.mixer(images, targets)  # targets: (B, C) soft
        if first:
            parts.optimizer.zero_grad(set_to_none=True)
        mean = backward_in_passes(parts, images, targets, self.state.micro_batch,
                                  scale=1 / c.accumulate, last=last)
        if last:
            self.optimizer_step()
        return mean

    def optimizer_step(self) -> None:
        parts = self.parts
        if self.train.grad_clip:
            parts.scaler.unscale_(parts.optimizer)
            torch.nn.utils.clip_grad_norm_(parts.model.parameters(), self.train.grad_clip)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.scheduler.step()
        self.state.optimizer_steps += 1
        if parts.ema is not None:
            parts.ema.update(unwrap(parts.model), step=self.state.optimizer_steps)

    # ---- validation and the best epoch ---------------------------------------------------

    def validate(self) -> tuple[float, np.ndarray, np.ndarray | None]:
        """(validation loss, probabilities (N, C), grades (N,) or None), in the validation
        rows' order."""
        parts = self.parts
        distributed.sync_buffers(parts.model)  # under torchrun: rank 0's BN statistics, as saved
        passes = 2 * self.state.micro_batch if self.state.micro_batch else None  # no gradients
        shard = predict_logits(parts.eval_model, parts.normalizer, parts.valid_loader, parts.device,
                               dtype=parts.dtype, desc=f"{self.spec.tag} validate", max_images=passes)
        logits = distributed.gather_shards(shard)  # (N, K) in valid_rows order, on every rank
        targets = torch.tensor(self.spec.valid_rows.targets)
        with torch.no_grad():
            loss = float(parts.valid_criterion(torch.as_tensor(logits), targets))
        return (loss, *split_outputs(logits, self.head, self.scorer.n_classes))

    def validation_row(self, epoch: int) -> dict[str, float]:
        """The epoch's validation numbers: loss, the metrics, and `selection`, the value the
        task's epoch rule scores (selection_value)."""
        loss, probs, grade = self.validate()
        targets = self.spec.valid_rows.targets
        self.collapse.see(epoch, probs.argmax(axis=1))
        row = {"valid_loss": loss, **self.scorer.report(targets, probs)}
        views = output_views(probs, grade, self.task)
        if self.head is Head.BOTH:  # the grade output's own metric, beside the classes'
            row[f"grade_{self.scorer.metric}"] = self.scorer.score(targets, views[1])
        row["selection"] = selection_value(self.task, targets, views, loss)
        return row

    def keep(self, epoch: int, row: dict[str, Any], improved: bool) -> None:
        """best.pt when the epoch improved; the top-k weights (train.average_best)."""
        state, validated = self.state, "valid_loss" in row
        if improved:
            state.best = self.selection(row)[1] if validated else None
            state.best_epoch = epoch
            if distributed.is_main():
                with saving(self.spec, self.saved_epoch, epoch):
                    self.checkpoints.save_best(self.parts, epoch, state.best, self.scorer.metric)
        if validated:
            self.checkpoints.keep_top(self.parts, state, epoch, self.selection(row))

    def write(self, log: list[dict[str, Any]], epoch: int, finished: bool) -> None:
        if distributed.is_main():  # rank 0 writes; in one process: always
            # The log before last.pt: a kill in between leaves a row that a resume drops
            # (read_log), never a checkpoint whose epoch the log lacks.
            with saving(self.spec, self.saved_epoch, epoch):
                write_csv_atomic(pd.DataFrame(log), self.spec.part.log)
                self.checkpoints.save_last(self.parts, self.state, epoch, finished)
            self.saved_epoch = epoch
        distributed.barrier()  # the other ranks may read best.pt from here on


@contextlib.contextmanager
def saving(spec: RunSpec, saved_epoch: int, epoch: int):
    """A failed write (a full disk) says what it left: the last good checkpoint to resume
    (`saved_epoch`: the last epoch last.pt holds, -1 for none)."""
    try:
        yield
    except WriteError as err:
        if saved_epoch >= 0:
            left = (f"{spec.part.last} still holds epoch {saved_epoch + 1}: free the space and "
                    f"run the same command again to resume from it")
        else:
            left = "no epoch of it was saved yet: free the space and run the command again"
        raise WriteError(f"{err}\n{spec.tag}: training stopped in epoch {epoch + 1}; {left}") \
            from None


class EpochSelection:
    """(metric, value) that picks the best epoch from a log row: the task's rule (`selection`),
    or the validation loss where the metric is undefined on this fold (ROC-AUC of a fold holding
    one class): a NaN never improves, and a fold without best.pt could never be predicted. The
    metric "log_loss" stands for any lower-is-better value (the loss rule)."""

    def __init__(self, tag: str, task: Task):
        self.tag, self.task = tag, task
        self.warned_undefined = False

    def __call__(self, row: dict[str, Any]) -> tuple[str, float]:
        value = row["selection"]
        if self.task.epoch_rule is EpochRule.LOSS:
            return "log_loss", value
        if not np.isnan(value):
            return self.task.metric, value
        if not self.warned_undefined:
            warn(f"{self.tag}: {self.task.metric} is undefined on this validation fold (a class "
                 f"is missing from it): its best epoch is chosen by the validation loss")
            self.warned_undefined = True
        return "log_loss", row["valid_loss"]


def output_views(probs: np.ndarray, grade: np.ndarray | None, task: Task) -> list[np.ndarray]:
    """The model's outputs as probabilities (N, C): the classes', and for Head.BOTH the grade's
    too (a regression head's probabilities are its grade's already: split_outputs)."""
    if task.head is Head.BOTH:
        return [probs, grade_to_probs(grade, task.n_classes)]
    return [probs]


def selection_value(task: Task, targets: np.ndarray, views: list[np.ndarray],
                    loss: float) -> float:
    """What task.epoch_rule scores for one epoch's validation predictions (`views`: output_views).

    METRIC: the competition metric of a fixed decoding (argmax; a grade's two-point probabilities
    argmax to the rounded grade); CROSS_FIT: the metric after the competition's label decoder,
    fitted on one half of the fold and scored on the other (decode.cross_fitted_score); LOSS: the
    validation loss. Of several views the better (the ensemble may choose either view,
    combine.choose_views); nothing is fitted on the rows it scores."""
    if task.epoch_rule is EpochRule.LOSS:
        return loss
    if task.epoch_rule is EpochRule.CROSS_FIT:
        scores = [cross_fitted_score(task.label_decoder, task.metric, targets, v, positive=task.positive)
                  for v in views]
    else:
        scores = [task.score(targets, v) for v in views]
    return max(scores) if task.higher_is_better else min(scores)


class CollapseWatch:
    """Says so, once, when a fold has predicted a single class for COLLAPSE_EPOCHS epochs in a
    row (the majority class, typically: the learning rate threw the model off)."""

    def __init__(self, tag: str, scorer: Task, train: TrainConfig):
        self.tag, self.scorer = tag, scorer
        self.remedy = (f"lower train.lr (now {train.lr:g}) or raise train.warmup_epochs (now "
                       f"{train.warmup_epochs})")
        if train.optimizer != "adamw":  # spelt out: a file's lr would stay with AdamW otherwise
            adamw = OPTIMIZER_DEFAULTS["adamw"]
            self.remedy += (f", or try train.optimizer=adamw train.lr={adamw['lr']:g} "
                            f"train.weight_decay={adamw['weight_decay']:g}")
        self.since: tuple[int, int] | None = None  # (first epoch, class) of the one-class run
        self.warned = False

    def see(self, epoch: int, predicted: np.ndarray) -> None:
        if len(np.unique(predicted)) > 1:
            self.since = None
            return
        if self.since is None or self.since[1] != predicted[0]:
            self.since = (epoch, int(predicted[0]))
        first, index = self.since
        if epoch - first + 1 >= COLLAPSE_EPOCHS and not self.warned:
            what = "grade" if self.scorer.ordinal else "class"
            warn(f"{self.tag}: predicts only {what} {self.scorer.classes[index]} since epoch "
                 f"{first + 1}: {self.remedy}; training goes on")
            self.warned = True


def smaller_pass(a: int | None, b: int | None) -> int | None:
    """The smaller of two passes' images (None: the whole batch, larger than any)."""
    return min((n for n in (a, b) if n), default=None)


def training_batches(trainer: Trainer, count: int):
    """`count` loaded training batches at augment.image_size, in the order of the run's epochs
    0, 1, ... (as many as a probe or sweep needs: each epoch started as training starts it)."""
    given = 0
    for epoch in range(count):
        start_epoch(trainer.parts, trainer.spec.seed, epoch)
        for batch in trainer.parts.train_loader:
            yield batch
            given += 1
            if given == count:
                return


def read_log(path: Path, next_epoch: int) -> list[dict[str, Any]]:
    """The log rows of the epochs already done (a resume drops rows past the checkpoint)."""
    if next_epoch == 0 or not path.is_file():
        return []
    frame = pd.read_csv(path)
    return frame[frame["epoch"] <= next_epoch].to_dict("records")


def print_epoch(tag: str, row: dict[str, Any], metric: str, improved: bool) -> None:
    parts = [f"{tag} epoch {row['epoch']:>3}", f"train {row['train_loss']:.4f}"]
    if "size" in row:  # augment.sizes
        parts.append(f"{row['size']} px")
    if "valid_loss" in row:
        parts.append(f"valid {row['valid_loss']:.4f}")
        parts += [f"{k} {row[k]:.4f}" for k in row if k not in
                  ("epoch", "stage", "size", "train_loss", "valid_loss", "lr", "seconds", "best")]
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
    print("  ".join(parts) + ("  *" if improved and "valid_loss" in row else ""), flush=True)
