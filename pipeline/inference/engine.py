"""Building blocks shared by the training and prediction stages: device, loaders, precision,
checkpoints and batched inference."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from scipy.special import softmax
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler
from tqdm import tqdm

from pipeline.base import distributed
from pipeline.base.config import Config, PredictConfig, config_from_dict
from pipeline.base.utils import PipelineError, atomic_path
from pipeline.data.augment import Normalizer
from pipeline.data.images import ImageReadError
from pipeline.ensembling.decode import grade_to_probs
from pipeline.models.factory import create_model
from pipeline.models.names import built_stem
from pipeline.models.weights import load_error_gist, pickle_refusal


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"train.device={name} but CUDA is not available; use train.device=cpu")
    return device


def loader_settings(device: torch.device, workers: int | None) -> dict[str, Any]:
    """DataLoader options chosen from the machine.

    On a GPU, decoding and augmentation run in parallel with the model: one worker per core, up
    to 8, pinned memory and persistent workers. On a CPU the model needs the cores itself, so
    small machines (<= 2 cores) load in the main process.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if workers is None:
        workers = min(8, cores) if device.type == "cuda" else (0 if cores <= 2 else min(4, cores // 2))
    settings: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        settings.update(persistent_workers=True, prefetch_factor=4,
                        worker_init_fn=single_threaded_worker)
    return settings


def single_threaded_worker(worker_id: int) -> None:
    """DataLoader workers already decode in parallel, one image each: OpenCV's own thread pool
    would oversubscribe the cores (torch sets one thread per worker itself)."""
    cv2.setNumThreads(1)


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler | None,
                settings: dict[str, Any], *, drop_last: bool = False) -> DataLoader:
    sampler = sampler if sampler is not None else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      **settings)


