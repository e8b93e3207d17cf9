"""Reading images: header sizes before any decode, the pixel budget, decoding, and the checks.

    raw = read_image_bytes(path, max_pixels)      # refused above the budget, from the header alone
    image = read_image(path, min_side=64)          # (H, W, 3) uint8 RGB, JPEG decoded at reduced size
    problems, looked = inspect_images(paths, look=f)  # {path: what is wrong}, {path: f(bytes, pixels)}

A truncated file, a link out of the image folder or an image over `data.max_image_pixels` is an
`ImageReadError` that names the file.
"""
from __future__ import annotations

import errno
import functools
import io
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
from PIL import Image

from pipeline.data.tables import MAX_IMAGE_PIXELS, DataError

# augment.interpolation -> OpenCV's flag: the cache's resize and the transforms' Resize use one map
INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
                  "nearest": cv2.INTER_NEAREST}

T = TypeVar("T")


class ImageReadError(DataError):
    """One image could not be read; names the path."""


class ImageTooLarge(ImageReadError):
    """An image's header says it holds more pixels than data.max_image_pixels."""

    def __init__(self, message: str, size: str = ""):
        super().__init__(message)
        self.size = size  # "20000 x 20000 px"


# PIL reads headers only here (sizes, before any decoding); the pixel budget is ours,
# data.max_image_pixels, checked from the header before OpenCV decodes a byte of pixels. PIL's
# own guard would refuse to even read the header of an image above 2 x its limit.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _looks_truncated(raw: bytes) -> bool:
    """JPEGs end with the EOI marker, PNGs with the IEND chunk; OpenCV decodes cut files silently.

    Some writers pad after the EOI marker, so it is looked for in the last kilobyte; inside JPEG
    scan data 0xFF is byte-stuffed, so the marker cannot appear there by chance.
    """
    if raw[:2] == b"\xff\xd8":
        return b"\xff\xd9" not in raw[-1024:]
    if raw[:8] == PNG_SIGNATURE:
        return b"IEND" not in raw[-32:]
    return False


# Decoding flags by JPEG scale-down factor: libjpeg decodes at 1/2, 1/4 or 1/8 size in its inverse
# DCT, which skips most of the decoding work (a 2048 px photo decodes ~4x faster at 1/8) and is an
# anti-aliased shrink in itself. Other formats are always decoded at full size.
JPEG_REDUCED_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
                      4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def jpeg_reduction(raw: bytes, min_side: int) -> int:
    """The largest JPEG scale-down factor (1, 2, 4 or 8) that keeps the shorter side >= min_side.

    Reads only the header (PIL stops at the frame size: ~40 us, no decoding); 1 for non-JPEGs.
    """
    if raw[:2] != b"\xff\xd8":
        return 1
    try:
        width, height = Image.open(io.BytesIO(raw)).size
    except Exception:  # a broken header: decode at full size and let the decoder name the file
        return 1
    shorter = min(width, height)
    for factor in (8, 4, 2):
        if -(-shorter // factor) >= min_side:  # libjpeg rounds the scaled size up
            return factor
    return 1


def decode_image(raw: bytes, source: Path | str, reduction: int = 1) -> np.ndarray:
    """Decode encoded bytes to an RGB uint8 array (H, W, 3); grayscale images get three channels.

    `reduction` (2, 4, 8) decodes a JPEG at that fraction of its size (see `jpeg_reduction`).
    """
    flags = JPEG_REDUCED_FLAGS[reduction] if raw[:2] == b"\xff\xd8" else cv2.IMREAD_COLOR
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), flags) if raw else None
    if image is None:
        raise ImageReadError(f"cannot decode image {source}: not an image or corrupt; "
                             f"replace it, or set data.drop_bad_images=true to leave it out")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def header_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header (PNG, JPEG, WebP, TIFF, BMP, ...), without
    decoding its pixels; None when the header does not say."""
    if raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR" and len(raw) >= 24:
        # a PNG's size sits at a fixed place, in its first chunk: PIL's parse of the header
        # had taken a sixth of checking a small image
        width, height = struct.unpack(">II", raw[16:24])
        return width, height
    try:
        return Image.open(io.BytesIO(raw)).size
    except Exception:  # not a format PIL knows, or a broken header: the decoder names the file
        return None


def check_pixels(raw: bytes, source: Path | str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse an image whose header holds more than `max_pixels` pixels, before decoding it."""
    size = header_size(raw)
    if size is None or size[0] * size[1] <= max_pixels:
        return
    width, height = size
    raise ImageTooLarge(
        f"image {source} is {width} x {height} px ({width * height / 1e6:.0f} Mpx), over the "
        f"pixel budget of {max_pixels / 1e6:g} Mpx (data.max_image_pixels): decoding it would "
        f"take {width * height * 3 / 2**30:.1f} GB. Shrink or replace it, raise "
        f"data.max_image_pixels if it is a real photo, or set data.drop_bad_images=true to "
        f"leave it out", f"{width} x {height} px")


