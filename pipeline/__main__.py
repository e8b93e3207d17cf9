"""Command line: `python -m pipeline VERB [options] [key=value ...]`; the Makefile calls this.

    python -m pipeline demo-data
    python -m pipeline folds --data digits
    python -m pipeline train --data digits --model resnet18 --folds 0,2 train.epochs=3
    python -m pipeline train --model resnet20 --parallel folds --gpus 0,1   # a fold per GPU
    python -m torch.distributed.run --standalone --nproc_per_node=4 -m pipeline train --model resnet18
    python -m pipeline train --models "resnet18 resnet34 timm/resnet50" --keep-going
    python -m pipeline infer --bundle B.zip --images test/ --ids test.csv --out submission.csv

Each verb is one module of this package, imported only when used. Errors the user can fix
(bad config, bad data, missing inputs) print one clear message and exit with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import traceback
from pathlib import Path

from pipeline.base.config import ConfigError
from pipeline.base.distributed import launched_world_size
from pipeline.base.fingerprints import remembered
from pipeline.base.log import log
from pipeline.base.log import setup as setup_logging
from pipeline.base.utils import (
    WRITE_ERRNOS,
    PipelineError,
    data_argument,
    format_table,
    warn,
    write_failure,
)

# verb -> (module, help)
VERBS = {
    "demo-data": ("pipeline.stages.demo_data", "export the embedded digits competition to data/digits"),
    "check": ("pipeline.stages.check", "pre-flight check of a competition's CSVs and images"),
    "folds": ("pipeline.stages.folds", "write stratified (group) folds to folds/<competition>.csv"),
    "train": ("pipeline.stages.train", "train one model per fold"),
    "predict": ("pipeline.stages.predict", "TTA inference of each fold on the test set and its OOF"),
    "ensemble": ("pipeline.stages.ensemble", "average folds and models, write the submission"),
    "refit": ("pipeline.stages.refit", "train on all labelled rows, predict the test set"),
    "cache": ("pipeline.stages.cache", "decode and resize every image once into the cache"),
    "pseudo": ("pipeline.stages.pseudo", "pseudo-label the test set with the ensemble, train round two"),
    "runs": ("pipeline.stages.runs", "every experiment of the competition in one table"),
    "status": ("pipeline.stages.runs", "what each stage of one experiment was made from, and if current"),
    "bundle": ("pipeline.stages.bundle", "pack a submission's ensemble for offline inference"),
    "audit": ("pipeline.stages.audit", "duplicates, train/test shift and label suspects of a competition"),
    "report": ("pipeline.stages.report", "the competition's static HTML report: leaderboard, mistakes"),
    "infer": ("pipeline.offline.infer", "run an offline bundle on test images, write the submission"),
    "weights": ("pipeline.stages.weights", "fetch a model's pretrained weights ahead into a folder"),
    "lr": ("pipeline.stages.lr", "a learning-rate sweep on fold 0: the loss curve and a suggestion"),
    "tune": ("pipeline.stages.tune", "an Optuna search over an experiment's settings, resumable"),
    "submit": ("pipeline.stages.submit", "upload a current submission to Kaggle (the kaggle package)"),
    "lb": ("pipeline.stages.lb", "fetch the submissions' public/private scores back from Kaggle"),
    "demo": ("pipeline.demo", "the whole chain on the demo competition"),
    "auto": ("pipeline.auto", "the whole chain for a competition in the time given (--budget 2h)"),
}
# Verbs of one experiment that --models runs for each experiment in turn
EACH_MODEL_VERBS = ("train", "predict", "refit")
# Verbs that write a competition's CSVs or images: they read them afresh each time they ask
WRITES_DATA = ("demo-data", "demo")


def _fold_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--folds takes numbers like 0,2; got {text!r}") from None


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes numbers like 0,1,2; got {text!r}") from None


# Every flag a verb may take, defined once; each verb's module names the ones it takes
# (`FLAGS`, or `FLAGS_<VERB>` where one module serves two verbs), so that `check --time-limit 3`
# is a usage error instead of a flag silently ignored.
FLAG_SPECS = {
    "data": (("--data",), dict(default=os.environ.get("DATA", "digits"),
             help="competition: a name in configs/data/ or a YAML path (default: digits)")),
    "model": (("--model",), dict(default=None, help="experiment: a name in configs/ (resnet18), "
                                 "a model name, or a YAML path")),
    "models": (("--models",), dict(default=None, help="train/predict/refit: each of these "
               "experiments in turn; ensemble: space- or comma-separated runs (default: every "
               "trained one); bundle: the newest submission of exactly these")),
    "keep_going": (("--keep-going",), dict(action="store_true", help="with --models: go on to "
                   "the next experiment when one fails (the failures are listed at the end)")),
    "folds": (("--folds",), dict(type=_fold_list, default=None, help="only these folds, e.g. 0,2")),
    "name": (("--name",), dict(default=None, help="the experiment's name (default: the "
             "experiment file's, with a suffix for result-changing overrides); bundle: the "
             "submission's")),
    "seeds": (("--seeds",), dict(type=_seed_list, default=None,
              help="one run per seed, named <experiment>-seed<s>")),
    "partial": (("--partial",), dict(action="store_true", help="allow members with missing "
                "folds (the report says so)")),
    "force": (("--force",), dict(action="store_true", help="redo work that is already done")),
    "drop_bad": (("--drop-bad",), dict(action="store_true", help="leave out missing/unreadable "
                 "training images instead of failing")),
    "root": (("--root",), dict(default="data/digits", help="where to export")),
    "parallel": (("--parallel",), dict(choices=["folds"], default=None,
                 help="folds side by side, one process per GPU of --gpus")),
    "gpus": (("--gpus",), dict(default=None, help="with --parallel folds: a count (4) or GPU ids "
             "(0,1,2,3); without GPUs, the number of processes")),
    "bundle": (("--bundle",), dict(default=None, help="the bundle's zip, or the folder it was "
               "unpacked into")),
    "images": (("--images",), dict(default=None, help="the test image folder")),
    "ids": (("--ids",), dict(default=None, help="a CSV of the test ids (test.csv or the sample "
            "submission)")),
    "out": (("--out",), dict(default=None, help="infer: the submission CSV to write; weights: the "
            "folder to write them into (default: model.weights_dir)")),
    "steps": (("--steps",), dict(type=int, default=100, help="lr: optimiser steps of the sweep")),
    "lr_start": (("--start",), dict(dest="lr_start", type=float, default=1e-7, help="lr: the first learning rate")),
    "lr_end": (("--end",), dict(dest="lr_end", type=float, default=10.0, help="lr: the last learning rate")),
    "trials": (("--trials",), dict(type=int, default=20, help="tune: finished trials the study "
               "should have (a second run goes on to this many)")),
    "budget": (("--budget",), dict(default=None, help="auto: this command's time, in minutes "
               "(90) or hours (2h, 1h30m)")),
    "portfolio": (("--portfolio",), dict(default=None, help="auto: a YAML list of members "
                  "({name, model, args}) in place of the one chosen from the data")),
    "message": (("--message",), dict(default=None, help="submit: a note put before the "
                "description Kaggle shows (members, nested CV, version)")),
    "time_limit": (("--time-limit",), dict(type=float, default=None,
                   help="seconds; fall back to fewer TTA views to fit")),
    "overrides": (("overrides",), dict(nargs="*", metavar="key=value", help="config overrides, "
                  "e.g. train.epochs=3 augment.image_size=64")),
}


def verb_flags(verb: str, module) -> tuple[str, ...]:
    """The flags `verb` takes, as its module declares them."""
    own = getattr(module, "FLAGS_" + verb.upper().replace("-", "_"), None)
    flags = own if own is not None else getattr(module, "FLAGS", None)
    if flags is None:
        raise TypeError(f"{module.__name__} declares no FLAGS for the verb {verb}")
    unknown = sorted(set(flags) - set(FLAG_SPECS))
    if unknown:
        raise TypeError(f"{module.__name__}: unknown flags {unknown} (known: {sorted(FLAG_SPECS)})")
    return tuple(flags)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """Every verb as a subparser; `verb`'s module is imported (only that one) for its flags."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (module_name, help_text) in VERBS.items():
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            for flag in verb_flags(name, importlib.import_module(module_name)):
                options, settings = FLAG_SPECS[flag]
                sub.add_argument(*options, **settings)
    return parser


