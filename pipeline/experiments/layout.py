"""Where every file of a competition lies: the one owner of paths and file names.

    layout = Layout.of(config)                      # a competition's folders
    part = layout.experiment("resnet18").fold(2)    # runs/<competition>/resnet18/fold2/
    part.best, part.oof, part.train_manifest        # .../best.pt, oof.csv, train.manifest.json

The tree, one folder per competition in each place so that nothing of one
competition is read by another, and one per experiment so that nothing of one is read by another:

    folds/<competition>.csv | .manifest.json | .dropped.csv
    runs/<competition>/<experiment>/config.yaml, summary.csv|md, fold<k>/..., full/...
    runs/<competition>/leaderboard.csv|md|png, mlflow.db, mlartifacts/, tensorboard/<experiment>/<part>/
    submissions/<competition>/<name>.csv|md|manifest.json, leaderboard.csv (uploads and scores)
    pseudo/<competition>/<set>/fold<k>.csv, full.csv, pseudo.manifest.json
    bundles/<competition>/<name>.zip
    audit/<competition>/duplicates.csv, shift.csv, label_issues_<experiment>.csv, ...
    reports/<competition>/index.html, experiments/<experiment>.html, images/, *.manifest.json

`fold<k>` is a model validated on fold k; `full` is the full-data refit (fold -1 in the Kaggle
winners' convention). No other module spells these names: it asks this one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.base.config import Config

REFIT = "full"  # the part name of the full-data refit
_FOLD = re.compile(r"^fold(\d+)$")
MANIFEST_SUFFIX = ".manifest.json"
# runs/<competition>/.locks/: the locks of one process at a time (pipeline/experiments/locks.py). The lock
# files stay (removing one while another process may open it would let two hold it).
LOCKS = ".locks"
# submissions/<competition>/leaderboard.csv: no submission may take its name
PUBLIC_LEADERBOARD = "leaderboard.csv"


def part_name(fold: int) -> str:
    """fold<k> for a validated model, `full` (fold -1) for the full-data refit."""
    return REFIT if fold < 0 else f"fold{fold}"


def manifest_of(folder: Path, stage: str) -> Path:
    """The manifest a stage writes into `folder`: <stage>.manifest.json."""
    return Path(folder) / f"{stage}{MANIFEST_SUFFIX}"


@dataclass(frozen=True)
class Part:
    """One trained model's folder: fold<k>/ (validated on fold k) or full/ (the refit)."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def is_refit(self) -> bool:
        return self.dir.name == REFIT

    @property
    def best(self) -> Path:  # the weights chosen by the metric (the refit: the last epoch)
        return self.dir / "best.pt"

    @property
    def last(self) -> Path:  # every epoch: weights, optimiser, scheduler, RNG, input fingerprints
        return self.dir / "last.pt"

    @property
    def log(self) -> Path:
        return self.dir / "log.csv"

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def oof(self) -> Path:  # the validation fold predicted after training, no TTA
        return self.dir / "oof.csv"

    @property
    def oof_tta(self) -> Path:  # the validation fold predicted again by `make predict`, with TTA
        return self.dir / "oof_tta.csv"

    @property
    def test_probs(self) -> Path:
        return self.dir / "test_probs.csv"

    @property
    def confusion_csv(self) -> Path:
        return self.dir / "confusion.csv"

    @property
    def confusion_png(self) -> Path:
        return self.dir / "confusion.png"

    @property
    def curves(self) -> Path:
        return self.dir / "curves.png"

    @property
    def console_log(self) -> Path:  # a fold's output under --parallel folds
        return self.dir / "train.log"

    @property
    def train_manifest(self) -> Path:
        return manifest_of(self.dir, "train")

    @property
    def predict_manifest(self) -> Path:
        return manifest_of(self.dir, "predict")

    @property
    def dataset_stats(self) -> Path:  # shared by the experiment's parts
        return Experiment(self.dir.parent.name, self.dir.parent).dataset_stats

    def top(self, epoch: int) -> Path:
        """The kept weights of one of the best epochs (train.average_best)."""
        return self.dir / "top" / f"epoch{epoch}.pt"

    def trained_outputs(self) -> list[Path]:
        """What a training of this part writes and its manifest fingerprints."""
        files = [self.best, self.log, self.config]
        return files if self.is_refit else [self.best, self.log, self.oof, self.config]

    def predicted_outputs(self) -> list[Path]:
        return [self.test_probs] if self.is_refit else [self.test_probs, self.oof_tta]


