"""The fast input pipeline: the resized-image cache (keys, resume, equality with the uncached
loader, the CLI verb), reduced JPEG decoding, and TTA batching by device."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import pipeline.data.imagecache as cache_module
import pipeline.inference.engine as engine
from pipeline.__main__ import main as cli
from pipeline.base.config import AugmentConfig, CacheConfig, TTAConfig
from pipeline.data.augment import Normalizer, build_transforms, reseed
from pipeline.data.imagecache import (
    CachedReader,
    Preprocess,
    build_cache,
    cache_reader,
    crop_black_border,
)
from pipeline.data.images import jpeg_reduction, read_image
from pipeline.data.tables import DataError
from pipeline.experiments.layout import Part
from pipeline.inference.engine import predict_logits
from pipeline.inference.predictor import tta_views
from pipeline.training.parts import Rows, RunSpec
from pipeline.training.run import make_trainer
from tests.conftest import make_competition
from tests.conftest import read_folds_of as read_folds
from tests.test_train import tiny


def fundus(height: int, width: int, radius: float, seed: int = 0) -> np.ndarray:
    """A bright, textured disc centred on a black frame, like a retina photo (RGB uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < radius ** 2
    colour = np.stack([150 + 60 * yy / height, 60 + 40 * xx / width, 30 + 0 * xx], axis=-1)
    image = (colour + rng.normal(0, 6, colour.shape)) * disc[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def write_photos(folder: Path, count: int, height: int = 64, width: int = 80, ext: str = ".jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}{ext}"
        image = fundus(height, width, radius=min(height, width) * 0.45, seed=i)
        assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def reader_for(tmp_path: Path, image_size: int = 24, **cache) -> CachedReader:
    return cache_reader(CacheConfig(enabled=True, dir=str(tmp_path / "cache"), **cache),
                        AugmentConfig(image_size=image_size))


@pytest.fixture
def count_decodes(monkeypatch):
    """Counts the images actually decoded by the cache (not read back from it)."""
    calls = []
    real = cache_module.decode_image

    def counting(raw, source, reduction=1):
        calls.append(Path(source).name)
        return real(raw, source, reduction)

    monkeypatch.setattr(cache_module, "decode_image", counting)
    return calls


def entries(reader: CachedReader) -> list[Path]:
    return sorted(reader.folder.glob(f"*/*.{reader.fmt}"))


# --------------------------------------------------------------------------------------------
# Keys


def test_changed_settings_use_a_new_folder_and_never_read_old_entries(tmp_path, count_decodes):
    paths = write_photos(tmp_path / "img", 4)
    small = reader_for(tmp_path, image_size=24)
    build_cache(small, paths)
    assert len(entries(small)) == 4 and len(count_decodes) == 4
    for changed in (reader_for(tmp_path, image_size=32), reader_for(tmp_path, crop_black_border=True),
                    reader_for(tmp_path, mode="center_crop"), reader_for(tmp_path, format="png"),
                    cache_reader(CacheConfig(enabled=True, dir=str(tmp_path / "cache")),
                                 AugmentConfig(image_size=24, interpolation="linear"))):
        assert changed.folder != small.folder and changed.folder.parent == small.folder.parent
        count_decodes.clear()
        report = build_cache(changed, paths)
        assert (report.present, report.built, len(count_decodes)) == (0, 4, 4)
    assert read_image(paths[0]).shape[:2] == (64, 80)
    assert reader_for(tmp_path, image_size=32)(paths[0]).shape[:2] == (32, 32)
    assert small(paths[0]).shape[:2] == (24, 24)


def test_a_changed_source_file_is_decoded_again(tmp_path):
    path, = write_photos(tmp_path / "img", 1)
    reader = reader_for(tmp_path, image_size=16)
    build_cache(reader, [path])
    before = reader(path)
    cv2.imwrite(str(path), np.full((64, 80, 3), 200, np.uint8))  # new content, same name
    stamp = time.time() + 5
    os.utime(path, (stamp, stamp))  # a coarse file-system clock would otherwise hide the change
    after = reader(path)
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, np.full((16, 16, 3), 200, np.uint8))


def test_a_damaged_entry_is_made_again(tmp_path):
    path, = write_photos(tmp_path / "img", 1)
    reader = reader_for(tmp_path)
    good = reader(path)
    reader.entry(path).write_bytes(b"not an array")
    np.testing.assert_array_equal(reader(path), good)


# --------------------------------------------------------------------------------------------
# Building: parallel, resumable


def test_an_interrupted_build_resumes_with_only_the_missing_images(tmp_path, monkeypatch):
    paths = write_photos(tmp_path / "img", 8)
    reader = reader_for(tmp_path)
    real = cache_module.decode_image
    decoded: list[str] = []

    def interrupt_at_fifth(raw, source, reduction=1):
        if len(decoded) == 4:
            raise KeyboardInterrupt  # Ctrl-C during the build
        decoded.append(Path(source).name)
        return real(raw, source, reduction)

    monkeypatch.setattr(cache_module, "decode_image", interrupt_at_fifth)
    with pytest.raises(KeyboardInterrupt):
        build_cache(reader, paths, workers=1)
    done = entries(reader)
    assert len(done) == 4
    assert not list(reader.folder.glob("*/.*"))  # no half-written entry left behind
    # a temporary file of an older, killed build is swept; the complete entries are kept
    stale = done[0].parent / ".left.by.a.kill.tmp.npy"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 2 * cache_module.STALE_TEMP_SECONDS,) * 2)

    first_run = list(decoded)
    decoded.clear()
    monkeypatch.setattr(cache_module, "decode_image", lambda raw, source, reduction=1: (
        decoded.append(Path(source).name), real(raw, source, reduction))[1])
    report = build_cache(reader, paths)
    assert (report.present, report.built) == (4, 4)
    assert sorted(decoded) == sorted(p.name for p in paths if p.name not in first_run)
    assert len(entries(reader)) == 8 and not stale.exists()
    decoded.clear()
    assert build_cache(reader, paths).built == 0 and decoded == []


