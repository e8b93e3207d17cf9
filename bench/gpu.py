"""The GPU path: training and inference throughput of resnet18/resnet50 at 224 px on CUDA, in float32,
mixed precision, and mixed precision + channels_last; the pipeline's loop beside a bare loop; and
batches that fit: `make train` of resnet50 at 512 px with a batch of 256, which no GPU holds in
one pass, with train.micro_batch: auto (measured), without it (out of memory, halved, resumed),
and with a size schedule (256 px, then 512: progressive resizing).

    python -m bench.gpu [--quick] [--device cuda] [--models resnet18,resnet50] [--batch 128]

Without a GPU it records that nothing was measured (and why), so a CPU-only `make bench` still
completes. The pipeline's settings under test are its defaults on CUDA: bf16 autocast where the
GPU supports it (else fp16 with a gradient scaler), channels_last, cudnn.benchmark, pinned host
memory with non-blocking copies, and no device synchronisation per batch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench import Table, machine, record, synthetic_fundus, train_loop
from bench import tta as tta_bench
from bench.suite import quiet_cli
from bench.suite_data import write_competition

VARIANTS = [("float32", False, False), ("mixed precision", True, False),
            ("mixed precision + channels_last", True, True)]


def not_measured(reason: str) -> list[Table]:
    return [Table("GPU", ["result"], [[f"GPU: not measured, {reason}"]],
                  ["run `python -m bench.gpu` (or `make bench`) on a CUDA machine to fill this in"])]


def run(quick: bool = False, device: str = "cuda", models: list[str] | None = None,
        batch: int = 128) -> list[Table]:
    if not torch.cuda.is_available():
        return not_measured("no GPU was available to this task")
    models = models or (["resnet18"] if quick else ["resnet18", "resnet50"])
    steps, rounds = (5, 3) if quick else (20, 5)
    train_rows, tta_rows = [], []
    for model in models:
        for label, amp, channels_last in VARIANTS:
            result = train_loop.measure(model, 224, batch, steps, rounds, device, amp, channels_last)
            train_rows += [[label] + row for row in train_loop.result_rows([result])]
            result = tta_bench.measure(model, 224, batch, 4 if quick else 10, rounds, device, amp,
                                       channels_last)
            tta_rows += [[label] + row for row in tta_bench.result_rows([result])]
    return [Table(f"GPU training, 224 px, batch {batch}, median of {rounds} alternating epochs of "
                  f"{steps} batches (in-memory data)", ["variant"] + train_loop.HEADERS, train_rows),
            Table(f"GPU inference and TTA, 224 px, batch {batch}", ["variant"] + tta_bench.HEADERS,
                  tta_rows),
            batches_that_fit(device)]


# A batch no single GPU pass holds: resnet50 at 512 px takes several GB of activations a hundred
# images; the loader still yields FIT_BATCH a step, in passes.
FIT_MODEL, FIT_SIZE, FIT_BATCH, FIT_STEPS = "resnet50", 512, 256, 2


def batches_that_fit(device: str) -> Table:
    """Two short `make train` runs of a batch too large for one pass: train.micro_batch: auto
    (the probe's choice, then no error) and unset (out of memory, halved until it fits, from
    last.pt). Both must end with 2 epochs x FIT_STEPS optimiser steps."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        work = Path(tmp)
        data = fit_competition(work)
        where = [f"runs_dir={work / 'runs'}", f"folds.dir={work / 'folds'}", "folds.n_splits=2"]
        quiet_cli(["folds", "--data", str(data), *where], work / "log.txt")
        schedule = f"augment.sizes={{1: {FIT_SIZE // 2}, 2: {FIT_SIZE}}}"
        for name, label, setting in (
                ("auto", "train.micro_batch: auto", ["train.micro_batch=auto"]),
                ("oom", "unset: out of memory mid-run", []),
                ("sizes", f"auto, {schedule}", ["train.micro_batch=auto", schedule])):
            started = time.perf_counter()
            quiet_cli(["train", "--data", str(data), "--model", FIT_MODEL, "--folds", "0",
                       "--name", name, *where, f"augment.image_size={FIT_SIZE}",
                       f"train.batch_size={FIT_BATCH}", "train.epochs=2",
                       f"train.max_batches={FIT_STEPS}", f"train.device={device}", *setting],
                      work / "log.txt")
            last = torch.load(work / "runs" / "fit" / name / "fold0" / "last.pt",
                              weights_only=True)
            probes = work / "runs" / "fit" / "micro_batches.json"
            chosen = json.loads(probes.read_text()) if setting and probes.is_file() else {}
            epochs = pd.read_csv(work / "runs" / "fit" / name / "fold0" / "log.csv")["seconds"]
            rows.append([label, last["micro_batch"] or FIT_BATCH, next(iter(chosen.values()), "-"),
                         last["optimizer_steps"], " / ".join(f"{s:.1f}" for s in epochs),
                         round(time.perf_counter() - started, 1)])
        halvings = (work / "log.txt").read_text().count("out of GPU memory at")
    return Table(f"Batches that fit: {FIT_MODEL} at {FIT_SIZE} px, a batch of {FIT_BATCH}, 2 "
                 f"epochs of {FIT_STEPS} steps", ["run", "images a pass", "probe chose",
                                                   "optimiser steps", "epoch seconds",
                                                   "seconds in all"], rows,
                 [f"expected: {2 * FIT_STEPS} optimiser steps each; out-of-memory halvings "
                  f"said: {halvings}"])


def fit_competition(root: Path) -> Path:
    """600 synthetic fundus images of 512 px, two grades: enough rows for a batch of 256."""
    rng = np.random.default_rng(0)
    ids = [f"{i:04d}" for i in range(600)]
    images = [synthetic_fundus(rng, FIT_SIZE, FIT_SIZE) for _ in ids]
    labels = [str(i % 2) for i in range(600)]
    return write_competition(root, "fit", (ids, images, labels), (ids[:8], images[:8], labels[:8]),
                             {"classes": ["0", "1"], "metric": "accuracy"})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 only, fewer batches")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    parser.add_argument("--models", default=None, help="comma-separated (resnet18,resnet50)")
    parser.add_argument("--batch", type=int, default=128)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    about = machine(torch.device(args.device if on_gpu else "cpu"))
    models = args.models.split(",") if args.models else None
    tables = run(args.quick, args.device, models, args.batch)
    record(tables, "GPU path" + (" (quick)" if args.quick else ""), about)


if __name__ == "__main__":
    main()
