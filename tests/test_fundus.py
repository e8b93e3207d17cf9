"""Fundus preprocessing (cache.crop_circle, cache.ben_graham): Ben Graham's formula by hand, the
circle crop, equality of the cached and uncached loaders, and the settings' place in the cache
folder's hash and the experiment's identity."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

import pipeline.data.imagecache as cache_module
from pipeline.base.config import AugmentConfig, CacheConfig, load_config
from pipeline.data.imagecache import (
    RIM_FRACTION,
    CachedReader,
    Preprocess,
    cache_reader,
    eye_radius,
    settings_hash,
    subtract_local_average,
)
from tests.test_cache import fundus, write_photos


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


def preprocess(size: int, **steps) -> Preprocess:
    return cache_module.preprocess_of(CacheConfig(**steps), AugmentConfig(image_size=size))


def by_hand(image: np.ndarray, sigma: float) -> np.ndarray:
    """out = clip(4 * img - 4 * GaussianBlur(img, sigma) + 128), in float64."""
    pixels = image.astype(np.float64)
    blur = cv2.GaussianBlur(pixels, (0, 0), sigma)
    return np.clip(np.rint(4 * pixels - 4 * blur + 128), 0, 255)


def test_ben_graham_is_the_formula_computed_by_hand(tmp_path):
    image = fundus(96, 96, radius=40)  # 79 disc pixels on the middle row: radius 39.5 px
    assert eye_radius(image) == 39.5
    sigma = 39.5 / 30  # pixels
    expected = by_hand(image, sigma)
    assert np.abs(subtract_local_average(image, 39.5) - expected).max() <= 1  # float32 rounding

    # Through the preprocessing step (a PNG at its own size: no resize): the formula inside 90%
    # of the radius, grey 128 beyond it, as in Graham's code.
    out = preprocess(96, ben_graham=True)(write_png(tmp_path / "eye.png", image)).astype(float)
    yy, xx = np.mgrid[:96, :96]
    inside = (yy + 0.5 - 48) ** 2 + (xx + 0.5 - 48) ** 2 <= (RIM_FRACTION * 39.5) ** 2
    assert np.abs(out[inside] - expected[inside]).max() <= 1
    assert np.all(out[~inside] == 128)
    assert abs(out[inside].mean() - 128) < 3  # the local average is gone: grey on average


def test_ben_graham_removes_the_lighting_of_an_eye():
    """A brighter eye (the same eye plus a constant) gives the same output away from the rim:
    the Gaussian of a constant is that constant."""
    image = fundus(96, 96, radius=40)
    brighter = np.where(image > 0, np.clip(image.astype(int) + 30, 0, 255), 0).astype(np.uint8)
    a, b = (subtract_local_average(x, 39.5).astype(int) for x in (image, brighter))
    yy, xx = np.mgrid[:96, :96]
    centre = (yy - 48) ** 2 + (xx - 48) ** 2 < 25 ** 2  # 15 px (11 sigma) inside the rim
    assert np.abs(a[centre] - b[centre]).max() <= 1
    assert np.abs(image[centre].astype(int) - brighter[centre]).min() == 30


def test_the_radius_is_read_after_the_resize(tmp_path):
    """sigma = radius / 30 in pixels of the stored image: the eye's radius after the resize."""
    image = fundus(200, 200, radius=90)
    path = write_png(tmp_path / "eye.png", image)
    out = preprocess(50, ben_graham=True)(path)
    resized = preprocess(50)(path)
    radius = eye_radius(resized)
    assert abs(radius - 90 / 4) <= 1
    expected = by_hand(resized, radius / 30)
    inside = np.hypot(*np.mgrid[:50, :50] + 0.5 - 25) <= RIM_FRACTION * radius
    assert np.abs(out[inside].astype(float) - expected[inside]).max() <= 1


def test_the_circle_crop_blackens_the_corners(tmp_path):
    """A photo filling its box (no black frame inside it): the crop keeps the box, then blacks
    out everything beyond the inscribed circle."""
    image = np.zeros((100, 140, 3), np.uint8)
    image[10:90, 30:110] = (180, 90, 40)  # an 80x80 bright square on a black frame
    path = write_png(tmp_path / "eye.png", image)
    out = preprocess(40, crop_circle=True)(path)
    assert out.shape == (40, 40, 3)
    corners = out[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.max() == 0  # the square's corners, outside the circle
    assert np.all(out[20, 1:-1] > 0) and np.all(out[1:-1, 20] > 0)  # the disc spans the box
    assert np.all(out[14:26, 14:26] == (180, 90, 40))  # the centre untouched
    box_only = preprocess(40, crop_black_border=True)(path)
    assert box_only[[0, 0, -1, -1], [0, -1, 0, -1]].min() > 0  # the box crop alone keeps them


def test_cached_and_uncached_loaders_give_the_same_pixels(tmp_path):
    paths = write_photos(tmp_path / "img", 3, height=120, width=150)  # JPEGs, reduced decoding
    augment = AugmentConfig(image_size=32)
    for steps in ({"ben_graham": True}, {"crop_circle": True},
                  {"crop_circle": True, "ben_graham": True}):
        config = CacheConfig(enabled=True, dir=str(tmp_path / "cache"), **steps)
        cached = cache_module.image_loader(config, augment, paths)
        uncached = cache_module.image_loader(CacheConfig(**steps), augment, paths)
        assert isinstance(cached, CachedReader) and isinstance(uncached, Preprocess)
        for path in paths:
            stored = cached(path)
            np.testing.assert_array_equal(stored, uncached(path))
            assert stored.shape == (32, 32, 3)
            np.testing.assert_array_equal(cached.load(cached.entry(path)), stored)  # on disk


def test_the_settings_name_the_cache_folder(tmp_path):
    augment = AugmentConfig(image_size=24)
    folders = {cache_reader(CacheConfig(dir=str(tmp_path), **steps), augment).folder
               for steps in ({}, {"crop_circle": True}, {"ben_graham": True},
                             {"crop_circle": True, "ben_graham": True},
                             {"crop_black_border": True})}
    assert len(folders) == 5
    # Off, the new steps leave the settings (and the hash) of caches built before them as it was.
    settings = cache_module.preprocess_of(CacheConfig(), augment).settings("npy")
    assert settings == {"version": 1, "size": 24, "mode": "resize", "crop_black_border": False,
                        "interpolation": "area", "format": "npy", "black_level": 16,
                        "content_fraction": 0.05}
    assert settings_hash(settings) == cache_reader(CacheConfig(), augment).folder.name


def test_the_steps_are_part_of_the_experiments_identity():
    base = load_config("digits", "resnet20").run_name
    for step in ("cache.ben_graham=true", "cache.crop_circle=true"):
        assert load_config("digits", "resnet20", [step]).run_name != base
    assert load_config("digits", "resnet20", ["cache.enabled=true"]).run_name == base
