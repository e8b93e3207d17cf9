"""Test-time-augmented inference of a trained checkpoint, and predicting a part's files.

    predictor = CheckpointPredictor(part.best, tta)          # a best.pt, ready to predict
    predicted = predictor.predict(paths, "fold0 test")       # (N, C) probs (+ grades), reduced
    predict_experiment(config, layout, folds, None, force, read_test_set(config.data))
                                                             # every current fold: `make predict`

For fold k `predict_part` writes the test set's probabilities (fold<k>/test_probs.csv) and, again,
its own validation fold's (oof_tta.csv), so the out-of-fold score with and without TTA can be
compared; predict.manifest.json records the checkpoint, test set and TTA settings they were made
from, so a retrained fold, a new test image or new TTA settings are predicted again. The views of
a batch are stacked on the batch dimension (all in one forward pass on a GPU) and their
probabilities averaged (mean, or geometric mean). TTA settings are read at predict time: a new
`TTA=` needs no retraining. `make predict`, `make refit`, `make pseudo` and the offline `infer`
all predict through here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.special import softmax

from pipeline import distributed
from pipeline.augment import Normalizer, build_transforms
from pipeline.config import Config, PredictConfig, TTAConfig
from pipeline.data import ImageDataset, test_image_paths, train_image_paths
from pipeline.decode import grade_to_probs
from pipeline.engine import (amp_dtype, autocast, inference_batch_size, loader_settings,
                             make_loader, model_from_checkpoint, predict_logits, resolve_device)
from pipeline.imagecache import image_loader
from pipeline.layout import Experiment, Layout, Part
from pipeline.locks import holding
from pipeline.probfiles import probability_frame, read_probs
from pipeline.provenance import write_manifest
from pipeline.scoring import Scorer
from pipeline.status import (current_folds, fold_numbers, freshness, joined_oof, predict_inputs,
                             train_freshness, training_inputs)
from pipeline.utils import PipelineError, format_table, write_csv_atomic

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
        # offline bundle's safetensors, pipeline/infer.py) instead of read from `checkpoint`
        self.model, self.config, payload = loaded or model_from_checkpoint(checkpoint)
        # One process: device_name. Under torchrun: cuda:LOCAL_RANK (or the CPU).
        self.device = distributed.local_device(resolve_device(device_name))
        self.dtype = amp_dtype(self.device, self.config.train.amp)
        channels_last = self.device.type == "cuda" and self.config.train.channels_last
        self._place_model(channels_last)
        norm = payload["normalization"]
        self.normalizer = Normalizer(norm["mean"], norm["std"], channels_last).to(self.device)
        self.transform = build_transforms(self.config.augment, train=False)
        self.views = tta_views(tta, self.config.augment.image_size)
        self.reduce = tta.reduce
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
        self.views = tta_views(tta, self.config.augment.image_size)
        self.reduce = tta.reduce

    def predict(self, paths: Sequence[Path], desc: str) -> Predicted:
        """The images' predictions (probabilities (N, C), grades), TTA views reduced; in `paths`
        order.

        Under torchrun each rank predicts a contiguous shard of the paths and every rank gets
        all N rows back, in order.
        """
        # The checkpoint's cache settings: the preprocessing it was trained with
        read = image_loader(self.config.cache, self.config.augment, paths, desc=f"{desc} cache",
                            max_pixels=self.config.data.max_image_pixels)
        dataset = ImageDataset(paths, None, self.transform, read)
        loader = make_loader(dataset, self.batch_size,
                             distributed.shard_sampler(len(dataset)), self.settings)
        shard = predict_logits(self.model, self.normalizer, loader, self.device, self.dtype,
                               desc=desc, views=self.views)
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


@dataclass(frozen=True)
class PredictJob:
    """What one experiment predicts with: its TTA, where it runs, and the test set of now."""

    tta: TTAConfig
    device: str
    workers: int | None
    predict: PredictConfig
    test_ids: list[str]
    test_fingerprint: str

    @classmethod
    def of(cls, experiment: Config, test_ids: list[str], test_fingerprint: str) -> PredictJob:
        return cls(experiment.tta, experiment.train.device, experiment.train.workers,
                   experiment.predict, test_ids, test_fingerprint)


def predict_part(part: Part, job: PredictJob, data, valid: pd.DataFrame | None,
                 force: bool, scorer: Scorer) -> dict | None:
    """Predict the test set (and the validation rows) with part.best, unless current.

    Stale predictions (a retrained checkpoint, a changed test set, other TTA settings) are
    simply made again: nothing is lost. Returns the row of the stage's table (rank 0), or None.
    """
    inputs = predict_inputs(part, job.tta, job.test_fingerprint, valid)
    fresh = freshness(part.predict_manifest, inputs)
    if distributed.broadcast_from_main(fresh.current and not force):  # every rank, or none
        print(f"{part.dir}: predictions are current (FORCE=1 redoes them)")
        return None
    if fresh.state == "stale" and not force:
        print(f"{part.dir}: predicting again: {fresh.why()}")
    predictor = CheckpointPredictor(part.best, job.tta, job.device, job.workers, job.predict)
    views = len(predictor.views)
    test = predictor.predict(test_image_paths(data, job.test_ids), f"{part.name} test x{views}")
    oof = None if valid is None else predictor.predict(
        train_image_paths(data, valid["id"].tolist()), f"{part.name} oof x{views}")
    if not distributed.is_main():
        return None  # rank 0 writes
    classes = predictor.config.data.classes
    write_csv_atomic(probability_frame(job.test_ids, test.probs, classes, grade=test.grade),
                     part.test_probs)
    result = {"run": part.name, "views": views, "test images": len(job.test_ids)}
    if valid is not None:
        write_csv_atomic(probability_frame(valid["id"], oof.probs, classes, valid["label"],
                                           grade=oof.grade), part.oof_tta)
        targets = valid["target"].to_numpy()
        result[f"oof {scorer.metric}"] = scorer.score(targets, scorer.probs_of(read_probs(part.oof)))
        result[f"oof {scorer.metric} tta"] = scorer.score(targets, oof.probs)
    write_manifest(part.predict_manifest, "predict", inputs, part.predicted_outputs(),
                   {"tta": job.tta.model_dump(), "test images": len(job.test_ids)})
    return result


def predict_experiment(experiment: Config, layout: Layout, folds: pd.DataFrame,
                       folds_to_predict: list[int] | None, force: bool,
                       test: tuple[list[str], str]) -> None:
    """Predict every current fold of an experiment (or the chosen ones); a fold not trained under
    the inputs of now is refused: its predictions would not belong to this experiment."""
    exp = layout.experiment(experiment.run_name)
    with holding(exp.lock, exp.dir, "predicted"):
        _predict_folds(experiment, layout, folds, folds_to_predict, force, test)


def _predict_folds(experiment: Config, layout: Layout, folds: pd.DataFrame,
                   folds_to_predict: list[int] | None, force: bool,
                   test: tuple[list[str], str]) -> None:
    name = experiment.run_name
    refuse_stale_folds(experiment, folds, layout, folds_to_predict)
    trained = current_folds(experiment, folds, layout)
    if not trained:
        raise PipelineError(f"no current trained folds in {layout.experiment(name).dir}: run "
                            f"`make train DATA={experiment.data.name} MODEL={name}` first "
                            f"(`make runs` shows what is stale and why)")
    selected = trained if folds_to_predict is None else folds_to_predict
    untrained = sorted(set(selected) - set(trained))
    if untrained:
        raise PipelineError(f"fold(s) {untrained} of {name} are not trained under the "
                            f"current inputs: run `make train MODEL={name} "
                            f"FOLDS={','.join(map(str, untrained))}` first")
    exp, scorer = layout.experiment(name), Scorer.of(experiment.data)
    job = PredictJob.of(experiment, *test)
    results = [predict_part(exp.fold(k), job, experiment.data, folds[folds["fold"] == k],
                            force, scorer) for k in selected]
    results = [r for r in results if r]
    if results:
        print(format_table([list(r.values()) for r in results], list(results[0])))
    if distributed.is_main():
        print_tta_gain(exp, trained, experiment.tta, scorer)


def refuse_stale_folds(experiment: Config, folds: pd.DataFrame, layout: Layout,
                       chosen: list[int] | None) -> None:
    """A trained fold that is no longer current (its best.pt modified, its inputs changed) is an
    error naming it, not a fold silently left unpredicted."""
    inputs, details = training_inputs(experiment, folds, layout)
    exp = layout.experiment(experiment.run_name)
    stale = [(k, fresh) for k in (chosen or fold_numbers(folds))
             if (fresh := train_freshness(exp.fold(k), inputs, details)).state == "stale"]
    if stale:
        lines = "\n  ".join(f"fold {k}: {fresh.why()}" for k, fresh in stale)
        ks = ",".join(str(k) for k, _ in stale)
        raise PipelineError(f"{exp.dir}: trained fold(s) are stale, nothing was predicted:\n  "
                            f"{lines}\n`make train MODEL={exp.name} FOLDS={ks} FORCE=1` "
                            f"retrains them")


def print_tta_gain(exp: Experiment, folds: list[int], tta: TTAConfig, scorer: Scorer) -> None:
    """The out-of-fold score over every predicted fold, without and with TTA."""
    predicted = [k for k in folds if exp.fold(k).oof_tta.is_file()]
    if not predicted or len(predicted) != len(folds):
        return
    metric = scorer.metric
    plain = scorer.score_frame(joined_oof(exp, folds))
    with_tta = scorer.score_frame(joined_oof(exp, folds, tta=True))
    if tta.views == "none":
        print(f"{exp.name}: out-of-fold {metric} {plain:.4f} (tta.views=none; TTA=flips, d4, "
              f"shifts or scales tries test-time augmentation)")
        return
    print(f"{exp.name}: out-of-fold {metric} {plain:.4f} without TTA, {with_tta:.4f} with "
          f"{tta.views} TTA ({with_tta - plain:+.4f})")
