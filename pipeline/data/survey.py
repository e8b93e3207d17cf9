"""What the check's one read of each image tells the audit besides whether it reads: its SHA-256
(exact copies), its grey thumbnail (near copies: pipeline/data/duplicates.py) and its cheap
features (what a camera, a resolution, a crop or a compressor change: the train/test shift).

    result = check_competition(data, survey=True)     # each image read and decoded once
    survey = result.survey.of_paths(paths)             # these images' rows, in their order
    survey.digests, survey.thumbs, survey.features    # (N,), (N, S, S), (N, len(FEATURES))

Reading every file once more for each of them had taken half of `make folds` and most of `make
audit` at 35,000 small images (bench/BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.data.duplicates import THUMBNAIL, thumbnail_of

FEATURES = ["width", "height", "aspect", "file kB", "jpeg quality", "mean red", "mean green",
            "mean blue", "std red", "std green", "std blue", "sharpness"]

# the side the colour statistics and the sharpness are measured at: alike for every image size
FEATURE_SIDE = 128


def jpeg_quality(raw: bytes) -> float:
    """An estimate of a JPEG's quality from its luminance quantisation table (libjpeg's scaling
    of the standard table; 100 for PNG and other lossless files)."""
    if raw[:2] != b"\xff\xd8":
        return 100.0
    try:
        tables = getattr(Image.open(io.BytesIO(raw)), "quantization", None)
    except Exception:  # a header PIL cannot parse decoded all the same: no table to read
        return 100.0
    if not tables:
        return 100.0
    scale = float(np.mean(tables[0])) / 57.625  # the standard luminance table's mean at 50
    return float(np.clip(50 / scale if scale > 1 else 100 - 50 * scale, 1, 100))


def cheap_features(raw: bytes, rgb: np.ndarray) -> np.ndarray:
    """FEATURES of one image from its encoded bytes and its pixels (OpenCV's own statistics: a
    numpy reduction over a 128 x 128 x 3 image took ten times as long)."""
    height, width = rgb.shape[:2]
    small = cv2.resize(rgb, (FEATURE_SIDE, FEATURE_SIDE),
                       interpolation=cv2.INTER_AREA).astype(np.float32)
    mean, std = cv2.meanStdDev(small)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    _, sharpness = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    return np.array([width, height, width / height, len(raw) / 1024, jpeg_quality(raw),
                     *mean[:, 0], *std[:, 0], sharpness[0, 0] ** 2], np.float64)


@dataclass(frozen=True)
class Surveyed:
    """One image's share of the survey."""

    digest: str
    thumbnail: np.ndarray  # (THUMBNAIL, THUMBNAIL) float32
    features: np.ndarray  # (len(FEATURES),)


def survey_image(raw: bytes, rgb: np.ndarray) -> Surveyed:
    """The survey of one image read and decoded (images.inspect_image's `look`)."""
    return Surveyed(hashlib.sha256(raw).hexdigest(), thumbnail_of(rgb), cheap_features(raw, rgb))


@dataclass(frozen=True)
class Survey:
    """The survey of many images, as arrays (one copy of the thumbnails: at 43,750 images they
    are 180 MB), a row per image."""

    digests: list[str]
    thumbs: np.ndarray  # (N, THUMBNAIL, THUMBNAIL) float32
    features: np.ndarray  # (N, len(FEATURES))
    rows: dict[Path, int] = field(default_factory=dict)  # each image's row

    @classmethod
    def of(cls, surveyed: dict[Path, Surveyed]) -> Survey:
        if not surveyed:
            return cls([], np.zeros((0, THUMBNAIL, THUMBNAIL), np.float32),
                       np.zeros((0, len(FEATURES))))
        looks = list(surveyed.values())
        return cls([one.digest for one in looks], np.stack([one.thumbnail for one in looks]),
                   np.stack([one.features for one in looks]),
                   {path: row for row, path in enumerate(surveyed)})

    def of_paths(self, paths: list[Path]) -> Survey:
        """The rows of these images, in their order: the survey itself when they are all of its
        images in its own order (the audit's usual case), so that no copy is made."""
        rows = np.array([self.rows[path] for path in paths], np.int64)
        if np.array_equal(rows, np.arange(len(self.digests))):
            return self
        return Survey([self.digests[row] for row in rows], self.thumbs[rows],
                      self.features[rows], {path: k for k, path in enumerate(paths)})
