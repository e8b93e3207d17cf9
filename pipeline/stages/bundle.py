"""Pack the ensemble behind a submission into one zip for offline inference (code competitions).

    python -m pipeline bundle --data digits [--models "a b"] [--name <submission>]
    make bundle DATA=digits [MODELS="a b"] [NAME=<submission>]

Writes bundles/<competition>/<submission>.zip for the newest current submission of the
competition (`--name` picks one by name, `--models` the newest made of exactly those members);
a submission whose members changed since it was written is refused, so a bundle always
reproduces the submission it is named after. Inside, every path relative to the zip's root:

| file                               | what                                                       |
|------------------------------------|------------------------------------------------------------|
| `bundle.json`                      | format, package version, competition, submission, and the   |
|                                    | SHA-256 of every other file                                 |
| `ensemble.json`                    | the recipe: classes, data settings, submission kind, groups,|
|                                    | method, weights or stacker, decoding, each member's view;   |
|                                    | per experiment its TTA settings, refit weight, checkpoints  |
| `members/<exp>/fold<k>.safetensors`| each fold's best weights (`full.*`: the full-data refit)    |
| `members/<exp>/fold<k>.json`       | that checkpoint's resolved config, normalisation, classes   |
| `sample_submission.csv`            | the sample submission: the format of the output             |
| `pipeline-<version>-*.whl`         | this package, built from the checkout                       |
| `requirements.txt`                 | the third-party dependencies, pinned to the installed ones  |
| `README.md`                        | the notebook cell that installs the wheel and runs `infer`  |

`python -m pipeline infer` (pipeline/offline/infer.py) runs it with nothing but the bundle, the wheel
and the third-party packages. Weights are safetensors (no pickle); the checkpoint's other
contents (optimiser, RNG, inputs) stay home.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from safetensors.torch import save_file

import pipeline
from pipeline.base.config import (
    Config,
    DataConfig,
    FoldsConfig,
    load_config,
    parse_models,
)
from pipeline.base.fingerprints import sha256_file
from pipeline.base.log import log
from pipeline.base.utils import (
    PipelineError,
    atomic_path,
    format_table,
    make_command,
    summarize_offenders,
)
from pipeline.ensembling.submission import sample_path
from pipeline.experiments.layout import (
    BUNDLE_FORMAT,
    BUNDLE_MANIFEST,
    BUNDLE_README,
    BUNDLE_RECIPE,
    BUNDLE_REQUIREMENTS,
    BUNDLE_SAMPLE,
    Layout,
    bundle_member,
    submission_of_manifest,
)
from pipeline.experiments.manifests import read_manifest
from pipeline.experiments.state import experiment_config, submission_freshness
from pipeline.inference.engine import load_checkpoint

# The keys of an ensemble manifest's `details` a bundle is made from (pipeline/stages/ensemble.py, recipe)
RECIPE_KEYS = ("members", "groups", "folds", "refit_weights", "method", "weights", "decode",
               "submission_kind")
STORED = (".safetensors", ".whl")  # already dense: stored, not deflated (a 1 GB bundle in seconds)


class BundleError(PipelineError):
    """A bundle cannot be made; the message names the file and the remedy."""


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, sort_keys=True, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    """numpy scalars and tuples in a checkpoint's normalisation, as JSON takes them."""
    return value.item() if hasattr(value, "item") else str(value)


# --------------------------------------------------------------------------------------------
# Which submission


def _ensemble_manifests(layout: Layout) -> list[Path]:
    """The competition's ensemble submissions' manifests, newest first."""
    found = [p for p in layout.submission_manifests()
             if (m := read_manifest(p)) is not None and m.stage == "ensemble"]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def choose_submission(layout: Layout, models: list[str] | None, name: str | None) -> Path:
    """The manifest of the submission to bundle: by name, else the newest (of exactly `models`)."""
    where = layout.submissions
    if name is not None:
        path = layout.submission(name).manifest
        if not path.is_file():
            known = [submission_of_manifest(p) for p in _ensemble_manifests(layout)]
            raise BundleError(f"no submission {name!r} in {where}/ ({path.name} not found); "
                              f"submissions of {layout.competition}: {known or 'none'}")
        return path
    manifests = _ensemble_manifests(layout)
    if models is not None:
        manifests = [p for p in manifests
                     if sorted(read_manifest(p).details.get("members", [])) == sorted(models)]
    if not manifests:
        what = f" made of exactly {' '.join(models)}" if models else ""
        remedy = make_command("ensemble", layout.competition,
                              MODELS=" ".join(models) if models else None)
        raise BundleError(f"no ensemble submission{what} in {where}/: run `{remedy}` first")
    return manifests[0]


