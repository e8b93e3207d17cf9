"""Training's epochs, also in the trackers people already use (`tracking: mlflow|tensorboard`).

    check_tracking(config.tracking)                       # before training: the package is there
    with tracked(config, spec) as tracker:                # tracking: none -> it does nothing
        trainer = make_trainer(config, spec, on_epoch=tracker.epoch)
        ...
        tracker.finish([part.log, part.confusion_png, part.curves])   # as artefacts

MLflow: one run per fold (and the refit), named fold<k>/full, in an MLflow experiment named
<competition>/<experiment>, with the resolved settings as parameters and every epoch's numbers
(losses, metrics, learning rate, seconds, size) as metrics at step = epoch; a fold resumed after
a crash goes on in its run (found by the part's folder, tag `pipeline.part`; a part trained
afresh gets a new run). The store is MLFLOW_TRACKING_URI when set (a server, a database), else
SQLite in runs/<competition>/mlflow.db with the artefacts in runs/<competition>/mlartifacts/
(MLflow 3 keeps its file store in maintenance). A tracker that fails (a server that stops
answering) is warned of and dropped: training goes on. TensorBoard: runs/<competition>/tensorboard/<experiment>/<part>/, a resume purging
the steps it redoes (`tensorboard --logdir runs/<competition>/tensorboard`).

Nothing of it decides a result: `tracking` is no part of the identity, and only rank 0 logs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.base import distributed
from pipeline.base.config import Config
from pipeline.base.utils import PipelineError, warn
from pipeline.experiments.layout import Layout
from pipeline.training.parts import RunSpec

# tracking -> the modules it imports and the packages that install them (MLflow's SQLite store
# needs sqlalchemy and alembic, which mlflow-skinny leaves out)
NEEDS = {"mlflow": {"mlflow": "mlflow-skinny", "sqlalchemy": "sqlalchemy", "alembic": "alembic"},
         "tensorboard": {"tensorboard": "tensorboard"}}
PART_TAG = "pipeline.part"


def check_tracking(tracking: str) -> None:
    """tracking: mlflow|tensorboard needs its packages: say so before anything trains."""
    missing = [package for module, package in NEEDS.get(tracking, {}).items()
               if importlib.util.find_spec(module) is None]
    if missing:
        raise PipelineError(f"tracking={tracking} needs {' '.join(missing)}: `.venv/bin/pip "
                            f"install {' '.join(missing)}` (or `.venv/bin/pip install -e "
                            f"'.[tracking]'`), or tracking=none")


class Tracker:
    """The tracker of tracking: none (and of every rank but 0): it does nothing."""

    def epoch(self, row: dict[str, Any]) -> None:
        pass

    def finish(self, files: list[Path]) -> None:
        pass

    def close(self, failed: bool) -> None:
        pass


def numbers_of(row: dict[str, Any]) -> dict[str, float]:
    """An epoch's log row less what is no number (stage, best) and the epoch itself."""
    return {key: float(value) for key, value in row.items()
            if key != "epoch" and isinstance(value, (int, float, np.number))
            and not isinstance(value, bool) and np.isfinite(value)}


