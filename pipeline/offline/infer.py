"""Run an offline inference bundle (`make bundle`) on test images: the code-competition notebook.

    python -m pipeline infer --bundle /kaggle/input/<dataset> --images /kaggle/input/<c>/test \
        --ids /kaggle/input/<c>/sample_submission.csv --out submission.csv [--time-limit 3000]

Needs nothing but the bundle (its zip, or the folder Kaggle unpacks it into), the installed wheel
and the third-party packages: no checkout, folds, training CSV or configs/ folder, no network.
Every config is rebuilt from the resolved config stored beside each checkpoint, every model with
pretrained=False and its weights read from safetensors.

Before an image is read the bundle is checked (each problem a BundleError naming the file and
the remedy, exit 1): bundle.json's format and package version against the installed pipeline,
the SHA-256 of every file, every checkpoint's class list against the bundle's, and the class
list against the sample submission's header.

Then each batch of images is decoded once per preprocessing the checkpoints need and goes
through every checkpoint with its experiment's TTA views (engine.view_logits, as `make predict`
runs them). After the first batch it prints the expected time per 1,000 images on this device;
with `--time-limit` it falls back to fewer views (d4 -> flips -> hflip -> none) when the
measured rate says the full set will not fit, and says so. The probabilities are combined as
`make ensemble` combined the members' test files (ensemble.json): an experiment's folds
averaged, its refit joined with its weight, a group's experiments averaged, the groups combined
by `ensemble.combine`, then decoded (argmax, thresholds or a cut-off); the output has the sample
submission's columns, with the ids of `--ids` in their order.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset
from tqdm import tqdm

import pipeline
from pipeline.base.config import (
    Config,
    ConfigError,
    DataConfig,
    TTAConfig,
    config_from_dict,
)
from pipeline.base.fingerprints import sha256_file
from pipeline.base.utils import PipelineError, format_table, summarize_offenders, warn
from pipeline.data.dataset import ImageDataset
from pipeline.data.tables import DataError, load_test_ids, test_image_paths
from pipeline.ensembling.combine import (
    GRADE_VIEW,
    PROBS_VIEW,
    apply_combination,
    apply_decoding,
    fold_mean_with_refit,
)
from pipeline.ensembling.decode import grade_to_probs
from pipeline.ensembling.submission import (
    build_submission,
    probability_columns_of,
    read_sample,
    submission_kind,
    write_submission,
)
from pipeline.experiments.layout import (
    BUNDLE_FORMAT,
    BUNDLE_MANIFEST,
    BUNDLE_RECIPE,
    BUNDLE_REQUIREMENTS,
    BUNDLE_SAMPLE,
    REFIT,
)
from pipeline.inference.engine import make_loader, model_from_config, view_logits
from pipeline.inference.predictor import CheckpointPredictor, reduce_views, tta_views

# --time-limit: each step drops views; shifts, scales and vflip go straight to none
FEWER_VIEWS = {"d4": "flips", "flips": "hflip", "hflip": "none", "vflip": "none",
               "shifts": "none", "scales": "none"}


class BundleError(PipelineError):
    """A bundle cannot be used; the message names the file and the remedy."""


# --------------------------------------------------------------------------------------------
# Opening and checking a bundle


@contextlib.contextmanager
def opened(path: Path) -> Iterator[Path]:
    """The folder holding bundle.json: `path` itself, the one sub-folder that holds it (Kaggle
    may unpack into one), or a zip (given, or the one zip in `path`) unpacked to a temporary
    folder."""
    path = Path(path)
    if path.is_dir() and not (path / BUNDLE_MANIFEST).is_file():
        inner = [p.parent for p in path.glob(f"*/{BUNDLE_MANIFEST}")] or sorted(path.glob("*.zip"))
        if len(inner) != 1:
            raise BundleError(f"no {BUNDLE_MANIFEST} in {path}: pass the folder the bundle was unpacked "
                              f"into, or its zip (bundles/<competition>/<submission>.zip)")
        path = inner[0]
    if path.is_dir():
        yield path
        return
    if not zipfile.is_zipfile(path):
        raise BundleError(f"bundle {path} is neither a folder nor a zip"
                          + ("" if path.exists() else " (it does not exist)")
                          + ": pass the zip of `make bundle` or the folder it was unpacked into")
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp, zipfile.ZipFile(path) as zf:
        zf.extractall(tmp)  # zipfile drops '..' and leading '/' from member names
        try:
            yield Path(tmp)
        except BundleError as err:  # the folder is deleted as this returns: name the zip
            raise BundleError(in_zip(str(err), Path(tmp), path)) from None


def in_zip(message: str, folder: Path, archive: Path) -> str:
    """`message` with the temporary `folder` a zip was unpacked to named as the zip
    (`<zip> member members/x/fold0.json`), which the user can open."""
    return message.replace(f"{folder}/", f"{archive} member ").replace(str(folder), str(archive))


def read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} is missing: the bundle is incomplete; upload the whole zip "
                          f"of `make bundle` again") from None
    except (OSError, ValueError) as err:
        raise BundleError(f"{path} is unreadable ({err}): re-make the bundle (make bundle)") from None
    if not isinstance(content, dict):
        raise BundleError(f"{path} is not a JSON object: re-make the bundle (make bundle)")
    return content


def check_version(folder: Path, manifest: dict[str, Any]) -> None:
    """The bundle's format and package version must be the installed pipeline's: its configs,
    models and recipe are read by this code."""
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{folder / BUNDLE_MANIFEST}: bundle format {manifest.get('format')!r}; this "
                          f"pipeline reads format {BUNDLE_FORMAT}: install the bundle's own wheel")
    made_by, installed = manifest.get("pipeline_version"), pipeline.__version__
    if made_by != installed:
        wheel = folder / str(manifest.get("wheel", "pipeline-*.whl"))
        raise BundleError(
            f"{folder / BUNDLE_MANIFEST}: the bundle was made by pipeline {made_by}, but the installed "
            f"pipeline is {installed} ({Path(pipeline.__file__).parent}); its configs and models "
            f"may not load the same. Install the bundle's own wheel: pip install --no-index "
            f"--no-deps --force-reinstall {wheel}")


def check_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file bundle.json lists is present with its SHA-256."""
    files = manifest.get("files") or {}
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise BundleError(f"bundle {folder} is incomplete: {len(missing)} file(s) that "
                          f"{BUNDLE_MANIFEST} lists are missing: {summarize_offenders(missing)}. Upload "
                          f"the whole zip of `make bundle` again")
    changed = [name for name, digest in files.items() if sha256_file(folder / name) != digest]
    if changed:
        raise BundleError(f"bundle {folder}: {summarize_offenders(changed)} do(es) not match "
                          f"the fingerprint (SHA-256) in {BUNDLE_MANIFEST}: changed or corrupted after "
                          f"`make bundle`. Upload the zip again, or re-make it (make bundle)")


