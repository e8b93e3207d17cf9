"""Batches that fit: passes of a loaded batch (train.micro_batch) and the out-of-memory path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.base.config import TTAConfig, load_config
from pipeline.base.utils import PipelineError
from pipeline.experiments.layout import Part
from pipeline.inference.predictor import CheckpointPredictor
from pipeline.training.fitting import halved, largest_fitting, pass_fits, pass_slices
from pipeline.training.parts import Rows, RunSpec
from pipeline.training.run import make_trainer
from tests.conftest import (
    experiment_dir,
    predict,
    read_folds_of,
    train,
    watch_training_passes,
)
from tests.test_train import FAST, tiny


def test_a_batch_goes_through_in_passes_of_at_most_the_micro_batch():
    assert pass_slices(8, None) == [slice(0, 8)]
    assert pass_slices(8, 8) == pass_slices(8, 64) == [slice(0, 8)]
    assert pass_slices(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert halved(None, 64, "fold 0") == 32 and halved(3, 64, "fold 0") == 1
    with pytest.raises(PipelineError, match="one image a pass"):
        halved(1, 64, "fold 0 epoch 3")


def test_the_largest_pass_that_fits_halves_until_one_does():
    tried = []

    def fits(n: int) -> bool:  # a GPU that holds 12 images a pass, and says so two ways
        tried.append(n)
        if n > 40:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return n <= 12

    assert largest_fitting(fits, 64) == 8
    assert tried == [64, 32, 16, 8]
    with pytest.raises(PipelineError, match="not even one image"):
        largest_fitting(lambda n: False, 4)


def _trainer(tmp_path, micro_batch, extra=()):
    config = tiny(tmp_path, extra=["train.batch_size=8", *extra])
    folds = read_folds_of(config)
    spec = RunSpec(part=Part(tmp_path / "run"), train_rows=Rows.of(folds[folds.fold != 0]),
                   valid_rows=Rows.of(folds[folds.fold == 0]), seed=0, tag="fold 0", inputs={})
    trainer = make_trainer(config, spec)
    trainer.state.micro_batch = micro_batch
    return trainer


@pytest.mark.parametrize("extra", [[], ["train.class_weights=[0.5, 3, 1]"],
                                   ["train.class_weights=[0.5, 3, 1]", "train.mixup=0.4"],
                                   ["train.class_weights=[0.5, 3, 1]", "model.head=both"]],
                         ids=["unweighted", "class weights", "mixup", "both heads"])
def test_passes_sum_to_the_gradient_of_the_whole_batch(tmp_path, extra):
    """With BatchNorm's statistics fixed (eval mode), 8 images in passes of 3 give the gradient
    and the mean loss of one pass of 8: the optimiser sees the same batch, class weights (a
    weighted mean: each pass weighs its share of the weights) and soft targets included."""
    results = []
    for micro in (None, 3):
        trainer = _trainer(tmp_path / str(micro), micro, extra)
        images, targets = next(iter(trainer.parts.train_loader))
        trainer.parts.forward_model.eval()
        np.random.seed(0)  # timm's Mixup draws its mix from numpy's generator
        loss = trainer.train_step(images, targets, last=False)  # gradients, no step
        grads = [p.grad.clone() for p in trainer.parts.model.parameters()]
        results.append((float(loss), grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for whole, passes in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(whole, passes, rtol=1e-5, atol=1e-6)


def _out_of_memory_above(monkeypatch, images: int, after_calls: int,
                         error=lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to "
                                                              "allocate 2.00 GiB")) -> dict:
    """From now on, training passes above `images` raise torch's OutOfMemoryError once
    `after_calls` passes have run: a GPU whose memory fills in the middle of a run."""
    calls = {"training": 0, "raised": 0}

    def fills_up(x):
        calls["training"] += 1
        if calls["training"] > after_calls and len(x) > images:
            calls["raised"] += 1
            raise error()

    watch_training_passes(monkeypatch, fills_up)
    return calls


def test_out_of_memory_mid_run_halves_the_pass_and_ends_with_the_same_steps(
        tmp_path, monkeypatch, capsys):
    reference = tiny(tmp_path / "reference", extra=["train.epochs=3", "train.batch_size=8"])
    train(reference, [0])
    config = tiny(tmp_path / "oom", extra=["train.epochs=3", "train.batch_size=8",
                                           "train.micro_batch=auto"])  # a CPU: the whole batch
    calls = _out_of_memory_above(monkeypatch, images=4, after_calls=1)  # epoch 2 fails at 8
    train(config, [0])
    out = capsys.readouterr()
    assert calls["raised"] == 1
    assert ("fold 0 epoch 2: out of GPU memory at 8 images a pass: going on at 4 (2 passes a "
            "batch of 8, the same batches and optimiser steps)") in out.err + out.out
    ran, expected = (torch.load(experiment_dir(c) / "fold0" / "last.pt", weights_only=True)
                     for c in (config, reference))
    assert ran["optimizer_steps"] == expected["optimizer_steps"] == 3 * 1  # 9 rows: 1 batch of 8
    assert ran["micro_batch"] == 4 and expected["micro_batch"] is None
    kept = json.loads((experiment_dir(config).parent / "micro_batches.json").read_text())
    assert list(kept.values()) == [4]  # auto: the next fold starts at the halved pass
    log = (experiment_dir(config) / "fold0" / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2", "3"]  # epoch 2 once, redone
    predict(config, [0])  # the run is whole: it predicts
    assert (experiment_dir(config) / "fold0" / "test_probs.csv").is_file()


@pytest.mark.parametrize("error", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")],
    ids=["torch", "cuBLAS"])
def test_out_of_memory_at_one_image_a_pass_says_what_to_change(tmp_path, monkeypatch, error):
    """Halved down to one image a pass, then the remedy; cuBLAS's plain RuntimeError is an
    out-of-memory error too. Any other RuntimeError is not: it ends the run as it was."""
    config = tiny(tmp_path, extra=["train.batch_size=2"])
    calls = _out_of_memory_above(monkeypatch, images=0, after_calls=0, error=error)
    with pytest.raises(PipelineError, match=r"fold 0 epoch 1: out of GPU memory at one image a "
                                            r"pass.*augment\.image_size"):
        train(config, [0])
    assert calls["raised"] == 2  # at 2 images, then at 1


def test_another_runtime_error_in_training_is_not_taken_for_memory(tmp_path, monkeypatch):
    config = tiny(tmp_path, extra=["train.batch_size=2"])
    calls = _out_of_memory_above(
        monkeypatch, images=0, after_calls=0,
        error=lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x64 and 32x3)"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(config, [0])
    assert calls["raised"] == 1  # no halving, no second try


def test_micro_batch_changes_no_result_identity(tmp_path, capsys):
    """Passes of 2 train the run of whole batches (its identity): current, not trained again;
    on a CPU `auto` keeps the whole batch."""
    config = tiny(tmp_path, extra=["train.micro_batch=2"])
    train(config, [0])
    again = load_config(str(tmp_path / "comp" / "tiny.yaml"), "resnet20",
                        [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
                         f"audit_dir={tmp_path / 'audit'}", "folds.n_splits=2", *FAST,
                         "train.micro_batch=auto"])
    assert experiment_dir(again) == experiment_dir(config)
    capsys.readouterr()
    train(again, [0])
    assert "current" in capsys.readouterr().out


class SmallGpu:
    """torch.cuda's three memory readings for a GPU of `total` bytes whose pass of n images
    peaks at `per_image * n` (the shape of fitting.GpuMemory): the probe on a CPU."""

    def __init__(self, total: int, per_image: int):
        self.total_bytes, self.per_image, self.images = total, per_image, 0

    def reset_peak(self) -> None:
        self.images = 0

    def peak(self) -> int:
        return self.per_image * self.images

    def total(self) -> int:
        return self.total_bytes


def test_the_probe_runs_the_real_pass_and_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, None)
    parts = trainer.parts
    gpu = SmallGpu(total=100 * 2**20, per_image=11 * 2**20)
    forward = parts.model.forward

    def counted(x):  # the pass's size is what the fake GPU's peak reads
        gpu.images = max(gpu.images, len(x))
        return forward(x)

    monkeypatch.setattr(parts.model, "forward", counted)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    state = sum(p.numel() * 4 for p in parts.model.parameters()) * 2  # AdamW's two moments
    chosen = largest_fitting(lambda n: pass_fits(parts, n, gpu), 8)
    # 8 images: 88 MiB + AdamW's 2 MiB > 85% of 100 MiB; 4 images: 44 + 2 MiB fit
    assert 2**20 < state < 3 * 2**20 and chosen == 4
    for key, value in parts.model.state_dict().items():  # BatchNorm's statistics too
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert all(p.grad is None for p in parts.model.parameters())


def test_out_of_memory_in_prediction_names_the_batch_to_set(tmp_path):
    """Prediction changes no result with its batch: the error says which predict.batch_size."""
    config = tiny(tmp_path, extra=["train.epochs=1"])
    train(config, [0])
    predictor = CheckpointPredictor(experiment_dir(config) / "fold0" / "best.pt", TTAConfig())

    def full(x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    predictor.model.forward = full
    paths = sorted((config.data.root_path / "test").glob("*.png"))
    with pytest.raises(PipelineError, match=r"test: out of GPU memory at 4 images a batch \(1 "
                                            r"view\(s\) each\): set predict.batch_size=2"):
        predictor.predict(paths, "test")
