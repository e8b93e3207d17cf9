"""The GPU path: training and inference throughput of resnet18/resnet50 at 224 px on CUDA, in float32,
mixed precision, and mixed precision + channels_last; the pipeline's loop beside a bare loop.

    python -m bench.gpu [--quick] [--device cuda] [--models resnet18,resnet50] [--batch 128]

Without a GPU it records that nothing was measured (and why), so a CPU-only `make bench` still
completes. The pipeline's settings under test are its defaults on CUDA: bf16 autocast where the
GPU supports it (else fp16 with a gradient scaler), channels_last, cudnn.benchmark, pinned host
memory with non-blocking copies, and no device synchronisation per batch.
"""

from __future__ import annotations

import argparse

import torch

from bench import Table, machine, record, train_loop
from bench import tta as tta_bench

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
                  tta_rows)]


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
