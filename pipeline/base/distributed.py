"""Several processes of one training: DistributedDataParallel through torchrun.

    make train MODEL=resnet18 GPUS=4                      # each fold on 4 GPUs at once (DDP)
    python -m torch.distributed.run --standalone --nproc_per_node=4 -m pipeline train \
        --model resnet18                                  # the same, without make
    make train MODEL=resnet20 GPUS=0,1,2,3 PARALLEL=folds # 4 folds at once, one per GPU
    python -m pipeline train --model resnet20 --parallel folds --gpus 0,1,2,3

DDP: torchrun starts one process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE; `session`
joins them into one process group (nccl on CUDA, gloo on a CPU) and every rank runs the same
stage code, which asks this module what its share is. The conventions keep the results
independent of the number of processes W:

- `train.batch_size` is the global batch B: each rank takes B / W images per step and DDP averages
  the gradients, so the optimiser sees the gradient of the same B images as in one process; the
  learning rate needs no rescaling. Exact (up to float rounding) for a mean-reduced loss without
  class weights. A weighted loss is normalised per rank by that rank's weight sum, and BatchNorm
  computes its batch statistics per rank of B / W images unless `train.sync_bn` (CUDA only).
- Every rank draws the same single-process order of an epoch (its generator is seeded from
  (seed, epoch)); rank r takes positions r, r + W, r + 2W, ... of it (`RankOrder`), so the union of
  the ranks' k-th batches is the single-process k-th batch, image for image.
- Each image's augmentation seed comes from (seed, epoch, image index) (`SeededSampler`), not
  from the rank or the worker that loads it.
- Evaluation splits the images into W contiguous index ranges without padding (`shard_range`);
  `gather_shards` puts the results back in order on every rank, so the validation metric, early
  stopping and the best checkpoint come from the same numbers everywhere (and the decision is
  broadcast from rank 0 on top of that). DistributedSampler is not used here: it pads with
  duplicates, which would double-count images in `oof.csv`.
- Rank 0 alone writes files, prints and draws progress bars; the other ranks' stdout is dropped,
  their stderr (errors, warnings) kept. Every rank reads the checkpoints rank 0 wrote (a barrier
  follows each write), so on several machines runs/, folds/ and the data must be on a filesystem
  they all share.

torch is imported where a process group or a device is needed, not with this module: "who am
I" is asked by torch-free verbs too (`make check`, `folds`, `runs`), and a process group can
only exist once `session` (which imports torch) started it, so they learn that they run alone
without loading torch (~650 MB with its CUDA libraries).

Fold-parallel (`run_jobs`): small models leave a GPU idle; K single-process fold runs, one per
GPU (`CUDA_VISIBLE_DEVICES`), train K folds in the time of one. Each is a plain
`python -m pipeline train --folds k`, so its files are the ones a sequential run writes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.base.utils import PipelineError

if TYPE_CHECKING:
    import torch
    from torch import nn

# --------------------------------------------------------------------------------------------
# Who am I


def _group() -> Any:
    """torch.distributed while a process group is up, else None. Only `session` starts one, after
    importing torch: a process that never loaded torch.distributed has no group to ask."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes in the job (1 without torchrun)."""
    group = _group()
    return group.get_world_size() if group else 1


def rank() -> int:
    """This process's number, 0..world_size-1 over all machines."""
    group = _group()
    return group.get_rank() if group else 0


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Rank 0: the process that writes files and prints."""
    return rank() == 0


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun set it, before the process group exists (1 in a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device) -> torch.device:
    """This process's device: cuda:LOCAL_RANK when torchrun started several, else `device`."""
    import torch
    world = launched_world_size()
    if world <= 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise PipelineError(f"train.device={device} with {world} processes: each process uses its "
                            f"own GPU, cuda:LOCAL_RANK; set train.device=auto and pick the GPUs "
                            f"with CUDA_VISIBLE_DEVICES (make ... GPUS=0,1)")
    local, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= visible:
        raise PipelineError(f"process LOCAL_RANK={local} but this machine shows {visible} GPU(s); "
                            f"start at most {visible} process(es) per machine "
                            f"(GPUS / --nproc_per_node)")
    return torch.device("cuda", local)


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[None]:
    """Join the process group torchrun prepared (a no-op in a plain process), leave it at the end.

    `device` is the resolved train.device; CUDA ranks use nccl on cuda:LOCAL_RANK, CPU ranks gloo.
    """
    if launched_world_size() <= 1 or _group():
        yield
        return
    import torch
    import torch.distributed as dist
    device = local_device(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_cuda else "gloo", device_id=device if on_cuda else None)
    if is_main():
        yield
    else:
        # Every rank runs the same code; one copy of each line and table is enough.
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    # Only after success: after an error another rank may still wait in a collective with this
    # one, and leaving at once (torchrun then stops the others) beats a teardown that waits.
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Sharing the work


