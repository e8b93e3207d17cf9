"""Loader throughput: the pipeline's training loader, without and with the cache, against a plain
PIL + torchvision loader, on synthetic 512 px retina JPEGs resized to 224 px.

    python -m bench.loader [--quick] [--workers 0,2] [--images 200] [--rounds 7]

Both loaders do the same work per image: decode, resize to 224 x 224, horizontal and vertical
flips (p=0.5), a rotation of up to 180 degrees (p=0.7, the retina recipe of configs/resnet18.yaml),
and hand over a (3, 224, 224) tensor in batches of 32 from the same DataLoader settings. The plain
loader is the one of many retina write-ups: PIL.Image.open().convert('RGB'), torchvision Resize,
RandomHorizontalFlip, RandomVerticalFlip, RandomRotation, ToTensor, Normalize. The pipeline hands
over uint8 and normalises on the device (measured in bench.train_loop).

With 0 workers both run in the main process with torch and OpenCV at one thread each, as inside a
DataLoader worker (the main process of a 2-core machine under load otherwise measures thread
contention, not loading). Passes are interleaved and repeated; the table gives medians.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from bench import (
    Rates,
    Table,
    cores,
    interleaved,
    machine,
    per_call_ms,
    record,
    single_threaded,
    verdict,
    write_fundus_jpegs,
)
from pipeline.base.config import AugmentConfig, CacheConfig
from pipeline.data.augment import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from pipeline.data.dataset import ImageDataset, SeededSampler
from pipeline.data.imagecache import (
    build_cache,
    cache_reader,
    image_loader,
    preprocess_of,
)
from pipeline.data.images import decode_image, jpeg_reduction
from pipeline.inference.engine import loader_settings, make_loader
from pipeline.stages.cache import folder_megabytes

IMAGE_SIZE = 224
BATCH = 32
RETINA_AUGMENT = AugmentConfig(image_size=IMAGE_SIZE, train=[
    {"HorizontalFlip": {"p": 0.5}}, {"VerticalFlip": {"p": 0.5}},
    {"Rotate": {"limit": 180, "p": 0.7}}])
TARGET_CACHED, TARGET_COLD = 4.0, 1.5  # x the plain loader's images/s
PLAIN = "PIL + torchvision"


class PlainRetinaDataset(Dataset):
    """The loader of a typical retina notebook (PIL + torchvision transforms)."""

    def __init__(self, paths: list[Path], targets: np.ndarray):
        self.paths, self.targets = paths, targets
        self.transform = T.Compose([
            T.Resize((IMAGE_SIZE, IMAGE_SIZE)), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
            T.RandomApply([T.RandomRotation(180)], p=0.7), T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = Image.open(self.paths[index]).convert("RGB")
        return self.transform(image), int(self.targets[index])


def plain_loader(paths: list[Path], targets: np.ndarray, workers: int) -> DataLoader:
    extra = {"persistent_workers": True, "prefetch_factor": 4} if workers else {}
    return DataLoader(PlainRetinaDataset(paths, targets), batch_size=BATCH, shuffle=True,
                      num_workers=workers, **extra)


def pipeline_loader(paths: list[Path], targets: np.ndarray, workers: int,
                    read: Callable) -> DataLoader:
    """As FoldTrainer builds it: seeded per-image augmentation, settings from loader_settings."""
    dataset = ImageDataset(paths, targets, build_transforms(RETINA_AUGMENT, train=True), read)
    sampler = SeededSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(0)), 0)
    return make_loader(dataset, BATCH, sampler, loader_settings(torch.device("cpu"), workers))


def count_images(loader: DataLoader) -> int:
    seen = 0
    for images, _ in loader:
        seen += len(images)
    return seen


def compare_loaders(paths: list[Path], cache_dir: Path, workers: int, rounds: int,
                    with_cache: bool = True) -> Rates:
    targets = np.zeros(len(paths), np.int64)
    cold = image_loader(CacheConfig(), RETINA_AUGMENT, paths)
    loaders = {PLAIN: plain_loader(paths, targets, workers),
               "pipeline, no cache": pipeline_loader(paths, targets, workers, cold)}
    if with_cache:
        cached = image_loader(CacheConfig(enabled=True, dir=str(cache_dir)), RETINA_AUGMENT, paths)
        loaders["pipeline, cache"] = pipeline_loader(paths, targets, workers, cached)
    contenders = {name: (lambda loader=loader: count_images(loader))
                  for name, loader in loaders.items()}
    for run in contenders.values():
        run()  # warm-up: starts the persistent workers, fills the page cache
    return interleaved(contenders, rounds)


def loader_table(rates: Rates, title: str, targets: bool, cpu_clock: bool) -> Table:
    """Wall-clock medians (judged against the targets); with one thread in one process, also
    images per CPU-second, which other jobs' load cannot inflate or deflate."""
    base = PLAIN
    goals = {"pipeline, no cache": TARGET_COLD, "pipeline, cache": TARGET_CACHED}
    rows = []
    for name in rates.samples:
        ratio = rates.median(name) / rates.median(base)
        goal = goals.get(name) if targets else None
        cpu_rate = rates.median(name, "cpu")
        cpu = f"{cpu_rate:.0f} ({cpu_rate / rates.median(base, 'cpu'):.2f}x)" if cpu_clock else "-"
        rows.append([name, f"{rates.median(name):.0f}", rates.spread(name), f"{ratio:.2f}x",
                     f">= {goal}x: {verdict(ratio, goal)}" if goal else "", cpu])
    return Table(title, ["loader", "images/s (median)", "range", "vs plain", "target",
                         "images per CPU-s (vs plain)"], rows)