def flat_settings(mapping: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved settings as dotted keys and text values (MLflow's parameters)."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class MlflowTracker(Tracker):
    def __init__(self, layout: Layout, config: Config, spec: RunSpec):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric, self.Param = Metric, Param
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            layout.runs.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{layout.mlflow_store.resolve()}"
            artifacts = layout.mlflow_artifacts.resolve().as_uri()
        self.client = MlflowClient(uri)
        name = f"{layout.competition}/{config.run_name}"
        found = self.client.get_experiment_by_name(name)
        self.experiment = (found.experiment_id if found else
                           self.client.create_experiment(name, artifact_location=artifacts))
        self.config, self.spec, self.part = config, spec, str(spec.part.dir.resolve())
        self.run_id = None  # started at the first epoch, which says whether this is a resume

    def start(self, first_epoch: int) -> None:
        """Go on in the part's unfinished run when training resumes; else a new run (an
        unfinished one of a part trained afresh is closed as killed)."""
        runs = self.client.search_runs([self.experiment], f"tags.`{PART_TAG}` = '{self.part}'",
                                       order_by=["attribute.start_time DESC"], max_results=1)
        unfinished = runs and runs[0].info.status != "FINISHED"
        if unfinished and first_epoch > 1:
            self.run_id = runs[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        if unfinished:
            self.client.set_terminated(runs[0].info.run_id, "KILLED")
        run = self.client.create_run(self.experiment, run_name=self.spec.part.name,
                                     tags={PART_TAG: self.part,
                                           "competition": self.config.data.name,
                                           "experiment": self.config.run_name})
        self.run_id = run.info.run_id
        params = [self.Param(k, v[:6000]) for k, v in flat_settings(self.config.to_dict()).items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 parameters a call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def epoch(self, row: dict[str, Any]) -> None:
        if self.run_id is None:
            self.start(int(row["epoch"]))
        stamp = int(time.time() * 1000)
        metrics = [self.Metric(key, value, stamp, int(row["epoch"]))
                   for key, value in numbers_of(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, files: list[Path]) -> None:
        for path in files if self.run_id is not None else []:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class TensorBoardTracker(Tracker):
    def __init__(self, layout: Layout, config: Config, spec: RunSpec):
        self.folder = layout.tensorboard(config.run_name, spec.part.name)
        self.settings = yaml.safe_dump(config.to_dict(), sort_keys=False)
        self.writer = None  # opened at the first epoch, which says whether this is a resume

    def open(self, first_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        if first_epoch == 1 and self.folder.exists():  # trained afresh (FORCE=1): not mixed
            shutil.rmtree(self.folder)
        self.writer = SummaryWriter(str(self.folder),
                                    purge_step=first_epoch if first_epoch > 1 else None)
        if first_epoch == 1:
            self.writer.add_text("settings", "    " + self.settings.replace("\n", "\n    "), 0)

    def epoch(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            self.open(int(row["epoch"]))
        for key, value in numbers_of(row).items():
            self.writer.add_scalar(key, value, int(row["epoch"]))
        self.writer.flush()  # a kill loses at most the epoch in progress

    def finish(self, files: list[Path]) -> None:
        import matplotlib.image

        if self.writer is None:
            return
        for path in files:
            if Path(path).suffix == ".png" and Path(path).is_file():
                image = matplotlib.image.imread(str(path))[..., :3]
                self.writer.add_image(Path(path).stem, image, dataformats="HWC")

    def close(self, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()


class Guarded(Tracker):
    """A tracker whose failures (a server that stops answering, a full disk) are warned of
    once and end the tracking, never the training: the tracker decides nothing."""

    def __init__(self, tracker: Tracker | None, kind: str):
        self.tracker, self.kind = tracker, kind

    def call(self, what: str, *args: Any) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, what)(*args)
        except Exception as err:  # noqa: BLE001 - any tracker failure; training goes on
            warn(f"tracking={self.kind} stopped ({type(err).__name__}: {err}); training goes "
                 f"on without it")
            self.tracker = None

    def epoch(self, row: dict[str, Any]) -> None:
        self.call("epoch", row)

    def finish(self, files: list[Path]) -> None:
        self.call("finish", files)

    def close(self, failed: bool) -> None:
        self.call("close", failed)


_listeners: list[Callable[[dict[str, Any]], None]] = []  # listening()'s, innermost last


@contextlib.contextmanager
def listening(callback: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Call `callback` with each finished epoch's log row of the training inside the block
    (`make tune` reports a trial's learning curve to its pruner; the callback may raise to
    stop the training, as a pruned trial does)."""
    _listeners.append(callback)
    try:
        yield
    finally:
        _listeners.remove(callback)


def epoch_done(tracker: Tracker, row: dict[str, Any]) -> None:
    """A finished epoch: to the tracker, then to whoever listens."""
    tracker.epoch(row)
    for callback in list(_listeners):
        callback(row)


@contextlib.contextmanager
def tracked(config: Config, spec: RunSpec) -> Iterator[Tracker]:
    """The run's tracker for the length of its training; closed as failed when training
    raises (an MLflow run left FAILED is gone on in by the resume)."""
    kinds = {"mlflow": MlflowTracker, "tensorboard": TensorBoardTracker}
    if config.tracking not in kinds or not distributed.is_main():
        yield Tracker()
        return
    try:
        made = kinds[config.tracking](Layout.of(config), config, spec)
    except Exception as err:  # noqa: BLE001 - an unreachable MLFLOW_TRACKING_URI, a bad store
        warn(f"tracking={config.tracking} could not start ({type(err).__name__}: {err}); "
             f"training goes on without it")
        made = None
    tracker = Guarded(made, config.tracking)
    try:
        yield tracker
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close(failed=False)
