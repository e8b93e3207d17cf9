"""Batches that fit the device: a loaded batch goes through the model in passes.

    passes = pass_slices(len(images), micro)          # [slice(0, 16), slice(16, 32)]
    micro = micro_batch(parts, train, cache=path)     # train.micro_batch: auto measures, on CUDA
    micro = halved(micro, batch, where)               # after an out-of-memory error mid-run

The loader yields train.batch_size images a batch whatever happens here, so the images, their
order, their augmentations and the optimiser's steps stay the seed's; only how many go through
the model at once changes, and the passes' gradients are summed before the step. Lightning's
and Ultralytics' batch finders change the batch itself, and with it the result; accumulating
over passes keeps it, as the issue of GPU-independent results asks.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from pipeline.base import distributed
from pipeline.base.config import TrainConfig
from pipeline.base.log import log
from pipeline.base.utils import PipelineError, warn, write_text_atomic
from pipeline.inference.engine import autocast
from pipeline.training.losses import image_weights
from pipeline.training.parts import Parts

# Of the GPU's memory, the share a pass may plan to use: the allocator's fragmentation and the
# validation pass (twice the batch, no gradients) need the rest.
MEMORY_SHARE = 0.85


# What CUDA libraries say when they cannot allocate: cuBLAS and cuDNN raise a plain RuntimeError,
# not torch's OutOfMemoryError, when their workspace does not fit
OUT_OF_MEMORY = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                 "CUDNN_STATUS_ALLOC_FAILED")


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` says the GPU ran out of memory (halving the pass may help)."""
    return isinstance(err, torch.OutOfMemoryError) or any(words in str(err)
                                                          for words in OUT_OF_MEMORY)


def pass_slices(n: int, micro: int | None) -> list[slice]:
    """The passes of a batch of n images: slices of at most `micro` (None: one pass)."""
    if not micro or micro >= n:
        return [slice(0, n)]
    return [slice(start, min(start + micro, n)) for start in range(0, n, micro)]


def halved(micro: int | None, batch: int, where: str) -> int:
    """The pass after an out-of-memory error at `micro` images (None: the whole `batch`)."""
    current = min(micro or batch, batch)
    if current <= 1:
        raise PipelineError(f"{where}: out of GPU memory at one image a pass: the model does not "
                            f"fit at this size. Lower augment.image_size (and the sizes of "
                            f"augment.sizes), choose a smaller model, or, where it is off, "
                            f"set train.amp=true (bf16/fp16 halve the activations)")
    return current // 2


def pass_after_out_of_memory(micro: int | None, batch: int, where: str, last: Path) -> int:
    """The pass to go on with after a training pass ran out of GPU memory at `micro` images
    (None: the whole batch). Under torchrun every rank would have to change together, so there
    it stops, naming the setting to run again with (the fold resumes from last.pt)."""
    current, smaller = min(micro or batch, batch), halved(micro, batch, where)
    if distributed.is_distributed():
        raise PipelineError(f"{where}: out of GPU memory at {current} images a pass on rank "
                            f"{distributed.rank()}. Run again with train.micro_batch={smaller} "
                            f"(or auto): the fold resumes from {last}")
    release_memory()
    passes = len(pass_slices(batch, smaller))
    warn(f"{where}: out of GPU memory at {current} images a pass: going on at {smaller} "
         f"({passes} passes a batch of {batch}, the same batches and optimiser steps) from "
         f"{last}; train.micro_batch={smaller} starts there next time")
    return smaller


def backward_in_passes(parts: Parts, images: torch.Tensor, targets: torch.Tensor,
                       micro: int | None, *, scale: float, last: bool) -> torch.Tensor:
    """Gradients of one loaded batch's loss (times `scale`) added to the parameters', in passes
    of at most `micro` images, each pass's loss weighted by its share of the batch; returns the
    batch's mean loss. With one pass this is the plain `(loss * scale).backward()`."""
    passes = pass_slices(len(images), micro)
    shares = loss_shares(parts.criterion, targets, passes)
    mean = torch.zeros((), device=parts.device)
    for index, (part, share) in enumerate(zip(passes, shares)):
        # Under DDP the gradients are averaged across ranks only on the step's last pass.
        final = last and index == len(passes) - 1
        sync = contextlib.nullcontext() if final or not hasattr(parts.forward_model, "no_sync") \
            else parts.forward_model.no_sync()
        with sync:
            with autocast(parts.device, parts.dtype):
                loss = parts.criterion(parts.forward_model(images[part]).float(), targets[part])
            parts.scaler.scale(loss * share * scale).backward()
        mean += loss.detach() * share
    return mean


def loss_shares(criterion: torch.nn.Module, targets: torch.Tensor,
                passes: list[slice]) -> list[float | torch.Tensor]:
    """Each pass's share of its batch's loss. The losses are means weighted by each image's
    class weight (losses.py), so a pass's share is its part of the batch's weight sum (its
    part of the images without class weights): the shares' sum of pass losses is then the
    batch's loss, and its gradient the gradient of the whole batch."""
    if len(passes) == 1:
        return [1.0]
    class_weight = getattr(criterion, "class_weight", None)
    if class_weight is None:
        return [(part.stop - part.start) / len(targets) for part in passes]
    weights = image_weights(class_weight, targets)
    return [weights[part].sum() / weights.sum() for part in passes]