BF16_CAPABILITY = (8, 0)  # Ampere (A100, RTX 30xx) and later compute bf16 in their tensor cores


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 on GPUs of compute capability >= 8.0 (no loss scaling needed), else fp16 (training
    then creates a GradScaler); None on the CPU or with amp off.

    Not `torch.cuda.is_bf16_supported()`: on a pre-Ampere GPU (T4, V100, P100 of Kaggle's and
    Colab's notebooks) it answers True where bf16 is merely emulated, several times slower than
    fp16 in tensor cores.
    """
    if not enabled or device.type != "cuda":
        return None
    capability = tuple(torch.cuda.get_device_capability(device))
    return torch.bfloat16 if capability >= BF16_CAPABILITY else torch.float16


def inference_batch_size(predict_cfg: PredictConfig, train_batch_size: int, n_views: int,
                         device: torch.device) -> int:
    """Images per inference batch: `predict.batch_size` when set, else so that one forward pass
    holds at most a training batch of images: train_batch_size // views on a GPU, where every
    TTA view of a batch goes through the model at once (`views_per_pass`), and train_batch_size
    on a CPU, one view per pass. Never below 1."""
    if predict_cfg.batch_size is not None:
        return predict_cfg.batch_size
    return max(1, train_batch_size // views_per_pass(device, max(1, n_views)))


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DistributedDataParallel and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def progress(loader: DataLoader, desc: str, leave: bool = False) -> tqdm:
    # Under torchrun only rank 0 draws: one bar, not one per process.
    return tqdm(loader, desc=desc, leave=leave, unit="batch", dynamic_ncols=True, mininterval=1.0,
                disable=not distributed.is_main())


@contextlib.contextmanager
def clean_image_errors() -> Iterator[None]:
    """A bad image met while loading becomes one error naming its path, not a worker traceback."""
    try:
        yield
    except ImageReadError as err:
        # From a DataLoader worker the message carries the worker's traceback; keep its last line.
        message = str(err).strip().splitlines()[-1]
        raise ImageReadError(message.split("ImageReadError: ")[-1]) from None


def views_per_pass(device: torch.device, count: int) -> int:
    """TTA views per forward pass: all of them on a GPU, where one large batch keeps it busy; one
    on a CPU, where a batch `count` times larger spills out of the caches and costs more than
    `count` times as much (d4 on resnet20: ~10x plain stacked, ~8x one view at a time)."""
    return count if device.type == "cuda" else 1


@torch.no_grad()
def predict_logits(model: torch.nn.Module, normalizer: Normalizer, loader: DataLoader,
                   device: torch.device, *, dtype: torch.dtype | None, desc: str = "predict",
                   views: Sequence | None = None, max_images: int | None = None) -> np.ndarray:
    """Logits (N, C) or, with TTA `views`, (V, N, C): on a GPU every view of a batch in one
    forward pass, on a CPU one view per pass (`views_per_pass`). `max_images`: without views,
    a batch goes through the model in passes of at most this many (training's validation,
    when its passes are split: training/fitting.py)."""
    model.eval()
    outputs = []
    with clean_image_errors():
        for images, _ in progress(loader, desc):
            images = images.to(device, non_blocking=True)
            if views:
                outputs.append(view_logits(model, normalizer, images, device, dtype=dtype, views=views))
            else:
                for part in images.split(max_images or len(images) or 1):
                    with autocast(device, dtype):
                        outputs.append(model(normalizer(part)).float())
    if not outputs:  # an empty shard: more processes than images (see distributed.gather_shards)
        return np.zeros((len(views), 0, 0) if views else (0, 0), dtype=np.float32)
    return torch.cat(outputs, dim=1 if views else 0).cpu().numpy()


@torch.no_grad()
def view_logits(model: torch.nn.Module, normalizer: Normalizer, images: torch.Tensor,
                device: torch.device, *, dtype: torch.dtype | None, views: Sequence) -> torch.Tensor:
    """Logits (V, B, K) of one batch of uint8 images (B, 3, H, W) on `device`, one row per view.

    (V*B, C, H, W): the views stacked on the batch dimension, one forward pass on a GPU, one view
    per pass on a CPU (`views_per_pass`). Views see pixel values (0..255), so shifts and zooms
    fill the border with black, as the training augmentation does; the normaliser then restores
    channels_last, which rot90 loses.
    """
    pixels = images.float()
    per_pass = views_per_pass(device, len(views))
    logits = []
    for first in range(0, len(views), per_pass):
        chosen = views[first:first + per_pass]
        stacked = normalizer(torch.cat([view(pixels) for view in chosen]))
        with autocast(device, dtype):
            logits.append(model(stacked).float())
    return torch.cat(logits).view(len(views), images.shape[0], -1)


def output_size(head: str, n_classes: int) -> int:
    """Model outputs: one logit per class, one grade (a regression head), or both: the class
    logits, then the grade."""
    return {"regression": 1, "both": n_classes + 1}.get(head, n_classes)


def outputs_to_probs(outputs: np.ndarray, head: str, n_classes: int) -> np.ndarray:
    """Model outputs (..., N, K) -> probabilities (..., N, C): softmax of the class logits, or a
    regression head's grade as `grade_to_probs` encodes it."""
    return split_outputs(outputs, head, n_classes)[0]


def split_outputs(outputs: np.ndarray, head: str,
                  n_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Model outputs (..., N, K) -> (probabilities (..., N, C), grades (..., N) or None).

    classification: (softmax, None); regression: (the grade as a two-point distribution, the
    grade); both: (softmax of the class logits, the grade output), each grade clipped to
    [0, C-1]. The grade is what a `grade` column of a probability file holds."""
    outputs = np.asarray(outputs)
    if head == "regression":
        grades = np.clip(outputs[..., 0].astype(np.float64), 0, n_classes - 1)
        return grade_to_probs(grades, n_classes), grades
    if head == "both":
        grades = np.clip(outputs[..., n_classes].astype(np.float64), 0, n_classes - 1)
        return softmax(outputs[..., :n_classes], axis=-1), grades
    return softmax(outputs, axis=-1), None


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PipelineError(f"{path} not found: train this fold first (make train)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or corrupt (a copy cut short, a full disk long ago)
        refused = pickle_refusal(path, err)
        if refused:
            raise PipelineError(f"{refused}; a checkpoint of this pipeline holds tensors only: "
                                f"train the fold again (FORCE=1)") from None
        raise PipelineError(f"cannot read checkpoint {path}: {load_error_gist(err)}. It is "
                            f"corrupt or incomplete: delete it and train the fold again "
                            f"(FORCE=1)") from None


def model_from_checkpoint(path: Path) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as (its config travels inside it)."""
    checkpoint = load_checkpoint(path)
    config = config_from_dict(checkpoint["config"])
    model = model_from_config(config)
    model.load_state_dict(checkpoint["model"])
    return model, config, checkpoint


def model_from_config(config: Config) -> torch.nn.Module:
    """The model `config` trains, without pretrained weights (never a download): the caller
    loads a checkpoint's (best.pt, or an offline bundle's safetensors)."""
    return create_model(config.model.name, output_size(config.model.head, len(config.data.classes)),
                        pretrained=False, drop_rate=config.model.drop_rate,
                        drop_path_rate=config.model.drop_path_rate,
                        stem=built_stem(config.model, config.augment.image_size)[0])
