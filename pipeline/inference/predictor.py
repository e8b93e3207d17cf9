"""Test-time-augmented inference of a trained checkpoint: a pure predictor.

    predictor = CheckpointPredictor(part.best, tta)          # a best.pt, ready to predict
    predicted = predictor.predict(paths, "fold0 test")       # (N, C) probs (+ grades), reduced

The views of a batch are stacked on the batch dimension (all in one forward pass on a GPU) and
their probabilities averaged (mean, or geometric mean). It knows nothing of experiments, freshness
or locks: `make predict` (pipeline/inference/experiment.py) and the offline `infer` both predict
through it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax

from pipeline.base import distributed
from pipeline.base.config import AugmentConfig, CacheConfig, Config, PredictConfig, TTAConfig
from pipeline.base.utils import PipelineError
from pipeline.data.augment import Normalizer, at_size, build_transforms
from pipeline.data.dataset import ImageDataset
from pipeline.data.imagecache import image_loader
from pipeline.ensembling.decode import grade_to_probs
from pipeline.inference.engine import (
    amp_dtype,
    autocast,
    inference_batch_size,
    loader_settings,
    make_loader,
    model_from_checkpoint,
    predict_logits,
    resolve_device,
)

View = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) -> (B, C, H, W)


# --------------------------------------------------------------------------------------------
# Views


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def _vflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-2)


def _dihedral(k: int, flip: bool) -> View:
    def view(x: torch.Tensor) -> torch.Tensor:
        x = torch.rot90(x, k, dims=(-2, -1))
        return x.flip(-1) if flip else x
    return view


def _shift(dx: int, dy: int) -> View:
    """Translate by (dx, dy) pixels; the uncovered border is black (0), as in training's Affine."""
    def view(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
        top, left = max(-dy, 0), max(-dx, 0)
        return padded[..., top:top + h, left:left + w]
    return view


def _zoom(factor: float) -> View:
    """Scale about the centre by `factor` (>1 zooms in), keeping the size; black border."""
    def view(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
        scaled = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        if factor >= 1:
            top, left = (nh - h) // 2, (nw - w) // 2
            return scaled[..., top:top + h, left:left + w]
        pad_h, pad_w = h - nh, w - nw
        return F.pad(scaled, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return view


def tta_views(tta: TTAConfig, image_size: int) -> list[View]:
    """The views of `tta.views`; the first is always the image itself."""
    if tta.views == "none":
        return [_identity]
    if tta.views == "hflip":
        return [_identity, _hflip]
    if tta.views == "vflip":
        return [_identity, _vflip]
    if tta.views == "flips":
        return [_identity, _hflip, _vflip, _dihedral(2, False)]  # rot180 = both flips
    if tta.views == "d4":
        return [_dihedral(k, flip) for flip in (False, True) for k in range(4)]
    if tta.views == "shifts":
        step = max(1, round(tta.shift * image_size))
        return [_identity] + [_shift(dx, dy) for dx, dy in
                              ((step, 0), (-step, 0), (0, step), (0, -step))]
    return [_identity, _zoom(1 + tta.scale), _zoom(1 - tta.scale)]  # scales


@dataclass(frozen=True)
class Predicted:
    """A model's predictions of N images: class probabilities and, from a grade output, grades."""

    probs: np.ndarray  # (N, C)
    grade: np.ndarray | None  # (N,), clipped to [0, C-1]; None for a classification head


def reduce_views(logits: np.ndarray, how: str, head: str = "classification",
                 n_classes: int | None = None) -> Predicted:
    """(V, N, K) outputs -> the images' predictions, the TTA views reduced: the mean of the views'
    class probabilities, or their geometric mean (renormalised); a grade output's grades are
    averaged over the views (then clipped)."""
    n_classes = n_classes or logits.shape[-1]
    grade = None
    if head in ("regression", "both"):
        column = 0 if head == "regression" else n_classes
        grade = np.clip(logits[..., column].astype(np.float64).mean(axis=0), 0, n_classes - 1)
    if head == "regression":
        return Predicted(grade_to_probs(grade, n_classes), grade)
    probs = softmax(logits[..., :n_classes].astype(np.float64), axis=-1)
    if how == "geomean":
        log_mean = np.log(np.clip(probs, 1e-12, 1)).mean(axis=0)
        return Predicted(softmax(log_mean, axis=-1), grade)
    return Predicted(probs.mean(axis=0), grade)


# --------------------------------------------------------------------------------------------
# A checkpoint, ready to predict


class CheckpointPredictor:
    """A trained checkpoint ready to predict images with TTA."""

    def __init__(self, checkpoint: Path | None, tta: TTAConfig, device_name: str = "auto",
                 workers: int | None = None, predict: PredictConfig | None = None,
                 loaded: tuple[torch.nn.Module, Config, dict] | None = None):
        # `loaded`: (model with its weights, config, {"normalization": ...}) built elsewhere (the
        # offline bundle's safetensors, pipeline/offline/infer.py) instead of read from `checkpoint`
        self.model, self.config, payload = loaded or model_from_checkpoint(checkpoint)
        # One process: device_name. Under torchrun: cuda:LOCAL_RANK (or the CPU).
        self.device = distributed.local_device(resolve_device(device_name))
        self.dtype = amp_dtype(self.device, self.config.train.amp)
        channels_last = self.device.type == "cuda" and self.config.train.channels_last
        self._place_model(channels_last)
        norm = payload["normalization"]
        self.normalizer = Normalizer(norm["mean"], norm["std"], channels_last).to(self.device)
        self.set_views(tta)
        # TTA multiplies the images of a forward pass: a batch that fits the views (engine.py)
        self.batch_size = inference_batch_size(predict or PredictConfig(),
                                               self.config.train.batch_size, len(self.views),
                                               self.device)
        self.settings = loader_settings(self.device, workers)

    def _place_model(self, channels_last: bool) -> None:
        self.model.to(self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one input size: cuDNN picks its fastest kernels

    def set_views(self, tta: TTAConfig) -> None:
        """The TTA views, and the size predicted at: tta.image_size, else the training's."""
        trained = self.config.augment
        self.augment = at_size(trained, tta.image_size or trained.image_size)
        self.transform = build_transforms(self.augment, train=False)
        self.views = tta_views(tta, self.augment.image_size)
        self.reduce = tta.reduce

    def read_settings(self) -> tuple[CacheConfig, AugmentConfig]:
        """How an image is read before the transform: the checkpoint's cache settings (the
        preprocessing it was trained with), at the size predicted at when that is larger
        (tta.image_size: never shrunk below it first)."""
        cache, size = self.config.cache, self.augment.image_size
        if cache.size is not None and cache.size < size:
            cache = cache.model_copy(update={"size": size})
        return cache, self.augment

    def reader(self, paths: Sequence[Path], desc: str = "cache") -> Callable:
        """The image loader of `paths` under read_settings (the cache built where enabled)."""
        cache, augment = self.read_settings()
        return image_loader(cache, augment, paths, desc=desc,
                            max_pixels=self.config.data.max_image_pixels)

    def predict(self, paths: Sequence[Path], desc: str) -> Predicted:
        """The images' predictions (probabilities (N, C), grades), TTA views reduced; in `paths`
        order.

        Under torchrun each rank predicts a contiguous shard of the paths and every rank gets
        all N rows back, in order.
        """
        dataset = ImageDataset(paths, None, self.transform, self.reader(paths, f"{desc} cache"))
        loader = make_loader(dataset, self.batch_size,
                             distributed.shard_sampler(len(dataset)), self.settings)
        try:
            shard = predict_logits(self.model, self.normalizer, loader, self.device,
                                   dtype=self.dtype, desc=desc, views=self.views)
        except torch.OutOfMemoryError:
            smaller = self.batch_size // 2
            remedy = (f"set predict.batch_size={smaller} (ARGS=predict.batch_size={smaller}); "
                      f"it changes no prediction" if smaller else
                      "predict with fewer TTA views (TTA=) or a smaller tta.image_size")
            raise PipelineError(f"{desc}: out of GPU memory at {self.batch_size} images a batch "
                                f"({len(self.views) or 1} view(s) each): {remedy}") from None
        logits = distributed.gather_shards(shard, axis=1)  # (V, N, C)
        return reduce_views(logits, self.reduce, self.config.model.head,
                            len(self.config.data.classes))


@torch.no_grad()
def pooled_features(checkpoint: Path, paths: Sequence[Path]) -> np.ndarray:
    """(N, D) the model's pooled features of the images (what its classifier sees): for the
    audit's train/test shift on the model's own view of the images."""
    predictor = CheckpointPredictor(checkpoint, TTAConfig())
    model, config = predictor.model.eval(), predictor.config
    read = image_loader(config.cache, config.augment, paths, max_pixels=config.data.max_image_pixels)
    loader = make_loader(ImageDataset(paths, None, predictor.transform, read),
                         predictor.batch_size, None, predictor.settings)
    features = []
    for images, _ in loader:
        batch = predictor.normalizer(images.to(predictor.device))
        with autocast(predictor.device, predictor.dtype):
            pooled = model.forward_head(model.forward_features(batch), pre_logits=True)
        features.append(pooled.float().flatten(1).cpu().numpy())
    return np.concatenate(features)


# --------------------------------------------------------------------------------------------
# Predicting a part's files
