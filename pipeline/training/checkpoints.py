"""A run's checkpoints: best.pt, last.pt, the top-k epochs, and the resume from last.pt.

    best.pt   the weights validation chose (the EMA's when train.ema), the resolved config, the
              classes and the normalisation: everything prediction needs
    last.pt   written before the first epoch (epoch -1: the initial weights) and after every
              epoch: the raw weights (and the EMA's), optimiser, scheduler, scaler, RNG
              states, the input fingerprints it was made from, the loop's counters
    top/epoch<e>.pt   train.average_best: the weights of the k best epochs, averaged into best.pt

Our own rather than timm's CheckpointSaver: every file here is written to a temporary name and
renamed (a kill never leaves half a checkpoint), loads with `weights_only=True` (no pickled
argparse namespace), and last.pt carries the input fingerprints a resume is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.base import distributed
from pipeline.base.config import config_from_dict, training_settings
from pipeline.base.metrics import higher_is_better
from pipeline.base.utils import PipelineError
from pipeline.experiments.freshness import input_changes
from pipeline.experiments.layout import Part
from pipeline.inference.engine import load_checkpoint, save_checkpoint, unwrap
from pipeline.training.parts import Parts


@dataclass
class LoopState:
    """The loop's counters, saved in last.pt: where a resume goes on."""

    epoch: int = 0  # the next epoch to train (0-based)
    best: float | None = None  # the selection value of the best epoch so far
    best_epoch: int = -1
    optimizer_steps: int = 0  # EMA warm-up counts optimiser steps
    top: list[tuple[float, int]] = field(default_factory=list)  # (signed score, epoch), kept
    micro_batch: int | None = None  # images a pass after an out-of-memory error (fitting.py)


class Checkpoints:
    """The checkpoint files of one part, and what goes into them."""

    def __init__(self, part: Part, config: dict[str, Any], classes: list[str],
                 inputs: dict[str, str], average_best: int):
        self.part, self.config, self.classes = part, config, classes
        self.inputs = inputs  # stored in last.pt: a resume goes on only from the same inputs
        self.average_best = average_best

    def _payload(self, parts: Parts, epoch: int, **extra: Any) -> dict[str, Any]:
        mean, std = parts.normalization
        return {"model": evaluated_weights(parts), "config": self.config, "epoch": epoch,
                "classes": list(self.classes),
                "normalization": {"mean": list(mean), "std": list(std)}, **extra}

    def save_best(self, parts: Parts, epoch: int, score: float | None, metric: str) -> None:
        save_checkpoint(self._payload(parts, epoch, score=score, metric=metric), self.part.best)

    def save_last(self, parts: Parts, state: LoopState, epoch: int, finished: bool) -> None:
        """last.pt after `epoch` (0-based): a resume goes on at epoch + 1."""
        np_state = np.random.get_state()
        payload = self._payload(
            parts, epoch, optimizer=parts.optimizer.state_dict(),
            scheduler=parts.scheduler.state_dict(), scaler=parts.scaler.state_dict(),
            best_score=state.best, best_epoch=state.best_epoch, finished=finished,
            inputs=self.inputs,
            rng={"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].copy()),
                 "generator": parts.generator.get_state()},
            optimizer_steps=state.optimizer_steps, top=state.top, micro_batch=state.micro_batch)
        payload["model"] = unwrap(parts.model).state_dict()  # the raw weights: a resume trains on
        if parts.ema is not None:
            payload["ema"] = parts.ema.module.state_dict()
        save_checkpoint(payload, self.part.last)

    def save_start(self, parts: Parts) -> None:
        """last.pt before the first epoch (epoch -1): the initial weights to go back to."""
        if distributed.is_main():
            self.save_last(parts, LoopState(), -1, finished=False)
        distributed.barrier()

    def resumable(self) -> bool:
        return self.part.last.is_file()

    def resume(self, parts: Parts, tag: str) -> LoopState:
        """Load last.pt if present, refusing one made from other inputs; the state to go on from."""
        if not self.part.last.is_file():
            return LoopState()
        checkpoint = load_checkpoint(self.part.last)
        # Rebuilt through the schema, so keys added since the checkpoint compare as defaults.
        saved = config_from_dict(checkpoint["config"]).to_dict()
        changed = input_changes(checkpoint.get("inputs", {}), self.inputs,
                                {"settings": training_settings(saved)},
                                {"settings": training_settings(self.config)})
        if changed:
            raise PipelineError(f"{self.part.last} (an unfinished run) was made from other "
                                f"inputs: {'; '.join(changed)}. FORCE=1 restarts it, or undo "
                                f"the change to resume")
        unwrap(parts.model).load_state_dict(checkpoint["model"])
        if parts.ema is not None:
            parts.ema.module.load_state_dict(checkpoint["ema"])
        parts.optimizer.load_state_dict(checkpoint["optimizer"])
        parts.scheduler.load_state_dict(checkpoint["scheduler"])
        parts.scaler.load_state_dict(checkpoint["scaler"])
        if checkpoint["epoch"] >= 0:
            print(f"{tag}: resuming after epoch {checkpoint['epoch'] + 1}")
        return LoopState(checkpoint["epoch"] + 1, checkpoint["best_score"],
                         checkpoint["best_epoch"], int(checkpoint.get("optimizer_steps", 0)),
                         [tuple(item) for item in checkpoint.get("top", [])],
                         checkpoint.get("micro_batch"))

    # ---- averaging the best epochs (train.average_best) ----------------------------------

    def keep_top(self, parts: Parts, state: LoopState, epoch: int,
                 selection: tuple[str, float]) -> None:
        """Keep the weights of the train.average_best best epochs in top/epoch<e>.pt."""
        k = self.average_best
        if not k or not distributed.is_main():
            return
        name, value = selection
        sign = 1.0 if higher_is_better(name) else -1.0
        state.top.append((sign * value, epoch))
        state.top.sort(reverse=True)
        if (sign * value, epoch) in state.top[:k]:
            save_checkpoint({"model": evaluated_weights(parts)}, self.part.top(epoch))
        for _, dropped in state.top[k:]:
            self.part.top(dropped).unlink(missing_ok=True)
        state.top = state.top[:k]

    def average_top(self, parts: Parts, state: LoopState, tag: str) -> None:
        """best.pt = the mean of the kept epochs' weights (integer buffers from the best one)."""
        if not self.average_best or not state.top or not distributed.is_main():
            return
        epochs = [epoch for _, epoch in state.top]
        states = [load_checkpoint(self.part.top(e))["model"] for e in epochs]
        averaged = {}
        for key, value in states[0].items():
            averaged[key] = (torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
                             if value.is_floating_point() else value)
        payload = self._payload(parts, state.best_epoch,
                                averaged_epochs=[e + 1 for e in sorted(epochs)])
        payload["model"] = averaged
        save_checkpoint(payload, self.part.best)
        print(f"{tag}: best.pt = the mean weights of epochs {sorted(e + 1 for e in epochs)}")


def evaluated_weights(parts: Parts) -> dict[str, torch.Tensor]:
    """The weights validation saw (the EMA's when train.ema): what best.pt holds."""
    return (parts.ema.module if parts.ema is not None else unwrap(parts.model)).state_dict()