def each_model(entry, args) -> None:
    """Run `entry` once per experiment of --models, in order, and end with a table of what each
    did. A failure names its experiment; without --keep-going it stops there."""
    if args.model is not None or args.name is not None:
        raise PipelineError(f"{args.verb} --models runs each experiment under its own name; "
                            f"drop --model/--name (make {args.verb} MODELS=\"a b\")")
    if args.keep_going and launched_world_size() > 1:
        raise PipelineError("--keep-going cannot go on under torchrun: a rank that failed would "
                            "start the next experiment while the others wait in the last one; "
                            "run without KEEP_GOING=1 (the first failure stops every rank)")
    experiments = [m for m in re.split(r"[\s,]+", args.models.strip()) if m]
    outcomes = {m: "not run" for m in experiments}
    for experiment in experiments:
        log.info(f"=== {args.verb} {experiment}")
        try:
            entry(argparse.Namespace(**{**vars(args), "model": experiment, "models": None}))
            outcomes[experiment] = "done"
        except Exception as err:  # noqa: BLE001 - any failure of one experiment is reported
            if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
                raise  # a full disk fails the next experiment too: main says what to free
            if not isinstance(err, (ConfigError, PipelineError)):
                traceback.print_exc()
            log.error(f"error: {args.verb} {experiment}: {err}")
            outcomes[experiment] = f"failed: {str(err).splitlines()[0] if str(err) else err!r}"
            if not args.keep_going:
                log.info(format_table([[m, o] for m, o in outcomes.items()],
                                      ["experiment", args.verb]))
                raise PipelineError(f"{args.verb} of {experiment} failed (above); the experiments "
                                    f"after it were not run. KEEP_GOING=1 (--keep-going) goes on "
                                    f"past a failing experiment") from err
    log.info(format_table([[m, o] for m, o in outcomes.items()], ["experiment", args.verb]))
    failed = [m for m, o in outcomes.items() if o != "done"]
    if failed:
        raise PipelineError(f"{args.verb} failed for {', '.join(failed)} (above); the others "
                            f"are done")


