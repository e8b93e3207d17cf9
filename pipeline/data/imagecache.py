"""The resized-image cache: each image decoded, border-cropped and shrunk once, then read as arrays.

    loader = image_loader(config.cache, config.augment, paths)    # what training and predict read
    make cache MODEL=resnet18 [DATA=retina] [FORCE=1]              # the stage: pipeline/stages/cache.py

Large retina JPEGs (512 px to several thousand) cost milliseconds to decode, every epoch, fold and
model. The cache does the deterministic part of loading once: decode (JPEGs at 1/2, 1/4 or 1/8
size when they stay large enough), crop the black frame around a fundus (optional; or crop to the
eye's circle), shrink to `cache.size` (default: the model's input size, so the first transform
has nothing left to do), subtract the local average colour (Ben Graham's fundus preprocessing,
optional), and stores the result as an uncompressed .npy (or a lossless .png). With
`cache.enabled=true`, training and prediction build what is missing before they start and then
read only the cache.

Where: `<cache.dir>/<settings hash>/<xx>/<source hash>.npy`. The folder is named by a hash of
every setting that changes the stored pixels (size, mode, crop, interpolation, format, the
fundus steps when on, and this code's version), so a changed setting never reads an old entry; an
entry is named by a hash of the source file's absolute path, size and modification time, so an
edited or replaced image is decoded again. Entries are written to a temporary name and renamed
into place: an interrupted build leaves only complete entries, and the next one starts where it
stopped.

Without the cache the loader runs the same preprocessing on every read, so `cache.enabled` changes
speed only, never the images the model sees.

Bookkeeping. `make cache` is a step of the stage runner (pipeline/experiments/runner.py): its
lock, its manifest (`<folder>/<competition>.manifest.json`: the settings and the source files'
fingerprint, which is what names the entries) and FORCE=1 are the runner's. `image_loader` keeps
its own rank check: it runs inside the work of other steps (a training fold, a prediction, the
offline runtime of a code competition, which imports no experiments layer), where rank 0 fills
the cache and the other ranks wait at a barrier before reading it; a step of its own there would
nest a manifest and a lock inside the caller's for no decision of its own, since each entry
already says by its name whether it is current.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.base import distributed
from pipeline.base.config import AugmentConfig, CacheConfig
from pipeline.base.fingerprints import images_fingerprint
from pipeline.base.utils import atomic_path, summarize_offenders, write_text_atomic
from pipeline.data.images import (
    INTERPOLATIONS,
    ImageReadError,
    decode_image,
    jpeg_reduction,
    read_image_bytes,
)
from pipeline.data.tables import MAX_IMAGE_PIXELS, DataError

CACHE_VERSION = 1  # bump when this module changes what it stores: old folders are then ignored
BLACK_LEVEL = 16  # 0..255: a pixel whose brightest channel is <= this is frame (JPEG noise ~10)
CONTENT_FRACTION = 0.05  # a row/column is photo when > 5% of it is brighter (not a stray label)
STALE_TEMP_SECONDS = 3600  # temporary files this old are left by a killed build, not by a running one
# Ben Graham's Gaussian: sigma = eye radius / 30 (his `scale/30` with the radius rescaled to
# `scale` px); about 8.5 px at 512 px, 3.7 px at 224 px. It keeps lesions and vessels (a few px)
# and removes the slow variation of lighting and pigment across the eye.
RADIUS_PER_SIGMA = 30
# ... and grey (128) beyond 90% of that radius, as his code did: there the blur mixes the black
# frame in and leaves a bright ring inside the rim and a dark one outside it, the same in every eye.
RIM_FRACTION = 0.9


# --------------------------------------------------------------------------------------------
# Preprocessing: what an entry holds


def crop_black_border(image: np.ndarray) -> np.ndarray:
    """The bounding box of the photo inside a black frame (fundus photos: a bright disc on black).

    A row or column belongs to the photo when more than CONTENT_FRACTION of its pixels are
    brighter than BLACK_LEVEL, so JPEG noise and small burnt-in labels in the frame are ignored.
    An all-black image is returned whole.
    """
    brightest = np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])  # (H, W)
    bright = brightest > BLACK_LEVEL
    rows = np.flatnonzero(np.count_nonzero(bright, axis=1) > CONTENT_FRACTION * bright.shape[1])
    cols = np.flatnonzero(np.count_nonzero(bright, axis=0) > CONTENT_FRACTION * bright.shape[0])
    if rows.size == 0 or cols.size == 0:
        return image
    return image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def mask_circle(image: np.ndarray, radius: float | None = None, fill: int = 0) -> np.ndarray:
    """`fill` outside a centred circle of `radius` pixels (None: the inscribed circle, half the
    shorter side). After `crop_black_border` the image is the eye's bounding box, so the inscribed
    circle is the eye's rim, as in the APTOS 2019 write-ups' `circle_crop`; a disc the camera cut
    at the top and bottom loses the strips beyond that circle's sides too, as there."""
    height, width = image.shape[:2]
    yy, xx = np.ogrid[:height, :width]
    radius = min(height, width) / 2 if radius is None else radius
    # pixel centres at +0.5: the mask is symmetric, and a square image keeps its full diameter
    inside = (yy + 0.5 - height / 2) ** 2 + (xx + 0.5 - width / 2) ** 2 <= radius ** 2  # (H, W)
    return np.where(inside[..., None], image, np.asarray(fill, image.dtype))