@dataclass
class Bundle:
    """A checked bundle: its folder, bundle.json, ensemble.json and the competition settings."""

    folder: Path
    manifest: dict[str, Any]
    recipe: dict[str, Any]
    data: DataConfig  # the competition's data settings, with the bundle's class list

    def checkpoints(self) -> list[tuple[str, str, str]]:
        """(experiment, part, path stem inside the bundle) of every checkpoint, in recipe order."""
        return [(exp, c["part"], c["path"]) for exp, entry in self.recipe["experiments"].items()
                for c in entry["checkpoints"]]


def check_listed(bundle: Bundle) -> None:
    """Every checkpoint of ensemble.json is a file bundle.json fingerprints."""
    files = bundle.manifest.get("files") or {}
    unlisted = [f"{stem}{ext}" for _, _, stem in bundle.checkpoints()
                for ext in (".safetensors", ".json") if f"{stem}{ext}" not in files]
    if unlisted or BUNDLE_SAMPLE not in files:
        raise BundleError(f"bundle {bundle.folder}: {summarize_offenders(unlisted or [BUNDLE_SAMPLE])} "
                          f"not listed in {BUNDLE_MANIFEST}: it was not made by `make bundle`; re-make it")


def check_classes(bundle: Bundle) -> None:
    """Each checkpoint was trained on the bundle's classes, and they fit the sample's header."""
    classes = bundle.data.classes
    for _, _, stem in bundle.checkpoints():
        theirs = read_json(bundle.folder / f"{stem}.json").get("classes")
        if theirs != classes:
            raise BundleError(f"{bundle.folder / stem}.json: trained on the classes {theirs}, but "
                              f"the bundle's class list is {classes}: re-make the bundle")
    sample_data = bundle.data.model_copy(update={"root": str(bundle.folder),
                                                 "sample_submission": BUNDLE_SAMPLE})
    try:
        sample = read_sample(sample_data)
        kind = submission_kind(sample_data, sample)
        if kind == "probabilities":
            probability_columns_of(sample, sample_data)
    except PipelineError as err:
        raise BundleError(f"the class list {classes} does not fit the bundle's sample "
                          f"submission: {err}") from None
    if kind != bundle.recipe["submission_kind"]:
        raise BundleError(f"{bundle.folder / BUNDLE_SAMPLE}: its header "
                          f"{','.join(sample.columns)!r} makes a {kind} submission, but the "
                          f"ensemble made a {bundle.recipe['submission_kind']} one for the "
                          f"classes {classes}: re-make the bundle")