def read_image_bytes(path: Path | str, max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """The encoded bytes of an image file, refusing truncated files and images over the pixel
    budget (from the header), with errors that name it."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ImageReadError(f"cannot read image {path}: {err.strerror or err}") from None
    check_pixels(raw, path, max_pixels)
    if _looks_truncated(raw):
        raise ImageReadError(f"image {path} is truncated (incomplete file); re-download it, or set "
                             f"data.drop_bad_images=true to leave it out")
    return raw


def read_image(path: Path | str, min_side: int | None = None,
               max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image file (PNG, JPEG, ...) as RGB uint8 (H, W, 3), with an error that names it.

    With `min_side` (pixels), a large JPEG is decoded at 1/2, 1/4 or 1/8 of its size as long as
    its shorter side stays >= min_side: much faster, for images that are shrunk afterwards anyway.
    """
    raw = read_image_bytes(path, max_pixels)
    return decode_image(raw, path, jpeg_reduction(raw, min_side) if min_side else 1)


def outside_link(path: Path, real_folder: Path) -> str | None:
    """Where `path` leads when a symbolic link takes it outside the folder whose real path is
    `real_folder` (ids cannot leave the folder with '..', and neither may a link), else None.
    A folder that is itself a link is fine: its files resolve inside its target."""
    if os.path.islink(path):
        target = path.resolve()
        return None if target.is_relative_to(real_folder) else str(target)
    # a file that is no link lies where its folder really is: one lstat, each folder resolved
    # once for all its files (resolving each path took a quarter of a small image's check)
    folder = _real_folder(path.parent)
    return None if folder.is_relative_to(real_folder) else str(folder / path.name)


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: Path) -> Path:
    return folder.resolve()


def inspect_image(path: Path, real_folder: Path | None = None,
                  max_pixels: int = MAX_IMAGE_PIXELS,
                  look: Callable[[bytes, np.ndarray], T] | None = None) -> tuple[str | None, T | None]:
    """(what is wrong, look(encoded bytes, RGB pixels) for an image that read cleanly): what is
    wrong is None, 'missing', 'name too long: <why>' (an id longer than the file system allows
    in one name, usually 255 bytes), 'outside: <target>' (a link out of the image folder, given
    by its real path), 'too large: <why>' (over the pixel budget) or 'unreadable: <why>'; the
    look is whatever else a caller learns from the image, from the one read the check makes."""
    try:
        exists = path.is_file()
    except OSError as err:  # Path.is_file raises ENAMETOOLONG rather than returning False
        kind = "name too long" if err.errno == errno.ENAMETOOLONG else "unreadable"
        return f"{kind}: {err.strerror or err}", None
    if not exists:
        return "missing", None
    target = outside_link(path, real_folder) if real_folder is not None else None
    if target is not None:
        return f"outside: {target}", None
    try:
        raw = read_image_bytes(path, max_pixels)
        rgb = decode_image(raw, path)
    except ImageTooLarge as err:
        return f"too large: {err.size}", None
    except ImageReadError as err:
        return f"unreadable: {err}", None
    return None, None if look is None else look(raw, rgb)


def inspect_images(paths: Sequence[Path], workers: int = 4,
                   progress: Callable | None = None, folder: Path | None = None,
                   *, max_pixels: int = MAX_IMAGE_PIXELS,
                   look: Callable[[bytes, np.ndarray], T] | None = None,
                   ) -> tuple[dict[Path, str], dict[Path, T]]:
    """({path: what is wrong}, {path: look(bytes, pixels)} of the images that read cleanly), in
    threads (OpenCV decodes and hashlib digests without the GIL)."""
    real_folder = None if folder is None else folder.resolve()
    _real_folder.cache_clear()  # folders resolved afresh for each check: links may have moved

    def inspect(path: Path) -> tuple[str | None, T | None]:
        return inspect_image(path, real_folder, max_pixels, look)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(inspect, paths, chunksize=64)
        if progress is not None:
            results = progress(results, total=len(paths))
        problems, looked = {}, {}
        for path, (problem, seen) in zip(paths, results):
            if problem is not None:
                problems[path] = problem
            elif look is not None:
                looked[path] = seen
        return problems, looked


# --------------------------------------------------------------------------------------------
# Dataset