@dataclass(frozen=True)
class Experiment:
    """runs/<competition>/<experiment>/: one experiment's folds, refit and summaries."""

    name: str
    dir: Path

    @property
    def config(self) -> Path:  # the experiment's resolved settings, read by runs and ensemble
        return self.dir / "config.yaml"

    @property
    def summary_csv(self) -> Path:
        return self.dir / "summary.csv"

    @property
    def summary_md(self) -> Path:
        return self.dir / "summary.md"

    @property
    def dataset_stats(self) -> Path:  # augment.normalize: dataset, computed once per experiment
        return self.dir / "dataset_stats.json"

    @property
    def budget(self) -> Path:  # train.time_budget: the epochs it became, and the probe's timing
        return self.dir / "budget.json"

    @property
    def search(self) -> Path:  # `make tune`: the folds that chose its settings (searches.py)
        return self.dir / "search.json"

    @property
    def lr_sweep_csv(self) -> Path:  # `make lr`: the loss at each learning rate of the sweep
        return self.dir / "lr_sweep.csv"

    @property
    def lr_sweep_png(self) -> Path:
        return self.dir / "lr_sweep.png"

    @property
    def lr_sweep_manifest(self) -> Path:
        return manifest_of(self.dir, "lr_sweep")

    @property
    def lock(self) -> Path:
        """One process at a time trains, predicts or refits it (locks.py); kept in the
        competition's lock folder, so a refused command leaves no experiment folder behind."""
        return self.dir.parent / LOCKS / f"experiment-{self.name}.lock"

    def fold(self, k: int) -> Part:
        return Part(self.dir / part_name(k))

    @property
    def refit(self) -> Part:
        return Part(self.dir / REFIT)



@dataclass(frozen=True)
class Submission:
    """submissions/<competition>/<name>.csv with its report and manifest."""

    name: str
    csv: Path

    @property
    def report(self) -> Path:
        return self.csv.with_suffix(".md")

    @property
    def manifest(self) -> Path:
        return self.csv.with_suffix(MANIFEST_SUFFIX)


@dataclass(frozen=True)
class PseudoSet:
    """pseudo/<competition>/<set>/: one pseudo-label set of `make pseudo`."""

    name: str
    dir: Path

    def part(self, name: str) -> Path:  # fold<k>.csv or full.csv
        return self.dir / f"{name}.csv"

    @property
    def manifest(self) -> Path:
        return manifest_of(self.dir, "pseudo")


@dataclass(frozen=True)
class Audit:
    """audit/<competition>/: what `make audit` found, each finding with its manifest."""

    dir: Path

    @property
    def duplicates(self) -> Path:  # group, part, id, label, found: images in groups of copies
        return self.dir / "duplicates.csv"

    @property
    def duplicates_png(self) -> Path:
        return self.dir / "duplicates.png"

    @property
    def shift(self) -> Path:  # adversarial validation: AUC per feature set and feature
        return self.dir / "shift.csv"

    @property
    def test_like(self) -> Path:  # training rows ranked by how test-like they look
        return self.dir / "test_like.csv"

    def label_issues(self, experiment: str) -> Path:  # suspects from an experiment's OOF
        return self.dir / f"label_issues_{experiment}.csv"

    def label_issue_files(self) -> dict[str, Path]:
        """experiment -> its label suspects' file, for every experiment audited."""
        prefix = "label_issues_"
        found = sorted(self.dir.glob(f"{prefix}*.csv")) if self.dir.is_dir() else []
        return {path.stem[len(prefix):]: path for path in found}

    def suspects_png(self, experiment: str) -> Path:
        return self.dir / f"label_issues_{experiment}.png"

    def manifest(self, finding: Path) -> Path:
        return finding.with_suffix(MANIFEST_SUFFIX)


@dataclass(frozen=True)
class Report:
    """reports/<competition>/: the static HTML report of `make report`, each page with its
    manifest; pictures under images/ (shared by the pages, named by what they show)."""

    dir: Path

    @property
    def index(self) -> Path:
        return self.dir / "index.html"

    def experiment(self, name: str) -> Path:
        return self.dir / "experiments" / f"{name}.html"

    @property
    def images(self) -> Path:
        return self.dir / "images"

    def manifest(self, page: Path) -> Path:
        return page.with_suffix(MANIFEST_SUFFIX)


