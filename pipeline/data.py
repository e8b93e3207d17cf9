"""The data layer: a competition's tables, image paths, image reading and the Dataset.

Ids are strings everywhere (`0001` stays `0001`); labels are compared as strings against the
competition's class list and turned into class indices (`target`) in one place, `load_train_table`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from pipeline.augment import item_seed, reseed
from pipeline.config import DataConfig
from pipeline.utils import PipelineError, summarize_offenders


class DataError(PipelineError):
    """The competition's files are wrong; the message names the file, rows and remedy."""


class ImageReadError(DataError):
    """One image could not be read; names the path."""


# --------------------------------------------------------------------------------------------
# Tables


def read_table(path: Path, required: Sequence[str], id_column: str) -> pd.DataFrame:
    """Read a CSV with every column as a string, checking that `required` columns exist."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    # dtype=str + keep_default_na=False: ids like 0001 and labels like "NA" survive unchanged.
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {list(frame.columns)}. "
                        f"Fix the CSV or the column names in the competition config.")
    frame[id_column] = frame[id_column].str.strip()
    return frame


def duplicated_ids(ids: pd.Series) -> list[str]:
    return sorted(set(ids[ids.duplicated()]))


def group_of(data: DataConfig, frame: pd.DataFrame) -> pd.Series | None:
    """The group of each row (both eyes of one patient), from a column or a regex on the id."""
    if data.group_column:
        return frame[data.group_column].astype(str)
    if data.group_pattern:
        groups = frame[data.id_column].str.extract(data.group_pattern, expand=False)
        if isinstance(groups, pd.DataFrame):  # several capture groups: the first is the group
            groups = groups.iloc[:, 0]
        unmatched = frame.loc[groups.isna(), data.id_column].tolist()
        if unmatched:
            raise DataError(f"group_pattern {data.group_pattern!r} does not match id(s) "
                            f"{summarize_offenders(unmatched)}; fix the pattern in the config.")
        return groups
    return None


def load_train_table(data: DataConfig) -> pd.DataFrame:
    """The labelled rows: `id`, `label` (as spelled), `target` (class index), `group` if any.

    Raises DataError for missing columns, duplicated ids and labels outside the class list.
    """
    path = data.root_path / data.train_csv
    required = [data.id_column, data.label_column] + ([data.group_column] if data.group_column else [])
    frame = read_table(path, required, data.id_column)
    frame[data.label_column] = frame[data.label_column].str.strip()
    problems = []
    dupes = duplicated_ids(frame[data.id_column])
    if dupes:
        problems.append(f"duplicated ids: {summarize_offenders(dupes)}; each image must appear once")
    index = {name: i for i, name in enumerate(data.classes)}
    unknown = frame.loc[~frame[data.label_column].isin(index), data.label_column]
    if len(unknown):
        rows = (unknown.index[:5] + 2).tolist()  # +2: header line and 1-based line numbers
        problems.append(
            f"labels outside the class list {data.classes}: {summarize_offenders(sorted(set(unknown)))}"
            f" (lines {rows}{'...' if len(unknown) > 5 else ''}, {len(unknown)} rows); fix the rows or "
            f"add the class to `classes` in the competition config")
    if problems:
        raise DataError(f"{path}:\n  " + "\n  ".join(problems))
    table = pd.DataFrame({
        "id": frame[data.id_column].to_numpy(),
        "label": frame[data.label_column].to_numpy(),
        "target": frame[data.label_column].map(index).to_numpy(dtype=np.int64),
    })
    groups = group_of(data, frame)
    if groups is not None:
        table["group"] = groups.to_numpy()
    return table


def load_test_ids(data: DataConfig) -> list[str]:
    """Test ids in the order of the test CSV (or the sample submission when there is none)."""
    path = data.root_path / (data.test_csv or data.sample_submission)
    frame = read_table(path, [data.id_column], data.id_column)
    dupes = duplicated_ids(frame[data.id_column])
    if dupes:
        raise DataError(f"{path}: duplicated ids {summarize_offenders(dupes)}")
    return frame[data.id_column].tolist()


def class_names(data: DataConfig) -> list[str]:
    return list(data.classes)


# --------------------------------------------------------------------------------------------
# Paths and images


def image_paths(folder: Path, pattern: str, ids: Sequence[str]) -> list[Path]:
    """Map ids to files inside `folder`; an id that would escape it (`../x`, `/etc/x`) is refused."""
    paths, escaping = [], []
    for image_id in ids:
        relative = PurePosixPath(pattern.format(id=image_id).replace("\\", "/"))
        if relative.is_absolute() or ".." in relative.parts:
            escaping.append(image_id)
        paths.append(folder / relative)
    if escaping:
        raise DataError(f"id(s) {summarize_offenders(escaping)} would point outside the image folder "
                        f"{folder}; ids must be plain names (no '..', no leading '/').")
    return paths


def train_image_dir(data: DataConfig) -> Path:
    return data.root_path / data.train_images


def test_image_dir(data: DataConfig) -> Path:
    return data.root_path / data.test_images


def _looks_truncated(raw: bytes) -> bool:
    """JPEGs end with the EOI marker, PNGs with the IEND chunk; OpenCV decodes cut files silently.

    Some writers pad after the EOI marker, so it is looked for in the last kilobyte; inside JPEG
    scan data 0xFF is byte-stuffed, so the marker cannot appear there by chance.
    """
    if raw[:2] == b"\xff\xd8":
        return b"\xff\xd9" not in raw[-1024:]
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
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


def read_image_bytes(path: Path | str) -> bytes:
    """The encoded bytes of an image file, refusing truncated files, with errors that name it."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ImageReadError(f"cannot read image {path}: {err.strerror or err}") from None
    if _looks_truncated(raw):
        raise ImageReadError(f"image {path} is truncated (incomplete file); re-download it, or set "
                             f"data.drop_bad_images=true to leave it out")
    return raw