def test_unreadable_images_are_named_and_the_rest_is_cached(tmp_path):
    paths = write_photos(tmp_path / "img", 3)
    broken = tmp_path / "img" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg \xff\xd9")
    missing = tmp_path / "img" / "missing.jpg"
    reader = reader_for(tmp_path)
    with pytest.raises(DataError) as err:
        build_cache(reader, paths + [broken, missing])
    message = str(err.value)
    assert "broken.jpg" in message and "missing.jpg" in message and "make check" in message
    assert len(entries(reader)) == 3


# --------------------------------------------------------------------------------------------
# What the cache stores


def test_cached_and_uncached_loaders_give_the_same_training_images(tmp_path):
    paths = write_photos(tmp_path / "img", 3, height=120, width=150)  # JPEGs, decoded at 1/4
    augment = AugmentConfig(image_size=28, train=[{"HorizontalFlip": {"p": 0.5}},
                                                  {"Rotate": {"limit": 180, "p": 1.0}}])
    config = CacheConfig(enabled=True, dir=str(tmp_path / "cache"))
    reader = cache_reader(config, augment)
    uncached = cache_module.image_loader(CacheConfig(), augment, paths)
    cached = cache_module.image_loader(config, augment, paths)
    assert isinstance(cached, CachedReader) and isinstance(uncached, Preprocess)
    assert len(entries(reader)) == 3
    transform = build_transforms(augment, train=True)
    for seed, path in enumerate(paths):
        outputs = []
        for load in (uncached, cached):
            reseed(transform, seed)
            outputs.append(transform(image=load(path))["image"])
        np.testing.assert_array_equal(outputs[0], outputs[1])
        assert outputs[0].shape == (28, 28, 3)


