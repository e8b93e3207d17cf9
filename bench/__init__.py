"""Benchmarks of the input pipeline, the training loop and TTA; results go to bench/BENCHMARKS.md.

    python -m bench [--quick]            (make bench): every benchmark, one section appended
    python -m bench.loader [--quick]     one of them: loader, train_loop, tta, gpu

Shared here: the machine description, synthetic fundus photos, repeated interleaved timing with
medians (other jobs may share the machine), and the markdown record.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pipeline.base.utils import format_table, markdown_table, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "BENCHMARKS.md"


# --------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU (no GPU)" if not torch.cuda.is_available() else "CPU"


def machine(device: torch.device = torch.device("cpu")) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_model()}, {cores()} cores, torch {torch.__version__}, OpenCV {cv2.__version__}, "
            f"device {device_name(device)}, load average {load:.1f} at the start")


# --------------------------------------------------------------------------------------------
# Timing


@dataclass
class Sample:
    """One timed run: items processed, wall-clock seconds, and CPU seconds of this process.

    With one thread, CPU time counts only this run's own work, whatever other jobs do to the
    wall clock: the load-proof cross-check of a wall-clock rate (meaningless with several
    threads, which spin while they wait, or with DataLoader worker processes)."""

    items: int
    wall: float
    cpu: float


def timed(run: Callable[[], int]) -> Sample:
    """Time `run`, which returns the number of items it processed (after syncing a GPU)."""
    wall, cpu = time.perf_counter(), time.process_time()
    items = run()
    return Sample(items, time.perf_counter() - wall, time.process_time() - cpu)


@dataclass
class Rates:
    """Samples per contender, collected in interleaved rounds; rates in items/s."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def add(self, name: str, sample: Sample) -> None:
        self.samples.setdefault(name, []).append(sample)

    def rates(self, name: str, clock: str = "wall") -> list[float]:
        return [s.items / getattr(s, clock) for s in self.samples[name]]

    def median(self, name: str, clock: str = "wall") -> float:
        return statistics.median(self.rates(name, clock))

    def spread(self, name: str, clock: str = "wall") -> str:
        values = self.rates(name, clock)
        return f"{min(values):.0f}-{max(values):.0f}"


def interleaved(contenders: dict[str, Callable[[], int]], rounds: int) -> Rates:
    """Run each contender once per round, rotating the order every round so that a burst of load
    from another job hits all of them alike. Each contender returns its item count."""
    rates = Rates()
    names = list(contenders)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            rates.add(name, timed(contenders[name]))
    return rates


def per_call_ms(fn: Callable[[], Any], calls: int) -> float:
    fn()  # warm-up: lazy initialisation, caches
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


class limited_threads:
    """torch and OpenCV at `count` threads inside the block (context manager).

    One thread is how a DataLoader worker runs; for compute benchmarks it also keeps the ratio
    between two loops from measuring how OpenMP threads fare against other jobs' load.
    """

    def __init__(self, count: int = 1):
        self.count = count

    def __enter__(self):
        self.saved = torch.get_num_threads(), cv2.getNumThreads()
        torch.set_num_threads(self.count)
        cv2.setNumThreads(self.count)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved[0])
        cv2.setNumThreads(self.saved[1])


def single_threaded() -> limited_threads:
    return limited_threads(1)


# --------------------------------------------------------------------------------------------
# Synthetic retina photos