def read_image(path: Path | str, min_side: int | None = None) -> np.ndarray:
    """Read an image file (PNG, JPEG, ...) as RGB uint8 (H, W, 3), with an error that names it.

    With `min_side` (pixels), a large JPEG is decoded at 1/2, 1/4 or 1/8 of its size as long as
    its shorter side stays >= min_side: much faster, for images that are shrunk afterwards anyway.
    """
    raw = read_image_bytes(path)
    return decode_image(raw, path, jpeg_reduction(raw, min_side) if min_side else 1)


def image_problem(path: Path) -> str | None:
    """None when the image reads cleanly, else 'missing' or 'unreadable: <why>'."""
    if not path.is_file():
        return "missing"
    try:
        read_image(path)
    except ImageReadError as err:
        return f"unreadable: {err}"
    return None


def find_image_problems(paths: Sequence[Path], workers: int = 4,
                        progress: Callable | None = None) -> dict[Path, str]:
    """Check every image (OpenCV releases the GIL, so threads decode in parallel)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(image_problem, paths, chunksize=64)
        if progress is not None:
            results = progress(results, total=len(paths))
        return {p: r for p, r in zip(paths, results) if r is not None}


# --------------------------------------------------------------------------------------------
# Dataset


class ImageDataset(Dataset):
    """Images as uint8 CHW tensors (normalised later, on the device), with their class index.

    `transform` is an albumentations pipeline (or any callable taking `image=` and returning a dict
    with `image`); it must keep uint8 and output the model's input size.
    """

    def __init__(self, paths: Sequence[Path], targets: Sequence[int] | None = None,
                 transform: Callable | None = None, loader: Callable[[Path], np.ndarray] = read_image):
        if targets is not None and len(targets) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = list(paths)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        # A (index, seed) item fixes this image's augmentation (see augment.py and SeededSampler).
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = self.loader(self.paths[index])
        if self.transform is not None:
            if seed is not None:
                reseed(self.transform, seed)
            image = self.transform(image=image)["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        target = -1 if self.targets is None else int(self.targets[index])
        return tensor, target


class SeededSampler(Sampler):
    """Wraps a sampler to yield (index, seed) items; the seed depends on (base, epoch, index) only.

    Call `set_epoch` before each epoch (as with DistributedSampler, which it may wrap).
    """

    def __init__(self, sampler: Sampler, base_seed: int):
        self.sampler = sampler
        self.base_seed = base_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        for index in self.sampler:
            yield int(index), item_seed(self.base_seed, self.epoch, int(index))

    def __len__(self) -> int:
        return len(self.sampler)
