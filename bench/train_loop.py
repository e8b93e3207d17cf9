"""Training throughput: the pipeline's epoch loop (Trainer.train_epoch) against a bare PyTorch
loop on the same model, batches and optimiser settings, so the pipeline's own overhead shows.

    python -m bench.train_loop [--quick] [--model resnet18] [--size 64] [--batch 32]
    python -m bench.train_loop --device cuda --model resnet50 --size 224 [--no-amp]

Both loops see the same in-memory batches (no loader, no disk): the pipeline gets uint8 images
and normalises them on the device as it does in training (Normalizer); the bare loop gets
float32 images normalised beforehand, which is its best case. Bare loop: model(x), cross-entropy,
backward, SGD step (momentum 0.9, Nesterov, weight decay 5e-4: the pipeline's defaults), nothing
else. The pipeline adds per-image seeding, the progress bar, the learning-rate schedule, the loss
sum kept on the device, and on CUDA its mixed precision and channels_last (the bare loop gets the
same precision and memory format, so only the loop differs). Epochs alternate; medians reported.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from bench import (
    Table,
    cores,
    interleaved,
    limited_threads,
    model_bench_parser,
    run_model_bench,
    verdict,
)
from pipeline.base.config import build_config
from pipeline.data.augment import IMAGENET_MEAN, IMAGENET_STD
from pipeline.experiments.layout import Part
from pipeline.inference.engine import autocast
from pipeline.models.factory import create_model
from pipeline.training.loop import Trainer
from pipeline.training.parts import Rows, RunSpec
from pipeline.training.run import make_trainer

TARGET_RATIO = 0.95  # pipeline images/s over bare images/s
BARE, PIPELINE = "bare PyTorch loop", "pipeline (Trainer.train_epoch)"
CLASSES = 5


def synthetic_batches(count: int, batch: int, size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator),
             torch.randint(0, CLASSES, (batch,), generator=generator)) for _ in range(count)]


def pipeline_trainer(root: Path, model: str, size: int, batch: int, steps: int, device: str,
                     amp: bool, channels_last: bool) -> Trainer:
    """A Trainer built as `make train` builds it (its images are never read: batches come from
    memory, and ImageNet statistics need no pass over the data). `steps` batches per epoch:
    the loop stops after the optimiser steps its loader had, so the rows make exactly that many."""
    labels = [str(i % CLASSES) for i in range(steps * batch + 1)]
    data = {"name": "bench", "root": str(root / "data"), "classes": [str(c) for c in range(CLASSES)]}
    config = build_config({
        "run_name": "bench", "data": data, "runs_dir": str(root / "runs"),
        "model": {"name": model}, "augment": {"image_size": size, "normalize": "imagenet"},
        "train": {"batch_size": batch, "workers": 0, "device": device, "amp": amp, "epochs": 1000,
                  "warmup_epochs": 0, "channels_last": channels_last},
    })
    rows = Rows([f"{i:04d}" for i in range(len(labels))], labels, np.array([int(x) for x in labels]))
    return make_trainer(config, RunSpec(part=Part(root / "runs" / "fold0"), train_rows=rows,
                                        valid_rows=None, seed=0, tag="bench", inputs={}))


class BareLoop:
    """The textbook loop: no schedule, no seeding, no bookkeeping."""

    def __init__(self, model: str, device: torch.device, dtype, channels_last: bool, lr=0.05):
        torch.manual_seed(0)
        self.model = create_model(model, CLASSES).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                         weight_decay=5e-4)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.device, self.dtype = device, dtype

    def epoch(self, batches) -> None:
        self.model.train()
        for images, targets in batches:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with autocast(self.device, self.dtype):
                loss = self.criterion(self.model(images), targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def normalised(batches, memory_format):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return [(((x.float() - mean) / std).contiguous(memory_format=memory_format), y)
            for x, y in batches]


def synced(run, images: int, device: torch.device):
    """`run` as a contender: returns the image count once the device has finished."""
    def contender() -> int:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return images
    return contender


def measure(model: str, size: int, batch: int, steps: int, rounds: int, device_name: str = "cpu",
            amp: bool = True, channels_last: bool = True, threads: int | None = None) -> dict:
    """Median images/s of both loops, alternating epochs of `steps` batches; `threads`: torch
    CPU threads (None: as configured)."""
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp, limited_threads(threads):
        trainer = pipeline_trainer(Path(tmp), model, size, batch, steps, device_name, amp,
                                   channels_last)
        device, dtype = trainer.parts.device, trainer.parts.dtype
        assert trainer.parts.steps_per_epoch == steps  # both loops run the same batches
        on_cuda_cl = device.type == "cuda" and channels_last
        bare = BareLoop(model, device, dtype, on_cuda_cl)
        batches = synthetic_batches(steps, batch, size)
        float_batches = normalised(batches, bare.memory_format)
        if device.type == "cuda":  # both start from device-resident pinned host memory alike
            batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
            float_batches = [(x.pin_memory(), y.pin_memory()) for x, y in float_batches]
        trainer.parts.train_loader = batches  # the epoch loop as it is, fed from memory
        epoch = iter(range(10**6))
        contenders = {
            BARE: synced(lambda: bare.epoch(float_batches), steps * batch, device),
            PIPELINE: synced(lambda: trainer.train_epoch(next(epoch)), steps * batch, device),
        }
        for run in contenders.values():
            run()  # warm-up: allocator, cuDNN autotuning, torch.compile if asked
        rates = interleaved(contenders, rounds)
    cpu_ratio = (rates.median(PIPELINE, "cpu") / rates.median(BARE, "cpu")
                 if threads == 1 and device.type == "cpu" else None)
    return {"model": model, "size": size, "batch": batch, "device": str(device),
            "precision": str(dtype).replace("torch.", "") if dtype else "float32",
            "channels_last": on_cuda_cl, "threads": threads, "bare": rates.median(BARE),
            "pipeline": rates.median(PIPELINE), "bare range": rates.spread(BARE),
            "pipeline range": rates.spread(PIPELINE),
            "ratio": rates.median(PIPELINE) / rates.median(BARE), "cpu ratio": cpu_ratio,
            "rounds": rounds, "steps": steps}


def result_rows(results: list[dict]) -> list[list]:
    return [[r["model"], r["size"], r["batch"], r["precision"], "yes" if r["channels_last"] else "no",
             r["threads"], f"{r['bare']:.1f} ({r['bare range']})",
             f"{r['pipeline']:.1f} ({r['pipeline range']})", f"{r['ratio']:.3f}",
             f">= {TARGET_RATIO}: {verdict(r['ratio'], TARGET_RATIO)}",
             "-" if r["cpu ratio"] is None else f"{r['cpu ratio']:.3f}"] for r in results]


HEADERS = ["model", "px", "batch", "precision", "channels_last", "CPU threads",
           "bare img/s (range)", "pipeline img/s (range)", "pipeline / bare", "target",
           "same, per CPU-s"]


def run(quick: bool = False, configs: list[tuple[str, int, int]] | None = None,
        device: str = "cpu", amp: bool = True, channels_last: bool = True,
        rounds: int | None = None, threads: list[int] | None = None) -> list[Table]:
    configs = configs or ([("resnet20", 32, 64)] if quick else [("resnet20", 32, 64),
                                                                   ("resnet18", 64, 32)])
    threads = threads or ([1] if quick else sorted({1, cores()}))
    rounds = rounds or (5 if quick else 9)  # short epochs, many rounds: load bursts average out
    steps = 3
    results = [measure(m, s, b, steps, rounds, device, amp, channels_last, t)
               for m, s, b in configs for t in threads]
    return [Table(f"Training loop on {device}: median images/s of {rounds} alternating epochs of "
                  f"{steps} batches (in-memory data)", HEADERS, result_rows(results))]


def main(argv=None) -> None:
    parser = model_bench_parser("python -m bench.train_loop", __doc__.split("\n")[0],
                                "resnet20 at 32 px, 5 rounds",
                                "one model instead of the default pair", "alternating epochs (9)")
    run_model_bench(run, parser.parse_args(argv), "training loop")


if __name__ == "__main__":
    main()