def largest_fitting(fits: Callable[[int], bool], batch: int) -> int:
    """The largest of batch, batch/2, batch/4, ..., 1 images a pass for which `fits` says yes
    (it answers False, or raises torch's OutOfMemoryError, for a pass too large)."""
    n = batch
    while True:
        try:
            if fits(n):
                return n
        except RuntimeError as err:
            if not out_of_memory(err):
                raise  # the traceback's tensors go with this block; freed before the next try
        release_memory()
        if n == 1:
            raise PipelineError("train.micro_batch: auto: not even one image a pass fits the "
                                "GPU. Lower augment.image_size (and the sizes of augment.sizes) "
                                "or choose a smaller model")
        n //= 2


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def micro_batch(parts: Parts, train: TrainConfig, *, cache: Path | None, key: str,
                tag: str) -> int | None:
    """The images a pass: train.micro_batch as set, or for `auto` on CUDA the largest that fits
    (looked up in `cache` under `key`, else measured and kept there); None: the whole batch."""
    if train.micro_batch != "auto":
        return train.micro_batch
    if parts.device.type != "cuda":
        return None  # host memory is not the limit a pass is sized by
    batch = distributed.per_rank_batch(train.batch_size)
    if distributed.is_distributed() and train.sync_bn:
        raise PipelineError("train.micro_batch: auto under torchrun with train.sync_bn: the "
                            "probe's passes would be collectives that an out-of-memory rank "
                            "leaves unmatched; set train.micro_batch=<images a pass> instead")
    known = read_probes(cache).get(key)
    if known is None:
        memory = GpuMemory(parts.device)
        known = largest_fitting(lambda n: fits_on_every_rank(lambda: pass_fits(parts, n, memory)),
                                batch)
        remember_pass(cache, key, known)
    passes = len(pass_slices(batch, known))
    log.info(f"{tag}: train.micro_batch: auto -> {known} images a pass ({passes} a batch of "
             f"{batch}{' per GPU' if distributed.is_distributed() else ''}; measured once per "
             f"GPU, model, size and precision: {cache})")
    return None if known >= batch else known


def fits_on_every_rank(probe: Callable[[], bool]) -> bool:
    """Whether a pass fits on every rank (each probes its own GPU; under torchrun they agree,
    so every rank takes the same pass): an out-of-memory error is a no, never an error that
    would leave the other ranks waiting."""
    try:
        fits = probe()
    except RuntimeError as err:
        if not out_of_memory(err):
            raise
        fits = False
    return distributed.all_sum([0.0 if fits else 1.0])[0] == 0


def remember_pass(cache: Path | None, key: str, images: int) -> None:
    """Keep `images` a pass under `key` (rank 0; a lock: folds side by side share the file)."""
    if cache is None or not distributed.is_main():
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{cache}.lock"):
        write_text_atomic(cache, json.dumps({**read_probes(cache), key: images}, indent=1))


def read_probes(cache: Path | None) -> dict[str, int]:
    if cache is None or not cache.is_file():
        return {}
    try:
        return json.loads(cache.read_text())
    except ValueError:  # a cache is never worth an error: measure again
        return {}


def probe_key(parts: Parts, train: TrainConfig, *, model: str, stem: str, image_size: int,
              n_classes: int) -> str:
    """What the largest pass depends on: the GPU, the model built, the size, the precision."""
    gpu = (torch.cuda.get_device_name(parts.device) if parts.device.type == "cuda"
           else parts.device.type)
    return "|".join(str(part) for part in (
        gpu, model, stem, image_size, n_classes, parts.dtype, train.channels_last,
        train.compile, train.optimizer, train.ema, distributed.per_rank_batch(train.batch_size)))


class GpuMemory:
    """The three readings of a CUDA device's memory that the probe takes."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def total(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory


def pass_fits(parts: Parts, n: int, memory: GpuMemory) -> bool:
    """One forward and backward pass of n images of the real size through the real model, loss
    and precision: True when its peak memory and the optimiser's state stay within the GPU's
    MEMORY_SHARE. The weights and BatchNorm statistics are left as they were."""
    # The bare model: under torchrun, DDP's forward would wait for the other ranks' probes.
    device, model, dataset = parts.device, parts.model, parts.train_loader.dataset
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    image, _ = dataset[(0, 0)]  # seeded: no generator is drawn from
    images = parts.normalizer(image.unsqueeze(0).repeat(n, 1, 1, 1).to(device))
    targets = torch.as_tensor(dataset.targets[np.arange(n) % len(dataset)]).to(device)
    if parts.mixer is not None and n % 2 == 0:
        images, targets = parts.mixer(images, targets)
    memory.reset_peak()
    model.train()
    try:
        with autocast(device, parts.dtype):
            loss = parts.criterion(model(images).float(), targets)
        parts.scaler.scale(loss).backward()
        peak = memory.peak()
    finally:
        parts.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, value in model.named_buffers():
                value.copy_(buffers[name])
    return peak + optimizer_state_bytes(parts.optimizer) <= MEMORY_SHARE * memory.total()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """What the optimiser's state will take once it steps (none is made before the first step):
    Adam's two moments, SGD's momentum, in the parameters' precision."""
    if optimizer.state:
        return 0  # already allocated, and counted in the peak
    moments = 1 if isinstance(optimizer, torch.optim.SGD) else 2
    return moments * sum(p.numel() * p.element_size()
                         for group in optimizer.param_groups for p in group["params"]
                         if p.requires_grad)