def per_rank_batch(global_batch: int, world: int | None = None) -> int:
    """Images per rank and step: `train.batch_size` is the global batch, split evenly."""
    world = world_size() if world is None else world
    if global_batch % world:
        suggestion = -(-global_batch // world) * world
        raise PipelineError(f"train.batch_size={global_batch} is the global batch, split over "
                            f"{world} processes; it must be a multiple of {world}, e.g. "
                            f"train.batch_size={suggestion}")
    return global_batch // world


class RankOrder:
    """This rank's share of the single-process training order: positions r, r + W, r + 2W, ...

    `base` (a RandomSampler or the balanced sampler) yields the order one process would train in;
    its generator is seeded alike on every rank, so every rank draws the same order. torch's
    DistributedSampler, without shuffling, picks this rank's positions in it. With a per-rank batch
    of b = B / W, rank r's k-th batch is positions kB + r, kB + r + W, ..., kB + r + (b-1)W, and the
    union over the ranks is positions kB .. kB + B - 1: exactly the single-process batch k.
    `drop_last` must match the loader's: then both drop the same incomplete last global batch.
    A sampler by what it does (iterable, sized), as torch's DataLoader takes one.
    """

    def __init__(self, base: Iterable[int], drop_last: bool, rank_: int | None = None,
                 world: int | None = None):
        from torch.utils.data import DistributedSampler

        self.base = base
        self.positions = DistributedSampler(
            range(len(base)), num_replicas=world_size() if world is None else world,
            rank=rank() if rank_ is None else rank_, shuffle=False, drop_last=drop_last)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        return (int(order[p]) for p in self.positions)

    def __len__(self) -> int:
        return len(self.positions)


def rank_order(base: Iterable[int], drop_last: bool) -> Iterable[int]:
    """The training sampler of this rank: `base` itself in one process."""
    return RankOrder(base, drop_last) if is_distributed() else base


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous share of n items, in order; shares differ by at most one item
    and nothing is padded (unlike DistributedSampler), so each item is predicted exactly once."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return range(r * n // w, (r + 1) * n // w)


def shard_sampler(n: int) -> range | None:
    """Evaluation sampler: None (all n in order) in one process, else this rank's `shard_range`
    (a range serves as a sampler: the DataLoader only iterates it)."""
    return shard_range(n) if is_distributed() else None


def gather_shards(local: np.ndarray, axis: int = 0) -> np.ndarray:
    """Every rank's `shard_range` results, concatenated in rank order along `axis`, on every rank.

    Identity in one process. Empty shards (fewer items than ranks) are skipped.
    """
    if not is_distributed():
        return local
    parts: list[Any] = [None] * world_size()
    _group().all_gather_object(parts, local)
    kept = [p for p in parts if p.size] or parts[:1]
    return np.concatenate(kept, axis=axis)


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over the ranks (the values themselves in one process)."""
    if not is_distributed():
        return list(values)
    import torch

    total = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    _group().all_reduce(total)
    return total.tolist()


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank: one decision, taken once."""
    if not is_distributed():
        return value
    box = [value]
    _group().broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (after rank 0 wrote what the others read)."""
    if is_distributed():
        _group().barrier()


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    Without SyncBatchNorm each rank updates its running statistics from its own images; DDP
    broadcasts rank 0's at each training forward, but the last step's update stays per rank.
    Evaluation must use the statistics that rank 0 saves in the checkpoint.
    """
    if is_distributed():
        for buffer in model.buffers():
            _group().broadcast(buffer, src=0)


def _comm_device() -> torch.device:
    # nccl moves CUDA tensors only; gloo CPU tensors.
    import torch

    if _group().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap_ddp(model: nn.Module, device: torch.device, sync_bn: bool,
             find_unused: bool) -> nn.parallel.DistributedDataParallel:
    """DistributedDataParallel around `model` (its `.module` is the model to save and evaluate).

    `sync_bn`: BatchNorm layers become SyncBatchNorm (statistics over the global batch; the
    state_dict keys stay those of BatchNorm, so checkpoints load anywhere). `find_unused`: needed
    when parameters sit out some steps, e.g. a frozen body during train.head_only_epochs.
    """
    from torch import nn

    if sync_bn:
        if device.type != "cuda":
            raise PipelineError("train.sync_bn=true needs CUDA GPUs (torch's SyncBatchNorm has no "
                                "CPU kernel); set train.sync_bn=false on a CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused)


# --------------------------------------------------------------------------------------------
# Fold-parallel: independent single-process runs, one per GPU
