"""Test-time-augmented inference of each fold's best checkpoint.

    python -m pipeline predict --data digits --model resnet18 [--folds 0,2] [tta.views=d4]
    make predict MODEL=resnet18 [TTA=d4]

For fold k: predicts the test set (runs/<competition>/<experiment>/fold<k>/test_probs.csv) and,
again, its own validation fold (oof_tta.csv), so the out-of-fold score with and without TTA can be
compared; predict.manifest.json records the checkpoint, test set and TTA settings they were made
from, so a retrained fold, a new test image or new TTA settings are predicted again.
The views of a batch are stacked on the batch dimension and run in one forward pass; their
probabilities are averaged (mean, or geometric mean). TTA settings are read at predict time: a
new `TTA=` needs no retraining.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline import distributed
from pipeline.augment import Normalizer, build_transforms
from pipeline.cache import image_loader
from pipeline.config import Config, PredictConfig, TTAConfig
from pipeline.data import ImageDataset, load_test_ids, test_image_paths, train_image_paths
from pipeline.engine import (
    amp_dtype,
    grade_to_probs,
    inference_batch_size,
    loader_settings,
    make_loader,
    model_from_checkpoint,
    predict_logits,
    resolve_device,
    softmax,
)
from pipeline.folds import read_folds
from pipeline.metrics import score
from pipeline.provenance import (Freshness, file_digest, fingerprint, freshness,
                                 images_fingerprint, manifest_path, read_manifest,
                                 write_manifest)
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


def reduce_views(logits: np.ndarray, how: str, head: str = "classification",
                 n_classes: int | None = None) -> np.ndarray:
    """(V, N, K) outputs -> (N, C) probabilities: mean of the views' probabilities, or their
    geometric mean (renormalised); a regression head's grades are averaged over the views."""
    if head == "regression":
        return grade_to_probs(logits[..., 0].astype(np.float64).mean(axis=0), n_classes)
    probs = softmax(logits.astype(np.float64))
    if how == "geomean":
        log_mean = np.log(np.clip(probs, 1e-12, 1)).mean(axis=0)
        return softmax(log_mean)
    return probs.mean(axis=0)


# --------------------------------------------------------------------------------------------
# Prediction


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
        on_cuda = self.device.type == "cuda"
        channels_last = on_cuda and self.config.train.channels_last
        self.model.to(self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if on_cuda:
            torch.backends.cudnn.benchmark = True  # one input size: cuDNN picks its fastest kernels
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

    def predict(self, paths: Sequence[Path], desc: str) -> np.ndarray:
        """Probabilities (N, C), TTA views reduced; in `paths` order.

        Under torchrun each rank predicts a contiguous shard of the paths and every rank gets
        all N rows back, in order.
        """
        # The checkpoint's cache settings: the preprocessing it was trained with
        read = image_loader(self.config.cache, self.config.augment, paths, desc=f"{desc} cache")
        dataset = ImageDataset(paths, None, self.transform, read)
        loader = make_loader(dataset, self.batch_size,
                             distributed.shard_sampler(len(dataset)), self.settings)
        shard = predict_logits(self.model, self.normalizer, loader, self.device, self.dtype,
                               desc=desc, views=self.views)
        logits = distributed.gather_shards(shard, axis=1)  # (V, N, C)
        return reduce_views(logits, self.reduce, self.config.model.head,
                            len(self.config.data.classes))


def probability_frame(ids: Sequence[str], probs: np.ndarray, classes: list[str],
                      labels: Sequence[str] | None = None, head: str = "classification") -> pd.DataFrame:
    """id[, label], one probability column per class and, for a regression head, `grade` next to
    them: the predicted grade, which the class columns encode as a two-point distribution
    (engine.grade_to_probs), so every later stage reads them as probabilities."""
    frame = pd.DataFrame(probs, columns=classes)
    if head == "regression":
        frame["grade"] = probs @ np.arange(len(classes), dtype=np.float64)
    if labels is not None:
        frame.insert(0, "label", list(labels))
    frame.insert(0, "id", list(ids))
    return frame


def read_probs(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str, "label": str}, keep_default_na=False)


