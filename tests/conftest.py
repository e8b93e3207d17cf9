"""Shared fixtures: tiny competitions written to tmp_path, and shrunken configs."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.base import log
from pipeline.base.config import Config, load_config
from pipeline.experiments.layout import Layout

REPO = Path(__file__).resolve().parents[1]

log.setup()  # what the entry does: the stages' lines go to stdout, where capsys reads them

# The tests' file digests go to a table of their own, not the user's ~/.cache/pipeline (the
# subprocesses the tests start inherit it).
os.environ["PIPELINE_STATE"] = str(Path(tempfile.mkdtemp(prefix="pipeline-state-")) /
                                   "digests.sqlite")


def dry_make(*args: str) -> subprocess.CompletedProcess:
    """`make -n ARGS` in the repository: what make would run, without running it. Run as a
    make of its own even when the suite itself runs under make (CI's `make test`): an inherited
    MAKELEVEL makes make print "Entering directory" lines into the output under test."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True,
                          env=env)


def write_image(path: Path, seed: int, size: int = 16, ext: str = ".png", gray: bool = False) -> Path:
    """A random image file; `ext` picks the encoder (.png or .jpg)."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if gray else (size, size, 3)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path.with_suffix(ext)), image)
    return path.with_suffix(ext)


def make_competition(root: Path, labels: list[str], ids: list[str] | None = None,
                     n_test: int = 4, ext: str = ".png", classes: list | None = None,
                     **config_extra) -> Path:
    """Write a Kaggle-style competition under `root` and its config; return the config path."""
    ids = ids or [f"{i:04d}" for i in range(len(labels))]
    test_ids = [f"t{i:03d}" for i in range(n_test)]
    for i, image_id in enumerate(ids):
        write_image(root / "train" / image_id, seed=i, ext=ext, gray=i % 2 == 0)
    for i, image_id in enumerate(test_ids):
        write_image(root / "test" / image_id, seed=1000 + i, ext=ext)
    pd.DataFrame({"id": ids, "label": labels}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": test_ids}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"id": test_ids, "label": labels[0]}).to_csv(root / "sample_submission.csv",
                                                              index=False)
    config = {
        "name": "tiny", "root": str(root), "image_path": "{id}" + ext,
        "classes": classes or sorted(set(labels)), "metric": "accuracy",
        **config_extra,
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_competition(tmp_path: Path) -> Path:
    """12 labelled images of 3 classes (4 each) and 4 test images; returns the config path."""
    labels = [c for c in ("cat", "dog", "fox") for _ in range(4)]
    return make_competition(tmp_path / "tiny", labels)


@pytest.fixture
def tiny_config(tiny_competition: Path, tmp_path: Path) -> Config:
    return load_config(str(tiny_competition), "resnet20",
                       [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
                        f"audit_dir={tmp_path / 'audit'}", "folds.n_splits=2"])


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from pipeline.stages.demo_data import export_digits

    return export_digits(tmp_path_factory.mktemp("demo") / "digits")


# The folders the pipeline writes under by default; a test gives its own in tmp_path, or one
# test's leftovers (a competition's duplicate findings, a submission) are read by another.
OUTPUTS = ("audit", "bundles", "cache", "folds", "mlruns", "pseudo", "reports", "runs",
           "submissions", "weights")


def repo_outputs() -> dict[str, int]:
    """Every entry of the default output folders, two levels down (and the stages' lock
    folders, runs/<competition>/.locks), by its change time: a file written (or renamed into
    place) in a folder changes the folder's."""
    found = {}
    for name in OUTPUTS:
        root = REPO / name
        for entry in [root, *root.glob("*"), *root.glob("*/.locks")] if root.is_dir() else []:
            found[str(entry.relative_to(REPO))] = entry.stat().st_mtime_ns
    return found


@pytest.fixture(autouse=True)
def _run_in_repo(monkeypatch):
    """Configs are found relative to the repo root, as with `make`; and nothing is written
    into the repository's own output folders."""
    monkeypatch.chdir(REPO)
    before = repo_outputs()
    yield
    after = repo_outputs()
    written = sorted(k for k in after if before.get(k) != after[k])
    assert not written, (f"the test wrote into the repository: {written[:6]}; give it "
                         f"tmp_path folders (runs_dir=, audit_dir=, submissions_dir=, ...)")


def experiment_dir(config: Config) -> Path:
    """runs/<competition>/<experiment>/ of a config, as the layout places it."""
    return Layout.of(config).experiment(config.run_name).dir


def folds_csv(config: Config) -> Path:
    return Layout.of(config).folds_csv


def train(config: Config, folds: list[int] | None = None, force: bool = False):
    """`make train` for a config built in a test (its folds and summary)."""
    from pipeline.training.experiment import train_folds

    return train_folds(config, Layout.of(config), folds, force)


def predict(config: Config, folds: list[int] | None = None, force: bool = False) -> None:
    """`make predict` for a config built in a test."""
    from pipeline.experiments.freshness import read_folds, read_test_set
    from pipeline.inference.experiment import predict_experiment

    layout = Layout.of(config)
    predict_experiment(config, layout, read_folds(config.data, config.folds, layout), folds,
                       force=force, test=read_test_set(config.data))


def read_folds_of(config: Config):
    from pipeline.experiments.freshness import read_folds

    return read_folds(config.data, config.folds, Layout.of(config))


def watch_training_passes(monkeypatch, see) -> None:
    """Every model training builds from now on calls `see(x)` before each training forward
    pass (a recorder, or a GPU that raises when full): the real model, its weights untouched."""
    import pipeline.training.parts as parts

    build = parts.build_model

    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        forward = model.forward

        def watched(x):
            if model.training:
                see(x)
            return forward(x)

        model.forward = watched
        return model

    monkeypatch.setattr(parts, "build_model", build_model)
