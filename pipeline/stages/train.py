"""Train one model per fold.

    python -m pipeline train --data digits --model resnet18 [--folds 0,2] [--force] [train.epochs=3]
    make train MODEL=resnet18 [FOLDS=0,2] [EPOCHS=3] [FORCE=1] [NAME=my-run] [SEEDS=0,1,2]
    make train MODEL=resnet18 GPUS=4                 # each fold on 4 GPUs (torchrun, DDP)
    make train MODEL=resnet20 GPUS=0,1 PARALLEL=folds  # two folds at once, one per GPU

Writes runs/<competition>/<experiment>/fold<k>/: config.yaml, best.pt (by the competition metric),
last.pt (every epoch, with optimiser, scheduler, scaler and epoch), log.csv, oof.csv,
confusion.csv|png, curves.png and, last, train.manifest.json; then summary.csv|md over the
current folds. A fold whose manifest matches the inputs of now (fold assignment, settings,
training images) is skipped; one made from other inputs is refused, naming what changed (FORCE=1
retrains it, NAME= keeps both); an interrupted one resumes from last.pt at the next epoch when
last.pt was made from the same inputs, and ends with the same weights as an uninterrupted run
(each epoch's randomness is derived from (seed, epoch), not carried over). The training itself is
pipeline/training/; under torchrun the same code runs on every rank (pipeline/base/distributed.py says
who does what and why the results do not depend on the number of GPUs).
"""

from __future__ import annotations

import sys

import pandas as pd

from pipeline.base import distributed
from pipeline.base.config import Config
from pipeline.base.log import log
from pipeline.base.utils import PipelineError, make_command
from pipeline.experiments.layout import Layout
from pipeline.experiments.runner import stage_lock
from pipeline.experiments.state import experiment_configs
from pipeline.inference.engine import resolve_device
from pipeline.training import jobs
from pipeline.training.experiment import prepare_training, train_folds, write_summary
from pipeline.training.run import clear_parts


def run_parallel_folds(config: Config, folds_to_train: list[int] | None, force: bool,
                       gpus: str | None, *, command: list[str]) -> pd.DataFrame | None:
    """Train the folds side by side: one single-process run per fold, at most one per GPU.

    `command` is the `python -m pipeline train ...` of one fold without `--folds`; each child gets
    `--folds k` and writes what a sequential run writes, its output going to fold<k>/train.log.
    The summary is written once every fold has finished; a failed fold is an error naming it.
    """
    if distributed.launched_world_size() > 1:
        example = make_command("train", config.data.name, MODEL=config.run_name,
                               PARALLEL="folds", GPUS="0,1")
        raise PipelineError(f"--parallel folds starts its own processes, one per GPU: run it "
                            f"with python, not torchrun ({example})")
    if config.train.device not in ("auto", "cuda", "cpu"):
        raise PipelineError(f"train.device={config.train.device} with --parallel folds: each fold "
                            f"sees only its own GPU (as cuda:0); leave train.device=auto")
    slots = jobs.gpu_slots(gpus)
    layout = Layout.of(config)
    exp = layout.experiment(config.run_name)
    with stage_lock(exp.lock, exp.dir, "trained"):  # the fold processes work under it
        return _parallel_folds(config, layout, exp, folds_to_train, force=force, slots=slots, command=command)


def _parallel_folds(config: Config, layout: Layout, exp, folds_to_train: list[int] | None,
                    *, force: bool, slots: list[str], command: list[str]) -> pd.DataFrame | None:
    plan = prepare_training(config, layout, folds_to_train, force)
    parts = [exp.fold(k) for k in plan.todo]
    clear_parts(parts, force)  # here, not in the child: the child's log lives in its folder
    fold_jobs = [jobs.Job(f"fold {k}", [*command, "--folds", str(k)], part.console_log)
                 for k, part in zip(plan.todo, parts)]
    failed = jobs.run_jobs(fold_jobs, slots)
    if failed:
        names = ", ".join(f"{name} (exit {code})" for name, code in failed.items())
        logs = ", ".join(str(job.log) for job in fold_jobs if job.name in failed)
        raise PipelineError(f"{names} failed; see {logs}, fix the cause and re-run: finished "
                            f"folds are skipped")
    return write_summary(plan.config, layout, plan.folds)


def fold_command(args, run_name: str) -> list[str]:
    """The single-process `python -m pipeline train` that one fold of --parallel folds runs."""
    return [sys.executable, "-m", "pipeline", "train", "--data", args.data, "--model", args.model,
            "--name", run_name, *args.overrides]


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = (
    "data", "model", "models", "keep_going", "folds", "name", "seeds", "force", "parallel", "gpus",
    "overrides"
)


def main(args) -> None:
    if args.model is None:
        example = make_command("train", args.data, MODEL="resnet18")
        raise PipelineError(f"train needs a model: {example}")
    configs = experiment_configs(args.data, args.model, args.overrides, args.name, seeds=args.seeds)
    parallel, gpus = args.parallel, args.gpus
    if gpus and parallel != "folds":
        example = make_command("train", args.data, MODEL=args.model, GPUS=4)
        raise PipelineError(f"--gpus goes with --parallel folds; to train each fold on several "
                            f"GPUs launch with torchrun: {example} (see "
                            f"pipeline/base/distributed.py)")
    for config in configs:
        if len(configs) > 1:
            log.info(f"== {config.run_name} (train.seed={config.train.seed})")
        if parallel == "folds":
            seed_args = [f"train.seed={config.train.seed}"] if len(configs) > 1 else []
            command = fold_command(args, config.run_name) + seed_args
            run_parallel_folds(config, args.folds, args.force, gpus, command=command)
            continue
        with distributed.session(resolve_device(config.train.device)):
            train_folds(config, Layout.of(config), args.folds, args.force)