def current_recipe(data: DataConfig, folds: FoldsConfig, layout: Layout,
                   manifest_file: Path) -> dict[str, Any]:
    """The submission's recipe (its manifest's `details`), refused unless the submission is
    current and the recipe complete."""
    name = submission_of_manifest(manifest_file)
    manifest = read_manifest(manifest_file)
    if manifest is None or manifest.stage != "ensemble":
        raise BundleError(f"submission {name} ({manifest_file}) is no ensemble's submission (a "
                          f"refit's own, or unreadable): bundle one of "
                          f"`{make_command('ensemble', data.name)}`")
    fresh = submission_freshness(data, folds, layout, manifest_file)
    members = " ".join(manifest.details.get("members", []))
    again = (f"`{make_command('ensemble', data.name, MODELS=members)}` again, then "
             f"`{make_command('bundle', data.name, MODELS=members)}`")
    if not fresh.current:
        raise BundleError(
            f"submission {name} is not current: {fresh.why()}.\nA bundle must reproduce its "
            f"submission: bring the members up to date as said, run {again}")
    missing = [key for key in RECIPE_KEYS if key not in manifest.details]
    if manifest.details.get("method") == "stack" and not manifest.details.get("stacker"):
        missing.append("stacker")
    if missing:
        raise BundleError(f"{manifest_file} lacks the recipe key(s) {missing}: it was written by "
                          f"an older pipeline; run {again}")
    return manifest.details


# --------------------------------------------------------------------------------------------
# The members' checkpoints


def export_checkpoint(best: Path, folder: Path, stem: str) -> list[str]:
    """best.pt -> <stem>.safetensors (the weights) + <stem>.json (config, normalisation,
    classes), both under `folder`; returns the two paths relative to it."""
    checkpoint = load_checkpoint(best)
    # clone: safetensors refuses tensors that share storage (tied weights)
    weights = {k: v.detach().clone().contiguous() for k, v in checkpoint["model"].items()}
    (folder / stem).parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / f"{stem}.safetensors"))
    write_json(folder / f"{stem}.json", {key: checkpoint[key] for key in
                                         ("config", "normalization", "classes")})
    return [f"{stem}.safetensors", f"{stem}.json"]


def export_members(layout: Layout, recipe: dict[str, Any], stage: Path) -> dict[str, Any]:
    """Each experiment's checkpoints into the bundle, and its entry of ensemble.json:
    {"tta": ..., "refit_weight": w, "checkpoints": [{"part": "fold0", "path":
    "members/<exp>/fold0"}, ...]} (folds in the ensemble's order, then the refit)."""
    experiments = {}
    grouped = [exp for group in recipe["groups"] for exp in group]
    if sorted(grouped) != sorted(recipe["members"]):
        raise BundleError(f"the submission's groups {recipe['groups']} do not hold exactly its "
                          f"members {recipe['members']}: run "
                          f"`{make_command('ensemble', layout.competition)}` again")
    for name in grouped:
        exp = layout.experiment(name)
        weight = float(recipe["refit_weights"].get(name, 0.0))
        parts = [exp.fold(k) for k in recipe["folds"][name]] + ([exp.refit] if weight > 0 else [])
        for part in parts:
            export_checkpoint(part.best, stage, bundle_member(name, part.name))
        # the views the predictions were made with (TTA is chosen at predict time)
        tta = recipe.get("tta", {}).get(name) or experiment_config(exp).tta.model_dump()
        experiments[name] = {"tta": tta, "refit_weight": weight,
                             "checkpoints": [{"part": part.name,
                                              "path": bundle_member(name, part.name)}
                                             for part in parts]}
    return experiments


def recipe_file(data: DataConfig, recipe: dict[str, Any], experiments: dict[str, Any],
                name: str) -> dict[str, Any]:
    """ensemble.json: everything `infer` needs besides the weights and the sample."""
    return {"competition": data.name, "submission": name,
            "classes": list(data.classes), "data": data.model_dump(mode="json"),
            "submission_kind": recipe["submission_kind"], "groups": recipe["groups"],
            "method": recipe["method"], "weights": recipe["weights"],
            "stacker": recipe.get("stacker"), "decode": recipe["decode"],
            "views": recipe.get("views", {}), "experiments": experiments}


# --------------------------------------------------------------------------------------------
# The package: wheel and pinned requirements


