"""Training's epochs, also in the trackers people already use (`tracking: mlflow|tensorboard`).

    check_tracking(config.tracking)                       # before training: the package is there
    with tracked(config, spec) as tracker:                # tracking: none -> it does nothing
        trainer = make_trainer(config, spec, on_epoch=tracker.epoch)
        ...
        tracker.finish([part.log, part.confusion_png, part.curves])   # as artefacts

MLflow: one run per fold (and the refit), named fold<k>/full, in an MLflow experiment named
<competition>/<experiment>, with the resolved settings as parameters and every epoch's numbers
(losses, metrics, learning rate, seconds, size) as metrics at step = epoch; a fold resumed after
a crash goes on in its run (found by the part's folder, tag `pipeline.part`). The store is
MLFLOW_TRACKING_URI when set (a server, a database), else a local file store in
runs/<competition>/mlruns (`mlflow ui --backend-store-uri runs/<competition>/mlruns`); MLflow 3
keeps the file store in maintenance and asks for MLFLOW_ALLOW_FILE_STORE, which is set for that
one store. TensorBoard: runs/<competition>/tensorboard/<experiment>/<part>/, a resume purging
the steps it redoes (`tensorboard --logdir runs/<competition>/tensorboard`).

Nothing of it decides a result: `tracking` is no part of the identity, and only rank 0 logs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.base import distributed
from pipeline.base.config import Config
from pipeline.base.utils import PipelineError
from pipeline.experiments.layout import Layout
from pipeline.training.parts import RunSpec

PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}  # tracking -> the module it needs
PART_TAG = "pipeline.part"


def check_tracking(tracking: str) -> None:
    """tracking: mlflow|tensorboard needs its package: say so before anything trains."""
    module = PACKAGES.get(tracking)
    if module and importlib.util.find_spec(module) is None:
        package = "mlflow-skinny" if tracking == "mlflow" else "tensorboard"
        raise PipelineError(f"tracking={tracking} needs the {package} package: `.venv/bin/pip "
                            f"install {package}` (or `pip install -e '.[tracking]'`), or "
                            f"tracking=none")


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
        if not uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = layout.mlflow_store.resolve().as_uri()
        self.client = MlflowClient(uri)
        name = f"{layout.competition}/{config.run_name}"
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.run_id = self.resumed_run(experiment, str(spec.part.dir.resolve()))
        if self.run_id is None:
            run = self.client.create_run(experiment, run_name=spec.part.name,
                                         tags={PART_TAG: str(spec.part.dir.resolve()),
                                               "competition": layout.competition,
                                               "experiment": config.run_name})
            self.run_id = run.info.run_id
            params = [self.Param(k, v[:6000]) for k, v in flat_settings(config.to_dict()).items()]
            for start in range(0, len(params), 100):  # MLflow takes 100 parameters a call
                self.client.log_batch(self.run_id, params=params[start:start + 100])

    def resumed_run(self, experiment: str, part: str) -> str | None:
        """The unfinished run of this part (a crash or kill), to go on in; None: a new one."""
        runs = self.client.search_runs([experiment], f"tags.`{PART_TAG}` = '{part}'",
                                       order_by=["attribute.start_time DESC"], max_results=1)
        if runs and runs[0].info.status != "FINISHED":
            self.client.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
        return None

    def epoch(self, row: dict[str, Any]) -> None:
        stamp = int(time.time() * 1000)
        metrics = [self.Metric(key, value, stamp, int(row["epoch"]))
                   for key, value in numbers_of(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, files: list[Path]) -> None:
        for path in files:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
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


@contextlib.contextmanager
def tracked(config: Config, spec: RunSpec) -> Iterator[Tracker]:
    """The run's tracker for the length of its training; closed as failed when training
    raises (an MLflow run left FAILED is gone on in by the resume)."""
    kinds = {"mlflow": MlflowTracker, "tensorboard": TensorBoardTracker}
    if config.tracking not in kinds or not distributed.is_main():
        yield Tracker()
        return
    tracker = kinds[config.tracking](Layout.of(config), config, spec)
    try:
        yield tracker
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close(failed=False)
