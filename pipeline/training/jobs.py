"""Folds side by side: one single-process training per GPU (`PARALLEL=folds`).

    make train MODEL=resnet20 GPUS=0,1,2,3 PARALLEL=folds # 4 folds at once, one per GPU
    python -m pipeline train --model resnet20 --parallel folds --gpus 0,1,2,3

`run_jobs` starts one `python -m pipeline train --folds k` per free GPU slot, pinned with
CUDA_VISIBLE_DEVICES, each logging to its fold's folder, and starts the next fold as a slot frees;
without GPUs the slots are processes on the CPU. DDP within one fold lives in
pipeline/base/distributed.py.
"""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.base.utils import PipelineError

# --------------------------------------------------------------------------------------------
# Who am I


@dataclass
class Job:
    name: str  # e.g. "fold 2", used in messages
    command: list[str]
    log: Path  # the job's stdout and stderr


def gpu_slots(spec: str | None) -> list[str]:
    """`--gpus` -> the GPUs to run on: a count ("4": GPUs 0..3) or ids ("0,2"; "3," for one).

    Ids are those the machine shows, or positions in an already set CUDA_VISIBLE_DEVICES. On a
    machine without GPUs they only count processes.
    """
    if not spec:
        raise PipelineError("--parallel folds needs --gpus: a count (--gpus 4) or GPU ids "
                            "(--gpus 0,1,2,3); make train ... GPUS=0,1 PARALLEL=folds")
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise PipelineError(f"--gpus {spec!r}: give a count (4) or GPU ids (0,1,2,3)")
    ids = [str(i) for i in range(int(parts[0]))] if "," not in spec else parts
    if not ids:
        raise PipelineError(f"--gpus {spec!r} is a count of zero GPUs; for GPU 0 alone write "
                            f"--gpus 0, (with the comma)")
    if len(set(ids)) != len(ids):
        raise PipelineError(f"--gpus {spec!r} names a GPU twice; at most one fold runs per GPU")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:  # --gpus 0,1 under CUDA_VISIBLE_DEVICES=4,5 means GPUs 4 and 5
        shown = [v.strip() for v in visible.split(",") if v.strip()]
        beyond = [i for i in ids if int(i) >= len(shown)]
        if beyond:
            raise PipelineError(f"--gpus {spec}: GPU(s) {beyond} not among the {len(shown)} in "
                                f"CUDA_VISIBLE_DEVICES={visible}")
        ids = [shown[int(i)] for i in ids]
    return ids


def _start(job: Job, gpu: str) -> tuple[subprocess.Popen, Any]:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    log = open(job.log, "w")
    # The child keeps the parent's thread settings: a different CPU thread count would change
    # CPU results in the last bits, and fold-parallel must write what sequential runs write.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, PYTHONUNBUFFERED="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # a plain single-process run
        env.pop(name, None)
    process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return process, log


def _log_tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n") if path.is_file() else ""
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join("    " + line for line in kept)


def run_jobs(jobs: Sequence[Job], gpus: Sequence[str], poll_s: float = 0.2) -> dict[str, int]:
    """Run every job as its own process, at most one per GPU at a time; wait for all of them.

    Each child sees only its GPU (CUDA_VISIBLE_DEVICES) and writes stdout and stderr to its log.
    A failure does not stop the others (they are independent and their work is kept). Returns
    the failed jobs' names with their exit codes. Interrupted, it stops the running children.
    """
    pending, running, failed = list(jobs), {}, {}
    where = "GPU" if torch.cuda.is_available() else "CPU slot"
    try:
        while pending or running:
            for gpu in gpus:
                if gpu not in running and pending:
                    job = pending.pop(0)
                    print(f"{job.name}: started on {where} {gpu}, log {job.log}", flush=True)
                    running[gpu] = (job, time.perf_counter(), *_start(job, gpu))
            time.sleep(poll_s)
            for gpu, (job, started, process, log) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                log.close()
                del running[gpu]
                seconds = time.perf_counter() - started
                if code == 0:
                    print(f"{job.name}: done in {seconds:.0f}s", flush=True)
                else:
                    failed[job.name] = code
                    print(f"{job.name}: FAILED (exit {code}) after {seconds:.0f}s; end of "
                          f"{job.log}:\n{_log_tail(job.log)}", flush=True)
    finally:
        for job, _, process, log in running.values():
            process.terminate()
            process.wait()
            log.close()
    return failed