def load_bundle(folder: Path) -> Bundle:
    """Read and check a bundle folder (see the module docstring for what is checked)."""
    manifest = read_json(folder / BUNDLE_MANIFEST)
    check_version(folder, manifest)
    check_files(folder, manifest)
    recipe = read_json(folder / BUNDLE_RECIPE)
    try:
        data = DataConfig(**{**recipe["data"], "classes": recipe["classes"]})
    except (KeyError, ValueError) as err:
        raise BundleError(f"{folder / BUNDLE_RECIPE}: its data settings do not load ({err}): re-make "
                          f"the bundle") from None
    bundle = Bundle(folder, manifest, recipe, data)
    check_listed(bundle)
    check_classes(bundle)
    return bundle


def warn_versions(folder: Path) -> None:
    """A note when the installed third-party packages are not the versions the bundle pinned:
    predictions may then differ in the last digits."""
    differ = []
    for line in (folder / BUNDLE_REQUIREMENTS).read_text().splitlines():
        name, _, pinned = line.strip().partition("==")
        if not pinned:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != pinned:
            differ.append(f"{name} {installed} (bundle: {pinned})")
    if differ:
        warn(f"installed packages differ from the bundle's {BUNDLE_REQUIREMENTS}: "
             f"{summarize_offenders(differ)}; predictions may differ slightly")


# --------------------------------------------------------------------------------------------
# Test images and the output's format


def test_data(bundle: Bundle, images: Path, ids_csv: Path) -> DataConfig:
    """The competition's data settings pointed at --images and --ids (test CSV or sample)."""
    if not Path(images).is_dir():
        raise BundleError(f"--images {images} is not a folder: pass the competition's test "
                          f"image folder")
    return bundle.data.model_copy(update={"root": str(images), "test_images": ".",
                                          "test_csv": str(Path(ids_csv).resolve()),
                                          "solution_csv": None})


def test_images_of(data: DataConfig) -> tuple[list[str], list[Path]]:
    """The ids of --ids in order and their image files, all present."""
    ids, paths = load_test_ids(data), test_image_paths(data)
    missing = [i for i, p in zip(ids, paths) if not p.is_file()]
    if missing:
        raise DataError(f"no image in {data.root} for id(s) {summarize_offenders(missing)} "
                        f"(image path {data.test_path_pattern!r}): pass the test image folder "
                        f"as --images, and the ids of those images as --ids")
    return ids, paths