def source_root() -> Path:
    """The checkout the running package comes from (the wheel is built from it)."""
    root = Path(pipeline.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise BundleError(f"the wheel is built from the source checkout, but {root} has no "
                          f"pyproject.toml (pipeline runs from an installed wheel): run `make "
                          f"bundle` in the checkout, installed with `pip install -e .`")
    return root


def build_wheel(out_dir: Path) -> Path:
    """pip wheel of a clean copy of the checkout (pyproject.toml, README.md, pipeline/): no
    network, no build/ or egg-info left in the checkout, no stale module from an old build/."""
    root = source_root()
    with tempfile.TemporaryDirectory(prefix="pipeline-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, src / name)
        shutil.copytree(root / "pipeline", src / "pipeline",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                   "--no-index", "--disable-pip-version-check", "-q", "-w", str(out_dir), str(src)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(out_dir.glob("pipeline-*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise BundleError(f"building the wheel of {root} failed ({' '.join(command[:6])} ...):\n"
                          f"{tail}\nIt needs pip and setuptools in this environment "
                          f"(`pip install setuptools`)")
    version = wheels[0].name.split("-")[1]
    if version != pipeline.__version__:
        raise BundleError(f"{root}/pyproject.toml says version {version} but "
                          f"pipeline/__init__.py says {pipeline.__version__}: make them agree")
    return wheels[0]


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist without extras (the test extra), as package names."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    requirements = [Requirement(line.split(":", 1)[1].strip()) for line in lines
                    if line.startswith("Requires-Dist:")]
    return [r.name for r in requirements if r.marker is None or "extra" not in str(r.marker)]


def pinned_requirements(names: list[str]) -> str:
    """requirements.txt: each dependency pinned to the version installed here."""
    missing = [n for n in names if not _installed(n)]
    if missing:
        raise BundleError(f"dependencies {summarize_offenders(missing)} are not installed here, "
                          f"so they cannot be pinned: `make install`")
    return "".join(f"{name}=={metadata.version(name)}\n" for name in names)


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# README and bundle.json


def readme(data: DataConfig, name: str, wheel: str) -> str:
    ids = data.test_csv or data.sample_submission
    comp = f"/kaggle/input/{data.name}"
    return f"""# Offline inference bundle: {data.name}, submission {name}

Made by `make bundle` of pipeline {pipeline.__version__}. Upload this zip as a Kaggle dataset
(Kaggle unpacks it into `/kaggle/input/<dataset>/`), add it and the competition to the notebook,
turn the internet off, and run:

```
!pip install --no-index --no-deps /kaggle/input/<dataset>/pipeline-*.whl
!python -m pipeline infer --bundle /kaggle/input/<dataset> \\
    --images {comp}/{data.test_images} --ids {comp}/{ids} \\
    --out /kaggle/working/submission.csv
```

(`{data.name}` is the competition's name in this pipeline; use its folder under
`/kaggle/input/`.) `--bundle` also takes the zip itself; `--time-limit SECONDS` falls back to fewer
TTA views when the measured rate says the full set will not fit. The third-party packages are
the notebook's own; `{BUNDLE_REQUIREMENTS}` pins the versions the bundle was made with, and `infer`
warns when the installed ones differ. `{BUNDLE_MANIFEST}` holds the SHA-256 of every file: `infer`
checks them before it starts. The wheel: `{wheel}`.
"""


def bundle_manifest(stage: Path, competition: str, name: str, wheel: str) -> dict[str, Any]:
    files = {p.relative_to(stage).as_posix(): sha256_file(p)
             for p in sorted(stage.rglob("*")) if p.is_file()}
    return {"format": BUNDLE_FORMAT, "pipeline_version": pipeline.__version__,
            "competition": competition, "submission": name, "wheel": wheel,
            "made": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files}


def write_zip(stage: Path, out: Path) -> None:
    """Every file of `stage` into the zip `out`, atomically."""
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                how = zipfile.ZIP_STORED if path.suffix in STORED else zipfile.ZIP_DEFLATED
                zf.write(path, path.relative_to(stage).as_posix(), compress_type=how)


# --------------------------------------------------------------------------------------------
# The stage


def make_bundle(config: Config, models: list[str] | None = None, name: str | None = None) -> Path:
    """Write bundles/<competition>/<submission>.zip; return its path."""
    layout = Layout.of(config)
    manifest_file = choose_submission(layout, models, name)
    name = submission_of_manifest(manifest_file)
    recipe = current_recipe(config.data, config.folds, layout, manifest_file)
    out = layout.bundle(name)
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        stage = Path(tmp) / "bundle"
        experiments = export_members(layout, recipe, stage)
        write_json(stage / BUNDLE_RECIPE, recipe_file(config.data, recipe, experiments, name))
        shutil.copyfile(sample_path(config.data), stage / BUNDLE_SAMPLE)
        wheel = build_wheel(stage)
        (stage / BUNDLE_REQUIREMENTS).write_text(pinned_requirements(wheel_requirements(wheel)))
        (stage / BUNDLE_README).write_text(readme(config.data, name, wheel.name))
        manifest = bundle_manifest(stage, config.data.name, name, wheel.name)
        write_json(stage / BUNDLE_MANIFEST, manifest)
        write_zip(stage, out)
    checkpoints = sum(len(e["checkpoints"]) for e in experiments.values())
    log.info(format_table([[name, len(experiments), checkpoints, len(manifest["files"]) + 1,
                            f"{out.stat().st_size / 2**20:.1f}", str(out)]],
                          ["submission", "experiments", "checkpoints", "files", "MiB", "bundle"]))
    return out


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "models", "name", "overrides")


def main(args) -> None:
    config = load_config(args.data, None, args.overrides)
    make_bundle(config, parse_models(args.models), args.name)
