"""The README's before/after picture of the fundus preprocessing (crop_circle, ben_graham).

    python -m bench.fundus_picture            # writes bench/fundus_before_after.png (< 100 KB)

A synthetic retina photo (bench.synthetic_fundus: disc, optic disc, macula, vessels, no download),
made harder the way real ones are: a wide black frame, the disc cut at the top and bottom, uneven
lighting from one side, and a few small lesions (dark red haemorrhages, yellow exudates). It goes
through the pipeline's own preprocessing step (pipeline/stages/cache.py, `Preprocess`), the one that both
the cache and the uncached loader run, so the picture shows exactly what a model is fed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from bench import synthetic_fundus
from pipeline.base.config import AugmentConfig, CacheConfig
from pipeline.data.imagecache import preprocess_of

OUTPUT = Path(__file__).resolve().parent / "fundus_before_after.png"
PANEL = 256  # pixels per panel side: the input size the README's settings use in the picture
COLOURS = 160  # palette size of the saved PNG: keeps the file commit-sized (< 100 KB)


def retina_photo(seed: int = 3, height: int = 560, width: int = 760) -> np.ndarray:
    """An RGB uint8 fundus photo on a wide black frame, lit unevenly, with small lesions."""
    rng = np.random.default_rng(seed)
    side = 600  # the disc's square, cut to `height` rows: cameras clip the top and bottom
    eye = synthetic_fundus(rng, side, side).astype(np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    inside = eye.max(axis=-1) > 0
    for _ in range(10):  # haemorrhages (dark red) and exudates (yellow), 2-6 px
        y, x = rng.uniform(0.25, 0.75, 2) * side
        spot = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * rng.uniform(2, 6) ** 2))
        colour = (np.array([-70, -60, -30]) if rng.random() < 0.5 else np.array([60, 55, -10]))
        eye += spot[..., None] * colour * inside[..., None]
    eye *= (0.55 + 0.7 * xx / side)[..., None]  # light from the right, half as bright on the left
    eye = np.clip(eye, 0, 255) * inside[..., None]
    photo = np.zeros((height, width, 3), np.float32)
    top, left = (side - height) // 2, (width - side) // 2
    photo[:, left:left + side] = eye[top:top + height]
    return photo.round().astype(np.uint8)


def panels(photo: np.ndarray, size: int = PANEL) -> list[tuple[str, np.ndarray]]:
    """(title, RGB image) for the raw photo and each setting, through pipeline.stages.cache.Preprocess."""
    augment = AugmentConfig(image_size=size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eye.png"
        cv2.imwrite(str(path), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
        steps = [("before: the photo, resized", {}),
                 ("crop_circle: true", {"crop_circle": True}),
                 ("+ ben_graham: true", {"crop_circle": True, "ben_graham": True})]
        return [(title, preprocess_of(CacheConfig(**settings), augment)(path))
                for title, settings in steps]


def render(images: list[tuple[str, np.ndarray]], size: int = PANEL) -> np.ndarray:
    """The panels side by side, each with its title above it, on white."""
    title_height, gap = 26, 8
    canvas = np.full((title_height + size, len(images) * (size + gap) - gap, 3), 255, np.uint8)
    for index, (title, image) in enumerate(images):
        left = index * (size + gap)
        square = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        canvas[title_height:, left:left + size] = square
        cv2.putText(canvas, title, (left + 4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return canvas


def write_picture(path: Path = OUTPUT, seed: int = 3) -> Path:
    canvas = render(panels(retina_photo(seed)))
    # A palette PNG: the photo's noise makes a full-colour PNG ~4x larger for no visible gain.
    Image.fromarray(canvas).quantize(COLOURS, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fundus_picture",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    path = write_picture(args.output, args.seed)
    print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