def test_the_cache_equals_the_pipelines_own_resize(tmp_path):
    """Mode resize at image_size is the first transform, done once: exact for a PNG, within JPEG
    reduced-decoding error for a JPEG (libjpeg's scaled decoding is the only difference)."""
    augment = AugmentConfig(image_size=20)
    reader = cache_reader(CacheConfig(enabled=True, dir=str(tmp_path / "cache")), augment)
    first_transform = build_transforms(augment, train=False)
    png, = write_photos(tmp_path / "png", 1, ext=".png")
    jpeg, = write_photos(tmp_path / "jpg", 1, height=96, width=120)
    np.testing.assert_array_equal(reader(png), first_transform(image=read_image(png))["image"])
    expected = first_transform(image=read_image(jpeg))["image"].astype(float)  # full decode
    difference = np.abs(reader(jpeg).astype(float) - expected)
    assert difference.mean() < 2.0 and difference.max() < 40


def test_small_images_are_stored_as_they_are(tmp_path):
    """The cache only shrinks: upscaling stays in the final resize, with its interpolation."""
    path, = write_photos(tmp_path / "img", 1, height=8, width=8, ext=".png")
    reader = reader_for(tmp_path, image_size=32)
    np.testing.assert_array_equal(reader(path), read_image(path))


@pytest.mark.parametrize("mode, shape", [("resize", (24, 24)), ("keep_aspect", (24, 30)),
                                         ("center_crop", (24, 24))])
def test_modes(tmp_path, mode, shape):
    path, = write_photos(tmp_path / "img", 1, height=64, width=80, ext=".png")
    assert reader_for(tmp_path, image_size=24, mode=mode)(path).shape == (*shape, 3)


def test_png_entries_hold_the_same_pixels(tmp_path):
    paths = write_photos(tmp_path / "img", 2)
    npy, png = reader_for(tmp_path), reader_for(tmp_path, format="png")
    build_cache(png, paths)
    assert all(e.suffix == ".png" for e in entries(png))
    for path in paths:
        np.testing.assert_array_equal(npy(path), png(path))


def test_black_border_crop_removes_the_frame_of_a_fundus():
    image = fundus(200, 300, radius=80)
    noisy = cv2.imdecode(cv2.imencode(".jpg", image)[1], cv2.IMREAD_COLOR)  # JPEG noise in the black
    for photo in (image, noisy):
        cropped = crop_black_border(photo)
        height, width = cropped.shape[:2]
        assert abs(height - 160) <= 4 and abs(width - 160) <= 4, cropped.shape
        assert cropped[:3].max() > 16 or cropped[:, :3].max() > 16  # no all-black edge left
    black = np.zeros((20, 30, 3), np.uint8)
    assert crop_black_border(black).shape == black.shape


def test_black_border_crop_in_the_cache_keeps_the_disc(tmp_path):
    path = tmp_path / "eye.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(fundus(400, 600, radius=150), cv2.COLOR_RGB2BGR))
    reader = reader_for(tmp_path, image_size=64, crop_black_border=True)
    image = reader(path)
    assert image.shape == (64, 64, 3)
    corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert image[28:36, 28:36].mean() > 60 and corners.max() < 40  # disc fills the square


def test_jpeg_reduction_keeps_the_shorter_side_large_enough(tmp_path):
    path, = write_photos(tmp_path / "img", 1, height=400, width=512)
    raw = path.read_bytes()
    assert [jpeg_reduction(raw, side) for side in (40, 50, 51, 100, 101, 200, 201)] == [
        8, 8, 4, 4, 2, 2, 1]
    assert read_image(path, min_side=100).shape == (100, 128, 3)
    png, = write_photos(tmp_path / "png", 1, height=400, width=512, ext=".png")
    assert jpeg_reduction(png.read_bytes(), 10) == 1


# --------------------------------------------------------------------------------------------
# The stages