@dataclass(frozen=True)
class Layout:
    """Every folder and file of one competition."""

    competition: str
    runs: Path  # runs/<competition>/
    folds_dir: Path
    submissions: Path  # submissions/<competition>/
    pseudo: Path
    bundles: Path
    audit: Path
    reports: Path

    @classmethod
    def of(cls, config: Config) -> Layout:
        name = config.data.name
        return cls(name, Path(config.runs_dir) / name, Path(config.folds.dir),
                   Path(config.submissions_dir) / name, Path(config.pseudo_dir) / name,
                   Path(config.bundles_dir) / name, Path(config.audit_dir) / name,
                   Path(config.reports_dir) / name)

    # ---- folds ---------------------------------------------------------------------------

    @property
    def folds_csv(self) -> Path:
        return self.folds_dir / f"{self.competition}.csv"

    @property
    def folds_manifest(self) -> Path:
        return self.folds_csv.with_suffix(MANIFEST_SUFFIX)

    @property
    def folds_dropped(self) -> Path:  # training images left out as bad (data.drop_bad_images)
        return self.folds_csv.with_suffix(".dropped.csv")

    @property
    def folds_lock(self) -> Path:
        return self.runs / LOCKS / "folds.lock"

    @property
    def old_folds_csv(self) -> Path:  # the layout before each competition had its own file
        return self.folds_dir / "folds.csv"

    # ---- experiments ---------------------------------------------------------------------

    def experiment(self, name: str) -> Experiment:
        return Experiment(name, self.runs / name)

    def experiment_names(self) -> list[str]:
        """Every experiment folder of the competition (one holding config.yaml)."""
        if not self.runs.is_dir():
            return []
        return sorted(p.name for p in self.runs.iterdir()
                      if self.experiment(p.name).config.is_file())

    def fold_numbers(self, experiment: str) -> list[int]:
        """The k of every fold<k>/ folder an experiment has on disk."""
        folder = self.runs / experiment
        found = [_FOLD.match(p.name) for p in folder.iterdir()] if folder.is_dir() else []
        return sorted(int(m.group(1)) for m in found if m)

    def leaderboard(self, suffix: str) -> Path:  # csv, md, png
        return self.runs / f"leaderboard.{suffix}"

    def tune_dir(self, experiment: str) -> Path:  # `make tune`: the study, its trials' table
        return self.runs / "tune" / experiment.replace("/", "-")

    def tune_trials(self, experiment: str) -> Path:  # one row per trial: state, score, settings
        return self.tune_dir(experiment) / "trials.csv"

    def tune_importance(self, experiment: str) -> Path:  # Optuna's importance of each setting
        return self.tune_dir(experiment) / "importance.csv"

    def tuned_experiments(self) -> list[str]:
        """The experiments `make tune` has searched (a trials table written)."""
        folder = self.runs / "tune"
        return sorted(p.parent.name for p in folder.glob("*/trials.csv")) if folder.is_dir() else []

    @property
    def mlflow_store(self) -> Path:  # tracking: mlflow, unless MLFLOW_TRACKING_URI says where
        return self.runs / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:  # the store's artefacts (the plots, the log)
        return self.runs / "mlartifacts"

    def tensorboard(self, experiment: str, part: str) -> Path:  # tracking: tensorboard
        return self.runs / "tensorboard" / experiment / part

    @property
    def micro_batches(self) -> Path:  # train.micro_batch: auto, measured per GPU, model, size
        return self.runs / "micro_batches.json"

    # ---- what comes of them --------------------------------------------------------------

    def submission(self, name: str) -> Submission:
        return Submission(name, self.submissions / f"{name}.csv")

    def refit_submission(self, experiment: str) -> Submission:
        return self.submission(f"{experiment}_refit")

    @property
    def public_leaderboard(self) -> Path:  # `make submit` and `make lb`: uploads and their scores
        return self.submissions / PUBLIC_LEADERBOARD

    @property
    def public_leaderboard_plot(self) -> Path:  # nested CV against the public/private LB
        return self.public_leaderboard.with_suffix(".png")

    @property
    def submissions_lock(self) -> Path:
        return self.runs / LOCKS / "submissions.lock"

    @property
    def pseudo_lock(self) -> Path:
        return self.runs / LOCKS / "pseudo.lock"

    @property
    def audit_lock(self) -> Path:
        return self.runs / LOCKS / "audit.lock"

    def submission_manifests(self) -> list[Path]:
        folder = self.submissions
        return sorted(folder.glob(f"*{MANIFEST_SUFFIX}")) if folder.is_dir() else []

    def pseudo_set(self, name: str) -> PseudoSet:
        return PseudoSet(name, self.pseudo / name)

    def bundle(self, name: str) -> Path:
        return self.bundles / f"{name}.zip"

    @property
    def findings(self) -> Audit:
        return Audit(self.audit)

    @property
    def report(self) -> Report:
        return Report(self.reports)

    @property
    def report_lock(self) -> Path:
        return self.runs / LOCKS / "report.lock"


def submission_of_manifest(path: Path) -> str:
    """The submission's name from its manifest's path (<name>.manifest.json)."""
    return Path(path).name[:-len(MANIFEST_SUFFIX)]


def old_layout_runs(runs_dir: Path) -> list[Path]:
    """runs/<model>/fold<k>/ folders of the layout before competitions had their own folder."""
    return sorted({p.parent for p in Path(runs_dir).glob("*/fold*") if p.is_dir()
                   and not (p.parent / "config.yaml").is_file()})


# --------------------------------------------------------------------------------------------
# Inside an offline bundle (bundles/<competition>/<name>.zip), relative to its root

BUNDLE_FORMAT = 1  # of bundle.json; infer refuses other formats
BUNDLE_MANIFEST = "bundle.json"  # format, versions, and the SHA-256 of every other file
BUNDLE_RECIPE = "ensemble.json"  # classes, data settings, members, method, weights, decoding
BUNDLE_SAMPLE = "sample_submission.csv"
BUNDLE_REQUIREMENTS = "requirements.txt"
BUNDLE_README = "README.md"


def bundle_member(experiment: str, part: str) -> str:
    """A checkpoint's path stem inside a bundle: members/<experiment>/<part> (.safetensors/.json)."""
    return f"members/{experiment}/{part}"