def eye_radius(image: np.ndarray) -> float:
    """The eye's radius in pixels, read off the middle row as Ben Graham did: half the count of
    its pixels brighter than a tenth of the row's mean (channels summed). An all-black row gives
    half the shorter side."""
    row = image[image.shape[0] // 2].astype(np.float32).sum(axis=-1)  # (W,)
    bright = int(np.count_nonzero(row > row.mean() / 10))
    return bright / 2 if bright else min(image.shape[:2]) / 2


def subtract_local_average(image: np.ndarray, radius: float) -> np.ndarray:
    """Ben Graham's fundus normalisation (Kaggle Diabetic Retinopathy 2015, first place):
    clip(4 * image - 4 * GaussianBlur(image, sigma) + 128, 0, 255), sigma = radius / 30 pixels
    (`Preprocess` then greys the rim, beyond RIM_FRACTION of the radius, as his code did).

    The blur is the local average colour; what is left is local contrast, on a grey of 128, with
    lighting, camera and pigment differences between eyes gone. Computed in float32 (his uint8
    `cv2.addWeighted` rounds the blur first, an error the factor 4 turns into up to 2 levels).
    """
    sigma = max(radius, 1.0) / RADIUS_PER_SIGMA  # pixels
    pixels = image.astype(np.float32)
    blur = cv2.GaussianBlur(pixels, (0, 0), sigma)  # OpenCV's default border (reflect-101)
    return np.clip(np.rint(4 * pixels - 4 * blur + 128), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Preprocess:
    """The deterministic steps from an image file to the array the cache stores (picklable, so it
    also runs inside DataLoader workers when the cache is off)."""

    size: int  # pixels: cap on the stored image; decoding stays at or above it; never enlarged
    mode: str  # resize | keep_aspect | center_crop (see CacheConfig)
    crop_black_border: bool
    interpolation: str  # augment.interpolation: mode "resize" then equals the first transform
    crop_circle: bool = False  # the eye's bounding box, black outside its inscribed circle
    ben_graham: bool = False  # subtract the local average colour, at the stored size
    # data.max_image_pixels: refused from the header before decoding (changes no stored pixel,
    # so it is no part of `settings`)
    max_pixels: int = MAX_IMAGE_PIXELS

    def __call__(self, path: Path | str) -> np.ndarray:
        raw = read_image_bytes(path, self.max_pixels)
        reduction = jpeg_reduction(raw, self.size)
        while True:
            image = decode_image(raw, path, reduction)
            if self.crop_black_border or self.crop_circle:
                image = crop_black_border(image)
            if reduction == 1 or min(image.shape[:2]) >= self.size:
                break
            reduction //= 2  # the frame was wider than expected: decode at a larger scale
        return self.finish(image)

    def finish(self, image: np.ndarray) -> np.ndarray:
        """The steps after decoding and the box crop: circle mask (at the decoded resolution, so
        the resize smooths its rim), shrink, then Ben Graham's subtraction at the stored size."""
        if self.crop_circle:
            image = mask_circle(image)
        image = self.shrink(image)
        if self.ben_graham:
            radius = eye_radius(image)
            image = subtract_local_average(image, radius)
            image = mask_circle(image, RIM_FRACTION * radius, fill=128)
        return image

    def shrink(self, image: np.ndarray) -> np.ndarray:
        """Apply `mode` at `size`; an image already small enough keeps its pixels."""
        height, width = image.shape[:2]
        if self.mode == "center_crop":
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            image = image[top:top + side, left:left + side]
            height = width = side
        if self.mode == "keep_aspect":
            scale = min(1.0, self.size / min(height, width))
            target = (max(1, round(width * scale)), max(1, round(height * scale)))
        else:  # a square of `size`, each side only ever shrunk
            target = (min(width, self.size), min(height, self.size))
        if target == (width, height):
            return np.ascontiguousarray(image)
        return cv2.resize(image, target, interpolation=INTERPOLATIONS[self.interpolation])

    def settings(self, fmt: str) -> dict[str, Any]:
        """Everything that changes the stored pixels: the cache folder is named by its hash."""
        steps = asdict(self)
        del steps["max_pixels"]
        # The fundus steps came later: named only when on, so folders built before them (and
        # their hashes) stay valid for the settings that made them.
        for key in ("crop_circle", "ben_graham"):
            if not steps[key]:
                del steps[key]
        if self.ben_graham:
            steps.update(radius_per_sigma=RADIUS_PER_SIGMA, rim_fraction=RIM_FRACTION)
        return {"version": CACHE_VERSION, **steps, "format": fmt,
                "black_level": BLACK_LEVEL, "content_fraction": CONTENT_FRACTION}


def preprocess_of(cache: CacheConfig, augment: AugmentConfig,
                  max_pixels: int = MAX_IMAGE_PIXELS) -> Preprocess:
    return Preprocess(size=cache.size or augment.image_size, mode=cache.mode,
                      crop_black_border=cache.crop_black_border,
                      interpolation=augment.interpolation, crop_circle=cache.crop_circle,
                      ben_graham=cache.ben_graham, max_pixels=max_pixels)


def settings_hash(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


# --------------------------------------------------------------------------------------------
# The cache itself


@dataclass(frozen=True)
class CachedReader:
    """`loader` for ImageDataset: the cached array of an image; a missing or stale entry is made
    (and stored) on the spot, so a reader is always correct, the build only makes it fast."""

    preprocess: Preprocess
    folder: Path  # <cache.dir>/<settings hash>
    fmt: str = "npy"

    @property
    def settings_file(self) -> Path:
        """settings.json: what the folder's hash stands for, readable."""
        return self.folder / "settings.json"

    @property
    def lock(self) -> Path:
        """One `make cache` at a time on this folder; outside it, as FORCE=1 deletes it."""
        return self.folder.parent / ".locks" / f"{self.folder.name}.lock"

    def manifest(self, competition: str) -> Path:
        """`make cache`'s record for one competition (a folder serves every competition with
        these settings)."""
        return self.folder / f"{competition}.manifest.json"

    def sources_fingerprint(self, paths: Sequence[Path | str]) -> str:
        """The source files as `entry` names them (absolute path, size, modification time; a
        missing one as such): equal fingerprints, the same entries."""
        return images_fingerprint([os.path.abspath(p) for p in paths], paths)

    def entry(self, path: Path | str) -> Path:
        """The entry of `path` as it is now on disk: a changed file gets a new entry."""
        source = os.path.abspath(path)
        try:
            stat = os.stat(source)
        except OSError as err:
            raise ImageReadError(f"cannot read image {path}: {err.strerror or err}") from None
        key = f"{source}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        return self.folder / digest[:2] / f"{digest[2:]}.{self.fmt}"  # 256 sub-folders: small dirs

    def __call__(self, path: Path | str) -> np.ndarray:
        entry = self.entry(path)
        image = self.load(entry)
        return image if image is not None else self.store(path, entry)

    def load(self, entry: Path) -> np.ndarray | None:
        """The stored array, or None when absent or unreadable (then it is made again)."""
        try:
            if self.fmt == "npy":
                return np.load(entry)
            image = cv2.imdecode(np.fromfile(entry, np.uint8), cv2.IMREAD_COLOR)
            return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        except (OSError, ValueError, EOFError, cv2.error):  # absent, or damaged by hand
            return None

    def store(self, path: Path | str, entry: Path | None = None) -> np.ndarray:
        """Preprocess `path` and write its entry atomically (concurrent writers are harmless:
        they write the same bytes and the last rename wins)."""
        entry = entry or self.entry(path)
        image = self.preprocess(path)
        with atomic_path(entry) as tmp:
            if self.fmt == "png":
                if not cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_PNG_COMPRESSION, 1]):  # 1: fast, still ~2x smaller
                    raise OSError(f"cannot write {tmp}")
            else:
                np.save(tmp, image)
        return image


def cache_reader(cache: CacheConfig, augment: AugmentConfig,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> CachedReader:
    preprocess = preprocess_of(cache, augment, max_pixels)
    folder = Path(cache.dir) / settings_hash(preprocess.settings(cache.format))
    return CachedReader(preprocess, folder, cache.format)


def remove_stale_temps(folder: Path, older_than_s: float = STALE_TEMP_SECONDS) -> int:
    """Delete temporary files left by a killed build (young ones may belong to a running one)."""
    removed = 0
    cutoff = time.time() - older_than_s
    for tmp in folder.glob("*/.*.tmp.*"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # renamed or removed meanwhile by its writer
            pass
    return removed


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class BuildReport:
    images: int  # distinct source files asked for
    present: int  # entries already there (a resumed or repeated build)
    built: int  # entries made now
    seconds: float
    folder: Path


def build_cache(reader: CachedReader, paths: Iterable[Path | str], workers: int | None = None,
                desc: str = "cache") -> BuildReport:
    """Make the missing entries of `paths`, in parallel threads (OpenCV and file I/O release the
    GIL). Raises DataError naming every image that could not be read, after building the rest."""
    started = time.perf_counter()
    unique = list(dict.fromkeys(Path(p) for p in paths))
    reader.folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(reader.settings_file,
                      json.dumps(reader.preprocess.settings(reader.fmt), indent=1) + "\n")
    remove_stale_temps(reader.folder)
    todo: list[tuple[Path, Path]] = []
    failures: dict[Path, str] = {}
    for path in unique:
        try:
            entry = reader.entry(path)
        except ImageReadError as err:
            failures[path] = str(err)
            continue
        if not entry.is_file():
            todo.append((path, entry))

    def make(item: tuple[Path, Path]) -> tuple[Path, str | None]:
        try:
            reader.store(*item)
            return item[0], None
        except ImageReadError as err:
            return item[0], str(err)

    if todo:
        failures.update(_run_parallel(make, todo, workers or machine_cores(), desc))
    if failures:
        bad = sorted(failures, key=str)
        raise DataError(f"{len(bad)} image(s) could not be cached: {summarize_offenders(bad)}; first "
                        f"error: {failures[bad[0]]}. Run `make check` to list them all; the "
                        f"{len(todo) - len(bad)} cached ones are kept, re-run to finish.")
    return BuildReport(len(unique), len(unique) - len(todo), len(todo),
                       round(time.perf_counter() - started, 2), reader.folder)


def _run_parallel(make: Callable, todo: list, workers: int, desc: str) -> dict[Path, str]:
    """Run `make` over `todo` with a progress bar; a Ctrl-C stops after the images in flight."""
    failures = {}
    threads_before = cv2.getNumThreads()
    cv2.setNumThreads(1)  # parallel over images instead: no oversubscription of the cores
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with tqdm(total=len(todo), desc=desc, unit="img", dynamic_ncols=True,
                  mininterval=1.0) as bar:
            for path, error in pool.map(make, todo):
                bar.update()
                if error is not None:
                    failures[path] = error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # finished entries stay; the rest next time
        cv2.setNumThreads(threads_before)
    return failures


# --------------------------------------------------------------------------------------------
# What the stages call


def image_loader(cache: CacheConfig, augment: AugmentConfig, paths: Sequence[Path],
                 desc: str = "cache",
                 *, max_pixels: int = MAX_IMAGE_PIXELS) -> Callable[[Path | str], np.ndarray]:
    """The `loader` for ImageDataset over `paths`.

    With cache.enabled: a CachedReader whose missing entries were just built (all at once, in
    parallel, rather than one by one in the first epoch). Without: the same preprocessing on every
    read (still with reduced JPEG decoding), so both give the same arrays. Either refuses an
    image over `max_pixels` (data.max_image_pixels) from its header, before decoding it.
    """
    if not cache.enabled:
        return preprocess_of(cache, augment, max_pixels)
    reader = cache_reader(cache, augment, max_pixels)
    # Under torchrun rank 0 builds the missing entries while the other ranks wait for it.
    if distributed.is_main():
        report = build_cache(reader, paths, desc=desc)
        if report.built:
            print(f"{desc}: cached {report.built} image(s) in {report.seconds:.1f}s -> {reader.folder}")
    distributed.barrier()
    return reader