def synthetic_fundus(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An RGB uint8 photo shaped like a retina image: an orange disc with shading, an optic disc,
    a darker macula, branching vessels, sensor noise, on a black frame."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = 0.47 * min(height, width) * rng.uniform(0.9, 1.05)
    cy = height / 2 + rng.uniform(-0.02, 0.02) * height
    cx = width / 2 + rng.uniform(-0.02, 0.02) * width
    distance = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / radius
    low = cv2.resize(rng.normal(0, 1, (6, 6, 3)).astype(np.float32), (width, height),
                     interpolation=cv2.INTER_CUBIC)  # slow illumination changes
    colour = np.array([200, 95, 45], np.float32) * rng.uniform(0.8, 1.1)
    image = colour * (1 - 0.45 * distance[..., None] ** 2) + 12 * low
    disc_y, disc_x = cy + rng.uniform(-0.1, 0.1) * radius, cx + rng.choice([-1, 1]) * 0.4 * radius
    optic = np.exp(-((yy - disc_y) ** 2 + (xx - disc_x) ** 2) / (2 * (0.08 * radius) ** 2))
    macula = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.12 * radius) ** 2))
    image += optic[..., None] * np.array([50, 90, 60]) - macula[..., None] * np.array([40, 30, 10])
    vessels = np.zeros((height, width), np.float32)
    scale = min(height, width) / 512
    for _ in range(14):
        angle, y, x = rng.uniform(0, 2 * np.pi), disc_y, disc_x
        points = []
        for _ in range(40):
            angle += rng.normal(0, 0.15)
            y, x = y + 12 * scale * np.sin(angle), x + 12 * scale * np.cos(angle)
            points.append((int(x), int(y)))
        cv2.polylines(vessels, [np.array(points, np.int32)], False, 1.0,
                      thickness=max(1, int(rng.uniform(1, 4) * scale)), lineType=cv2.LINE_AA)
    vessels = cv2.GaussianBlur(vessels, (0, 0), 0.8 * scale + 0.3)
    image *= 1 - 0.45 * vessels[..., None]
    image += rng.normal(0, 3, image.shape)
    image *= (distance < 1)[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def write_fundus_jpegs(folder: Path, count: int, height: int, width: int, seed: int = 0,
                       quality: int = 92) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{index:04d}.jpeg"
        image = synthetic_fundus(rng, height, width)
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, quality])
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# The record


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([self.title, format_table(self.rows, self.headers), *self.notes])

    def markdown(self) -> str:
        parts = [f"#### {self.title}", "", markdown_table(self.rows, self.headers)]
        if self.notes:
            parts += ["", *[f"- {note}" for note in self.notes]]
        return "\n".join(parts)


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "MISSED"


def record(tables: Sequence[Table], what: str, about: str, path: Path = RESULTS,
           append: bool = True) -> None:
    """Print the tables and append them to BENCHMARKS.md as one dated section (atomically);
    `append=False` (a bench's --no-record) only prints.

    `about` is `machine()` taken when the run started (its load average is the one that counts).
    """
    for table in tables:
        print("\n" + table.text())
    if not append:
        return
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = [f"### {stamp}: {what}", "", f"Machine: {about}.", ""]
    section += [table.markdown() + "\n" for table in tables]
    existing = path.read_text() if path.is_file() else "# Benchmarks\n"
    write_text_atomic(path, existing.rstrip("\n") + "\n\n" + "\n".join(section).rstrip("\n") + "\n")
    print(f"\nappended to {path}")


def model_bench_parser(prog: str, description: str, quick_help: str, model_help: str,
                       rounds_help: str) -> argparse.ArgumentParser:
    """The options shared by the model benchmarks (training loop, TTA)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--model", default=None, help=model_help)
    parser.add_argument("--size", type=int, default=64, help="image size, pixels (with --model)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (with --model)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-amp", action="store_true", help="CUDA: float32 instead of bf16/fp16")
    parser.add_argument("--no-channels-last", action="store_true", help="CUDA: NCHW memory format")
    parser.add_argument("--rounds", type=int, default=None, help=rounds_help)
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch thread counts (default: 1 and the core count)")
    return parser


def run_model_bench(run, args: argparse.Namespace, title: str) -> None:
    """Run a model benchmark's `run(quick, configs, device, amp, channels_last, rounds, threads)`
    with the parsed shared options and record its tables."""
    import torch

    about = machine(torch.device(args.device))
    configs = [(args.model, args.size, args.batch)] if args.model else None
    threads = [int(t) for t in args.threads.split(",")] if args.threads else None
    tables = run(args.quick, configs, args.device, not args.no_amp, not args.no_channels_last,
                 args.rounds, threads)
    record(tables, title + (" (quick)" if args.quick else ""), about)