def warn_of_cpu_ranks() -> None:
    """GPUS=2 (torchrun, several ranks) on a machine without a GPU runs the ranks on the CPU
    (gloo). A warning, not a refusal: CPU ranks are a real, tested way to run DDP (the
    results match one process's), but they share the same cores, so they are no faster, and a
    user who meant GPUs should know none is used."""
    world = launched_world_size()
    if world <= 1:
        return
    import torch
    if torch.cuda.device_count() == 0:
        warn(f"{world} processes (GPUS={world}) on a machine without a GPU: they run on the CPU "
             f"and share its cores, so they are no faster than one; leave GPUS= out on a CPU "
             f"machine (check CUDA if this machine should have a GPU)")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(verb if verb in VERBS else None).parse_args(argv)
    module = importlib.import_module(VERBS[args.verb][0])
    entry = getattr(module, "main_" + args.verb.replace("-", "_"), module.main)
    # the competition's CSVs and images are read (and stat'ed) once per command, except by the
    # verbs that write them
    memory = contextlib.nullcontext() if args.verb in WRITES_DATA else remembered()
    warn_of_cpu_ranks()
    try:
        with data_argument(getattr(args, "data", None)), memory:  # DATA= in remedies
            if args.verb in EACH_MODEL_VERBS and args.models:
                each_model(entry, args)
            else:
                entry(args)
    except (ConfigError, PipelineError) as err:
        log.error(f"error: {err}")
        return 1
    except OSError as err:  # a full disk or read-only folder outside the atomic writers
        if err.errno not in WRITE_ERRNOS:
            raise
        log.error(f"error: {write_failure(Path(err.filename or '.'), err)}")
        return 1
    except KeyboardInterrupt:
        log.error("interrupted: finished work is kept; re-run to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