def read_test_set(data) -> tuple[list[str], str]:
    """(test ids, fingerprint of the ids in order and of each test image's size and mtime)."""
    ids = load_test_ids(data)
    return ids, fingerprint([ids, images_fingerprint(ids, test_image_paths(data, ids))])


def predict_inputs(config: Config, out_dir: Path, test_fingerprint: str,
                   valid: pd.DataFrame | None) -> dict[str, str]:
    """What a prediction is made from: the checkpoint's bytes, the test set, the TTA settings and,
    for the out-of-fold rows, the fold assignment."""
    inputs = {"checkpoint": file_digest(out_dir / "best.pt"), "test": test_fingerprint,
              "tta": fingerprint(config.tta.model_dump())}
    if valid is not None:
        inputs["folds"] = fingerprint(valid[["id", "label"]].astype(str).to_numpy().tolist())
    return inputs


def recorded_tta(out_dir: Path) -> TTAConfig | None:
    """The TTA settings a folder's predictions were made with (from its predict manifest)."""
    manifest = read_manifest(manifest_path(out_dir, "predict"))
    if manifest is None or "tta" not in manifest.details:
        return None
    return TTAConfig(**manifest.details["tta"])


def prediction_freshness(config: Config, out_dir: Path, test_fingerprint: str,
                         valid: pd.DataFrame | None) -> Freshness:
    """Whether out_dir's predictions are current, under the TTA they were made with: TTA is
    chosen at predict time (`make predict TTA=d4`), so a later stage takes the views as made
    and checks only that the checkpoint, the test set and the rows are the ones of now."""
    tta = recorded_tta(out_dir) or config.tta
    made = config.model_copy(update={"tta": tta})
    return freshness(manifest_path(out_dir, "predict"),
                     predict_inputs(made, out_dir, test_fingerprint, valid))


def predict_dir(config: Config, out_dir: Path, test_ids: list[str], test_fingerprint: str,
                valid: pd.DataFrame | None, force: bool) -> dict | None:
    """Predict the test set (and the validation rows) with out_dir/best.pt, unless current.

    Stale predictions (a retrained checkpoint, a changed test set, other TTA settings) are
    simply made again: nothing is lost.
    """
    checkpoint = out_dir / "best.pt"
    outputs = [out_dir / "test_probs.csv"] + ([out_dir / "oof_tta.csv"] if valid is not None else [])
    inputs = predict_inputs(config, out_dir, test_fingerprint, valid)
    details = {"tta": config.tta.model_dump(), "test images": len(test_ids)}
    fresh = freshness(manifest_path(out_dir, "predict"), inputs)
    current = fresh.current and not force
    if distributed.broadcast_from_main(current):  # under torchrun: every rank skips, or none
        print(f"{out_dir}: predictions are current (FORCE=1 redoes them)")
        return None
    if fresh.state == "stale" and not force:
        print(f"{out_dir}: predicting again: {fresh.why()}")
    predictor = CheckpointPredictor(checkpoint, config.tta, config.train.device, config.train.workers,
                                    config.predict)
    classes = predictor.config.data.classes
    data = config.data
    tag = out_dir.name
    test_paths = test_image_paths(data, test_ids)
    test_probs = predictor.predict(test_paths, f"{tag} test x{len(predictor.views)}")
    if valid is not None:
        valid_paths = train_image_paths(data, valid["id"].tolist())
        oof_probs = predictor.predict(valid_paths, f"{tag} oof x{len(predictor.views)}")
    if not distributed.is_main():
        return None  # rank 0 writes
    head = predictor.config.model.head
    write_csv_atomic(probability_frame(test_ids, test_probs, classes, head=head), outputs[0])
    result = {"run": tag, "views": len(predictor.views), "test images": len(test_ids)}
    if valid is not None:
        write_csv_atomic(probability_frame(valid["id"], oof_probs, classes, valid["label"], head),
                         outputs[1])
        plain = read_probs(out_dir / "oof.csv")
        metric = data.metric
        positive = data.positive_index if len(classes) == 2 else 1
        result[f"oof {metric}"] = score(metric, valid["target"], plain[classes].to_numpy(), positive)
        result[f"oof {metric} tta"] = score(metric, valid["target"], oof_probs, positive)
    write_manifest(manifest_path(out_dir, "predict"), "predict", inputs, outputs, details)
    return result


