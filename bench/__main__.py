"""Every benchmark, one section appended to bench/BENCHMARKS.md.

    python -m bench [--quick] [--only loader,train_loop,tta,gpu]      (make bench)

loader: the training loader without and with the cache against PIL + torchvision (512 px JPEGs);
train_loop: the pipeline's epoch loop against a bare PyTorch loop; tta: d4 over plain inference;
gpu: resnet18/50 at 224 px on CUDA (recorded as not measured without a GPU). Each one also runs
alone: `python -m bench.loader --quick`. Numbers are medians of interleaved repeats, because other
jobs may share the machine; the load average at the start is written beside them.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench import gpu, loader, machine, record, train_loop, tta

BENCHMARKS = {"loader": loader.run, "train_loop": train_loop.run, "tta": tta.run, "gpu": gpu.run}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs of each benchmark")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    about = machine(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    tables, started = [], time.perf_counter()
    for name in chosen:
        print(f"== {name}", flush=True)
        tables += BENCHMARKS[name](quick=args.quick)
    minutes = (time.perf_counter() - started) / 60
    record(tables, f"make bench{' --quick' if args.quick else ''} ({', '.join(chosen)}; "
                   f"{minutes:.1f} min)", about)


if __name__ == "__main__":
    main()