def output_data(bundle: Bundle, ids: list[str], folder: Path) -> DataConfig:
    """The sample submission of this run: the bundle's header, the ids of --ids, in `folder`."""
    sample = pd.read_csv(bundle.folder / BUNDLE_SAMPLE, dtype=str, keep_default_na=False)
    filler = {c: (sample[c].iloc[0] if len(sample) else "0") for c in sample.columns}
    frame = pd.DataFrame({c: ids if c == bundle.data.id_column else filler[c]
                          for c in sample.columns})
    frame.to_csv(folder / BUNDLE_SAMPLE, index=False)
    return bundle.data.model_copy(update={"root": str(folder), "sample_submission": BUNDLE_SAMPLE,
                                          "solution_csv": None})


# --------------------------------------------------------------------------------------------
# Checkpoints and the batch loop


@dataclass
class Slot:
    """One checkpoint of the ensemble, ready to predict."""

    experiment: str
    part: str  # fold<k> or full
    predictor: CheckpointPredictor
    tta: TTAConfig
    source: int  # which of the decoded inputs (one per preprocessing) it reads
    view: str = PROBS_VIEW  # what its experiment submits from (a `both` head: maybe its grade)

    def set_views(self, views: str) -> None:
        self.tta = self.tta.model_copy(update={"views": views})
        self.predictor.set_views(self.tta)


def load_weights(folder: Path, stem: str) -> tuple[torch.nn.Module, Config, dict]:
    """(model with its weights, config, {"normalization": ...}) of <stem>.json/.safetensors."""
    meta = read_json(folder / f"{stem}.json")
    try:
        config = config_from_dict(meta["config"])
    except (KeyError, ConfigError) as err:
        raise BundleError(f"{folder / stem}.json: its config does not load ({err}): re-make "
                          f"the bundle with this pipeline") from None
    # The cache changes speed only: the same preprocessing runs on every read, nothing is written
    config = config.model_copy(update={"cache": config.cache.model_copy(update={"enabled": False})})
    model = model_from_config(config)
    try:
        model.load_state_dict(load_file(str(folder / f"{stem}.safetensors")))
    except (RuntimeError, OSError) as err:
        raise BundleError(f"{folder / stem}.safetensors does not fit {config.model.name}: "
                          f"{str(err).splitlines()[0]}; re-make the bundle") from None
    return model.eval(), config, {"normalization": meta["normalization"]}


def load_slots(bundle: Bundle) -> list[Slot]:
    slots, sources = [], {}
    for exp, part, stem in bundle.checkpoints():
        tta = TTAConfig(**bundle.recipe["experiments"][exp]["tta"])
        loaded = load_weights(bundle.folder, stem)
        predictor = CheckpointPredictor(None, tta, "auto", None, loaded[1].predict, loaded=loaded)
        # one input per way of reading an image (the size predicted at, the preprocessing)
        key = json.dumps([settings.model_dump() for settings in predictor.read_settings()],
                         sort_keys=True)
        view = bundle.recipe.get("views", {}).get(exp, PROBS_VIEW)
        slots.append(Slot(exp, part, predictor, tta, sources.setdefault(key, len(sources)), view))
    return slots