def stage_costs(path: Path, cache_dir: Path) -> Table:
    """Single-thread milliseconds per image of each step, to see where the time goes."""
    raw = path.read_bytes()
    preprocess = preprocess_of(CacheConfig(), RETINA_AUGMENT)
    full = decode_image(raw, path)
    reduction = jpeg_reduction(raw, IMAGE_SIZE)
    reduced = decode_image(raw, path, reduction)
    cached = preprocess(path)
    npy = cache_reader(CacheConfig(dir=str(cache_dir)), RETINA_AUGMENT)
    png = cache_reader(CacheConfig(dir=str(cache_dir), format="png"), RETINA_AUGMENT)
    npy_entry, png_entry = npy.entry(path), png.entry(path)
    npy.store(path, npy_entry)
    png.store(path, png_entry)
    augment = build_transforms(RETINA_AUGMENT, train=True)
    plain = PlainRetinaDataset([path], np.zeros(1))
    uncached_set = ImageDataset([path], [0], augment, preprocess)
    cached_set = ImageDataset([path], [0], augment, npy)
    seeds = itertools.count()
    margin = round(1.15 * IMAGE_SIZE)  # what a cache with a 15% margin would hold
    with_margin = cv2.resize(full, (margin, margin), interpolation=cv2.INTER_AREA)
    steps = {
        "plain: whole __getitem__": lambda: plain[0],
        # a new seed per call: like the plain loader, the average over augmentation draws
        "pipeline, no cache: whole __getitem__": lambda: uncached_set[0, next(seeds)],
        "pipeline, cache: whole __getitem__": lambda: cached_set[0, next(seeds)],
        "PIL open + convert (full decode)": lambda: Image.open(path).convert("RGB"),
        "OpenCV decode, full size": lambda: decode_image(raw, path),
        f"OpenCV decode at 1/{reduction} (reduced JPEG decoding)": lambda: decode_image(
            raw, path, reduction),
        "JPEG header size (PIL, no decoding)": lambda: jpeg_reduction(raw, IMAGE_SIZE),
        f"INTER_AREA {reduced.shape[0]} -> {IMAGE_SIZE}": lambda: cv2.resize(
            reduced, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA),
        f"INTER_AREA {full.shape[0]} -> {IMAGE_SIZE}": lambda: cv2.resize(
            full, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA),
        f"INTER_AREA {margin} -> {IMAGE_SIZE} (the resize a 15% cache margin costs)":
            lambda: cv2.resize(with_margin, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA),
        "pipeline: preprocessing (the uncached read)": lambda: preprocess(path),
        "cache read, .npy": lambda: npy.load(npy_entry),
        "cache read, .png": lambda: png.load(png_entry),
        "augmentation (flips, rotate p=0.7) at 224": lambda: augment(image=cached),
    }
    with single_threaded():
        rows = [[name, round(per_call_ms(fn, 100), 3)] for name, fn in steps.items()]
    sizes = ", ".join(f"{entry.suffix} {entry.stat().st_size / 1024:.0f} KiB"
                      for entry in (npy_entry, png_entry))
    return Table(f"Where the time goes: one {full.shape[1]}x{full.shape[0]} JPEG "
                 f"({len(raw) / 1024:.0f} KiB), one thread", ["step", "ms per image"], rows,
                 [f"cache entry size: {sizes}"])


def run(quick: bool = False, workers: list[int] | None = None, images: int | None = None,
        rounds: int | None = None) -> list[Table]:
    images = images or (64 if quick else 200)
    rounds = rounds or (3 if quick else 7)
    workers = workers if workers is not None else ([0] if quick else sorted({0, cores()}))
    tables = []
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        tmp = Path(tmp)
        paths = write_fundus_jpegs(tmp / "512", images, 512, 512)
        reader = cache_reader(CacheConfig(enabled=True, dir=str(tmp / "cache")), RETINA_AUGMENT)
        build = build_cache(reader, paths, desc="bench cache")
        tables.append(Table("Cache build (512 px JPEGs -> 224 px .npy)",
                            ["images", "seconds", "images/s", "MB on disk", "threads"],
                            [[build.built, f"{build.seconds:.2f}", round(build.built / build.seconds),
                              f"{folder_megabytes(build.folder):.1f}", cores()]]))
        for count in workers:
            context = single_threaded() if count == 0 else contextlib.nullcontext()
            with context:
                rates = compare_loaders(paths, tmp / "cache", count, rounds)
            where = ("main process, one thread" if count == 0 else f"{count} DataLoader workers")
            tables.append(loader_table(
                rates, f"Training loader, {images} JPEGs of 512x512 -> 224 px, batch {BATCH}, "
                f"{where}, median of {rounds} interleaved passes", True, cpu_clock=count == 0))
        if not quick:
            large = write_fundus_jpegs(tmp / "large", 24, 1536, 2048, seed=1)
            with single_threaded():
                rates = compare_loaders(large, tmp / "cache", 0, max(3, rounds // 2),
                                        with_cache=False)
            tables.append(loader_table(
                rates, "Large photos: 24 JPEGs of 2048x1536 -> 224 px, main process, one thread "
                "(decoded at 1/4 of their size)", False, cpu_clock=True))
        tables.append(stage_costs(paths[0], tmp / "stage-cache"))
    return tables


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 images, 3 rounds, 0 workers")
    parser.add_argument("--workers", default=None,
                        help="comma-separated worker counts (default: 0 and the core count)")
    parser.add_argument("--images", type=int, default=None, help="number of 512 px JPEGs (200)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved passes (7)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    about = machine()
    workers = [int(w) for w in args.workers.split(",")] if args.workers else None
    tables = run(args.quick, workers, args.images, args.rounds)
    record(tables, "loader throughput" + (" (quick)" if args.quick else ""), about)


if __name__ == "__main__":
    main()