def test_cache_verb_builds_every_image_once(tmp_path, capsys):
    data = make_competition(tmp_path / "comp", ["a", "b"] * 3, ext=".jpg")
    args = ["cache", "--data", str(data), "--model", "resnet20", f"cache.dir={tmp_path / 'cache'}",
            f"folds.dir={tmp_path / 'folds'}", "augment.image_size=12"]

    def counts(out: str) -> list[str]:  # the table's images, already cached, built
        lines = out.splitlines()
        header = next(i for i, line in enumerate(lines) if "already cached" in line)
        return lines[header + 2].split()[1:4]

    assert cli(args) == 0
    out = capsys.readouterr()
    assert counts(out.out) == ["10", "0", "10"]
    assert "cache.enabled is false" in out.err  # built, but said it will not be read
    folders = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "settings.json").is_file()
    assert len(list(folders[0].glob("*/*.npy"))) == 6 + 4  # train + test
    assert (folders[0] / "tiny.manifest.json").is_file()  # the runner's record, per competition
    assert cli(args + ["cache.enabled=true"]) == 0  # a setting that stores no other pixel
    out = capsys.readouterr()
    assert "every image of tiny is cached" in out.out and "already cached" not in out.out
    assert "cache.enabled is false" not in out.err
    replaced = next((tmp_path / "comp" / "train").iterdir())
    os.utime(replaced, ns=(time.time_ns(), time.time_ns() + 10**9))  # an image replaced
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "images changed: caching what is missing" in out
    assert counts(out) == ["10", "9", "1"]  # that one alone
    assert cli(args + ["--force"]) == 0
    assert counts(capsys.readouterr().out) == ["10", "0", "10"]
    assert len(list(folders[0].glob("*/*.npy"))) == 10  # the replaced image's old entry went


def test_cache_verb_names_a_missing_image(tmp_path, capsys):
    data = make_competition(tmp_path / "comp", ["a", "b"] * 2)
    (tmp_path / "comp" / "test" / "t001.png").unlink()
    assert cli(["cache", "--data", str(data), f"cache.dir={tmp_path / 'cache'}",
                f"folds.dir={tmp_path / 'folds'}"]) == 1
    assert "t001.png" in capsys.readouterr().err


def test_training_with_the_cache_gives_the_same_model(tmp_path):
    """cache.enabled changes speed only: the same weights and validation probabilities."""
    results = []
    for enabled in (False, True):
        config = tiny(tmp_path / str(enabled), extra=[f"cache.enabled={enabled}",
                                                      f"cache.dir={tmp_path / 'cache'}"])
        folds = read_folds(config)
        spec = RunSpec(part=Part(tmp_path / str(enabled) / "run"),
                       train_rows=Rows.of(folds[folds.fold != 0]),
                       valid_rows=Rows.of(folds[folds.fold == 0]), seed=0, tag="fold 0", inputs={})
        trainer = make_trainer(config, spec)
        loader = trainer.parts.train_loader.dataset.loader
        assert isinstance(loader, CachedReader if enabled else Preprocess)
        trainer.train_epoch(0)
        results.append(trainer.validate()[1])
    np.testing.assert_array_equal(results[0], results[1])
    assert len(list((tmp_path / "cache").glob("*/*/*.npy"))) == 18  # every labelled image, once


def test_loaders_survive_pickling_into_dataloader_workers(tmp_path):
    """DataLoader workers started with `spawn` receive the dataset, and its loader, pickled."""
    path, = write_photos(tmp_path / "img", 1)
    for loader in (reader_for(tmp_path), cache_module.preprocess_of(CacheConfig(), AugmentConfig())):
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(loader))(path), loader(path))


def test_tta_logits_are_the_same_stacked_or_one_view_per_pass(monkeypatch):
    """A GPU runs all views in one pass, a CPU one view per pass: both give the same logits."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    batches = [(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), torch.zeros(2))] * 2
    normalizer = Normalizer([0.5] * 3, [0.25] * 3)
    views = tta_views(TTAConfig(views="d4"), 8)
    model(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer
    outputs = []
    for per_pass in (lambda device, count: 1, lambda device, count: count):
        monkeypatch.setattr(engine, "views_per_pass", per_pass)
        outputs.append(predict_logits(model, normalizer, batches, torch.device("cpu"), dtype=None,
                                      views=views))
    assert outputs[0].shape == (8, 4, 3)
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