class Inputs(Dataset):
    """Each image once per preprocessing the checkpoints need: a tuple of uint8 CHW tensors."""

    def __init__(self, datasets: list[Dataset]):
        self.datasets = datasets

    def __len__(self) -> int:
        return len(self.datasets[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(d[index][0] for d in self.datasets)


def inputs_loader(slots: list[Slot], paths: list[Path]):
    first_of = {}
    for slot in slots:
        first_of.setdefault(slot.source, slot.predictor)
    datasets = [ImageDataset(paths, None, p.transform, p.reader(paths))
                for _, p in sorted(first_of.items())]
    batch = min(s.predictor.batch_size for s in slots)
    return make_loader(Inputs(datasets), batch, None, slots[0].predictor.settings)


def run_batch(slots: list[Slot], inputs: list[torch.Tensor]) -> tuple[list[np.ndarray], list[float]]:
    """Each slot's probabilities (B, C) of one batch (TTA views reduced; a grade output as
    two-point distributions where its experiment submits from it), and its seconds."""
    probs, seconds = [], []
    for slot in slots:
        start = time.perf_counter()
        p = slot.predictor
        images = inputs[slot.source].to(p.device, non_blocking=True)
        logits = view_logits(p.model, p.normalizer, images, p.device, dtype=p.dtype, views=p.views)
        predicted = reduce_views(logits.cpu().numpy(), p.reduce, p.config.model.head,
                                 len(p.config.data.classes))
        probs.append(grade_to_probs(predicted.grade, predicted.probs.shape[1])
                     if slot.view == GRADE_VIEW else predicted.probs)
        seconds.append(time.perf_counter() - start)
    return probs, seconds


def estimate(n_images: int, n_first: int, load_s: float, seconds: list[float],
             *, views_now: list[int], views_then: list[int]) -> float:
    """Seconds for all images with `views_then` per slot, from the first batch's timings."""
    compute = sum(s * then / now for s, now, then in zip(seconds, views_now, views_then))
    return n_images / n_first * (load_s + compute)


def _views(slots: list[Slot]) -> list[int]:
    return [len(tta_views(s.tta, s.predictor.augment.image_size)) for s in slots]


def fit_time_limit(slots: list[Slot], n_images: int, n_first: int, load_s: float,
                   *, seconds: list[float], left_s: float) -> bool:
    """Lower every slot's TTA one step at a time until the estimate fits `left_s`; say what was
    chosen. True when the views changed (the first batch is then predicted again)."""
    now = _views(slots)
    full = estimate(n_images, n_first, load_s, seconds, views_now=now, views_then=now)
    if full <= left_s:
        return False
    before = sorted({s.tta.views for s in slots})
    plan = [s.tta.views for s in slots]
    while True:
        counts = [len(_plan_views(s, v)) for s, v in zip(slots, plan)]
        if estimate(n_images, n_first, load_s, seconds, views_now=now, views_then=counts) <= left_s or \
                all(v == "none" for v in plan):
            break
        plan = [FEWER_VIEWS.get(v, "none") for v in plan]
    for slot, views in zip(slots, plan):
        slot.set_views(views)
    then = estimate(n_images, n_first, load_s, seconds, views_now=now, views_then=counts)
    fits = "fits" if then <= left_s else "still does not fit: it may overrun"
    tqdm.write(f"time limit: TTA {'/'.join(before)} would take about {_seconds(full)} of the "
               f"{_seconds(max(left_s, 0))} left; falling back to TTA "
               f"{'/'.join(sorted(set(plan)))} (about {_seconds(then)}, {fits})")
    return True


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def _plan_views(slot: Slot, views: str) -> list:
    return tta_views(slot.tta.model_copy(update={"views": views}),
                     slot.predictor.augment.image_size)


def predict_all(slots: list[Slot], paths: list[Path], time_limit: float | None,
                started: float) -> dict[tuple[str, str], np.ndarray]:
    """{(experiment, part): probabilities (N, C)} of every slot over every image, in order."""
    loader = inputs_loader(slots, paths)
    device = slots[0].predictor.device
    outputs: list[list[np.ndarray]] = [[] for _ in slots]
    # `with`: the bar is ended (its line closed) before an error, e.g. an image over the pixel
    # budget, prints; else the error is glued to the bar's line
    with tqdm(total=len(paths), desc="infer", unit="img", dynamic_ncols=True,
              mininterval=1.0) as bar:
        fetch = time.perf_counter()
        for index, inputs in enumerate(loader):
            load_s = time.perf_counter() - fetch
            probs, seconds = run_batch(slots, inputs)
            if index == 0:
                n_first = len(inputs[0])
                rate = (load_s + sum(seconds)) / n_first * 1000
                total = estimate(len(paths), n_first, load_s, seconds, views_now=_views(slots), views_then=_views(slots))
                tqdm.write(f"expected {rate:.1f} s per 1,000 images on {device} ({len(slots)} "
                           f"checkpoint(s), {sum(_views(slots))} view(s) in all; {len(paths)} "
                           f"images: about {_seconds(total)})")
                left = None if time_limit is None else time_limit - (time.perf_counter() - started)
                if left is not None and fit_time_limit(slots, len(paths), n_first, load_s, seconds=seconds,
                                                       left_s=left):
                    probs, _ = run_batch(slots, inputs)
            for out, p in zip(outputs, probs):
                out.append(p)
            bar.update(len(inputs[0]))
            fetch = time.perf_counter()
    return {(s.experiment, s.part): np.concatenate(out) for s, out in zip(slots, outputs)}


# --------------------------------------------------------------------------------------------
# The ensemble, as `make ensemble` made it


def experiment_probs(recipe: dict[str, Any], probs: dict[tuple[str, str], np.ndarray],
                     exp: str) -> np.ndarray:
    """Its folds' mean, with its refit joined at its weight (combine.fold_mean_with_refit)."""
    entry = recipe["experiments"][exp]
    parts = [c["part"] for c in entry["checkpoints"]]
    weight = float(entry["refit_weight"])
    refit = REFIT in parts and weight > 0
    folds = [probs[(exp, part)] for part in parts if part != REFIT]
    return fold_mean_with_refit(folds, probs[(exp, REFIT)] if refit else None, weight)


def ensemble_probs(recipe: dict[str, Any], probs: dict[tuple[str, str], np.ndarray]) -> np.ndarray:
    """(N, C): each group's experiments averaged, the groups combined as the ensemble was (its
    method with its weights or stacker: combine.apply_combination)."""
    stack = np.stack([np.mean([experiment_probs(recipe, probs, e) for e in group], axis=0)
                      for group in recipe["groups"]])
    return apply_combination(recipe["method"], recipe["weights"], recipe.get("stacker"), stack)


# --------------------------------------------------------------------------------------------
# The stage


def run_infer(bundle_path: Path, images: Path, ids_csv: Path, out: Path,
              *, time_limit: float | None = None) -> Path:
    """Check the bundle, predict every image, write the submission to `out`; return `out`."""
    started = time.perf_counter()
    print(f"pipeline {pipeline.__version__} ({Path(pipeline.__file__).parent})")
    with opened(bundle_path) as folder, tempfile.TemporaryDirectory(prefix="infer-") as tmp:
        bundle = load_bundle(folder)
        warn_versions(folder)
        ids, paths = test_images_of(test_data(bundle, images, ids_csv))
        slots = load_slots(bundle)
        probs = predict_all(slots, paths, time_limit, started)
        predictions = apply_decoding(bundle.recipe["decode"], ensemble_probs(bundle.recipe, probs))
        data = output_data(bundle, ids, Path(tmp))
        write_submission(build_submission(data, ids, predictions), out, data)
        seconds = time.perf_counter() - started
        views = sorted({s.tta.views for s in slots})
        print(format_table([[bundle.recipe["submission"], len(ids), len(slots), "/".join(views),
                             seconds, seconds / len(ids) * 1000, str(out)]],
                           ["bundle", "images", "checkpoints", "tta", "seconds",
                            "s per 1,000 in all", "submission"]))
    return Path(out)


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("bundle", "images", "ids", "out", "time_limit", "overrides")


def main(args) -> None:
    needed = {"--bundle": args.bundle, "--images": args.images, "--ids": args.ids,
              "--out": args.out}
    missing = [flag for flag, value in needed.items() if not value]
    if missing:
        raise PipelineError(f"infer needs {' '.join(missing)}: python -m pipeline infer --bundle "
                            f"B.zip --images TEST_DIR --ids TEST.csv --out submission.csv")
    if args.overrides:
        raise PipelineError(f"infer takes no key=value settings ({' '.join(args.overrides)}): "
                            f"the bundle holds them all")
    if args.time_limit is not None and not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise PipelineError(f"--time-limit takes seconds > 0, got {args.time_limit}")
    run_infer(Path(args.bundle), Path(args.images), Path(args.ids), Path(args.out),
              time_limit=args.time_limit)