def run_predict(config: Config, folds_to_predict: list[int] | None, force: bool) -> None:
    """Predict every current fold (or the chosen ones); a fold not trained under the inputs of
    now is refused: its predictions would not belong to this experiment."""
    from pipeline.train import current_folds

    folds = read_folds(config)
    trained = current_folds(config, folds)
    if not trained:
        raise PipelineError(f"no current trained folds in {config.run_dir}: run `make train "
                            f"DATA={config.data.name} MODEL={config.run_name}` first "
                            f"(`make runs` shows what is stale and why)")
    selected = trained if folds_to_predict is None else folds_to_predict
    untrained = sorted(set(selected) - set(trained))
    if untrained:
        raise PipelineError(f"fold(s) {untrained} of {config.run_name} are not trained under the "
                            f"current inputs: run `make train MODEL={config.run_name} "
                            f"FOLDS={','.join(map(str, untrained))}` first")
    test_ids, test_fingerprint = read_test_set(config.data)
    results = []
    for fold in selected:
        valid = folds[folds["fold"] == fold]
        result = predict_dir(config, config.run_dir / f"fold{fold}", test_ids, test_fingerprint,
                             valid, force)
        if result:
            results.append(result)
    if results:
        print(format_table([list(r.values()) for r in results], list(results[0])))
    if distributed.is_main():
        print_tta_gain(config, trained)


def print_tta_gain(config: Config, folds: list[int]) -> None:
    """The out-of-fold score over every predicted fold, without and with TTA."""
    metric, classes = config.data.metric, config.data.classes
    index = {c: i for i, c in enumerate(classes)}
    frames = {name: [read_probs(config.run_dir / f"fold{k}" / name) for k in folds
                     if (config.run_dir / f"fold{k}" / name).is_file()]
              for name in ("oof.csv", "oof_tta.csv")}
    if not frames["oof_tta.csv"] or len(frames["oof_tta.csv"]) != len(frames["oof.csv"]):
        return
    scores = {}
    for name, parts in frames.items():
        oof = pd.concat(parts)
        scores[name] = score(metric, oof["label"].map(index).to_numpy(), oof[classes].to_numpy())
    if config.tta.views == "none":
        print(f"{config.run_name}: out-of-fold {metric} {scores['oof.csv']:.4f} (tta.views=none; "
              f"TTA=flips, d4, shifts or scales tries test-time augmentation)")
        return
    print(f"{config.run_name}: out-of-fold {metric} {scores['oof.csv']:.4f} without TTA, "
          f"{scores['oof_tta.csv']:.4f} with {config.tta.views} TTA "
          f"({scores['oof_tta.csv'] - scores['oof.csv']:+.4f})")


def main(args) -> None:
    from pipeline.train import seed_configs

    if args.model is None:
        raise PipelineError("predict needs a model: make predict MODEL=resnet18")
    if getattr(args, "parallel", None) or getattr(args, "gpus", None):
        raise PipelineError("--parallel/--gpus are for train; predict uses several GPUs through "
                            "torchrun: make predict GPUS=4")
    for config in seed_configs(args):
        with distributed.session(resolve_device(config.train.device)):
            run_predict(config, args.folds, args.force)
