"""Typed, validated configuration, read once at the entry point.

A run's config is layered, later layers winning:

    code defaults (below)  <  the competition's `defaults:` block (configs/data/<DATA>.yaml)
                           <  the experiment file (configs/<MODEL>.yaml)
                           <  `key=value` overrides from the command line (`ARGS`, `EPOCHS`, ...)

The merged mapping is validated into frozen pydantic models: an unknown key or a wrong type is an
error that names the key and, for a misspelling, the nearest valid one. Stages below the entry
point take explicit arguments, not this object; the resolved config is saved beside every output.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.base.task import Task
from pipeline.base.utils import write_text_atomic

CONFIG_DIR = Path("configs")

METRICS = ("accuracy", "macro_f1", "weighted_f1", "binary_f1", "qwk", "roc_auc", "log_loss")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the remedy."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where a competition's files are and what they mean. Paths are relative to `root`."""

    name: str
    root: str  # folder holding the CSVs and image folders
    # None: no CSV, the labels are the folder names (image_path "{label}/{id}.png": every file of
    # train/<class>/ is a labelled row of that class, its id what {id} stands for)
    train_csv: str | None = "train.csv"
    test_csv: str | None = "test.csv"  # None: test ids come from the sample submission
    sample_submission: str = "sample_submission.csv"
    solution_csv: str | None = None  # held-out test labels, when known (the demo); used for scoring
    train_images: str = "train"  # image folder of the labelled rows
    test_images: str = "test"
    id_column: str = "id"
    label_column: str = "label"
    # How a row maps to a file inside the image folder: {id}, {label} (the label column) and any
    # other column of the train CSV, e.g. "{id}.png", "{label}/{id}.png", "{patient}/{id}.jpeg".
    image_path: str = "{id}.png"
    # The same for the test folder, whose CSV has no labels; None: image_path. It may use {id} and
    # the test CSV's columns (only {id} when test_csv is null: the sample holds predictions).
    test_image_path: str | None = None
    classes: list[str]  # numbers or names, as the competition spells them; order = model outputs
    metric: Literal["accuracy", "macro_f1", "weighted_f1", "binary_f1", "qwk", "roc_auc",
                    "log_loss"] = "accuracy"
    ordinal: bool = False  # labels are ordered grades (retina): enables QWK and threshold decoding
    group_column: str | None = None  # rows sharing a group never straddle folds
    group_pattern: str | None = None  # regex on the id whose first group is the group, e.g. ^(\d+)_
    # label: one label column; probabilities: one column per class; positive_probability: a
    # binary competition's one column (id,target) with the positive class's probability;
    # auto: read off the sample submission's header (pipeline/ensembling/submission.py, submission_kind)
    submission: Literal["auto", "label", "probabilities", "positive_probability"] = "auto"
    positive_class: str | None = None  # binary: the class whose probability is submitted/scored;
    #                                    None: the second of `classes`
    drop_bad_images: bool = False  # drop missing/unreadable training images instead of failing
    # the competition's name on Kaggle (its URL's: kaggle.com/competitions/<slug>), for `make
    # submit` and `make lb`; None: not set (those verbs say where to set it)
    kaggle: str | None = None
    # width x height above which an image is refused from its header, before it is decoded (a
    # 20000 x 20000 PNG of 388 KB decodes to 1.2 GB): 10,000 x 10,000 covers any real photo
    max_image_pixels: int = Field(100_000_000, ge=1)
    defaults: dict[str, Any] = Field(default_factory=dict)  # experiment defaults for this competition
    # the competition YAML this was read from (load_config sets it): a later command reads the
    # competition again from here to judge a saved experiment by its experiment file of now
    config_file: str | None = None

    @field_validator("classes", mode="before")
    @classmethod
    def _classes_as_strings(cls, value: Any) -> Any:
        # YAML reads `classes: [0, 1]` as ints; labels in CSVs are compared as strings.
        if isinstance(value, list):
            return [str(v) for v in value]
        return value

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, value: list[str]) -> list[str]:
        if len(value) < 2:
            raise ValueError("needs at least two classes")
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicated classes {dupes}")
        return value

    @field_validator("positive_class", mode="before")
    @classmethod
    def _positive_as_string(cls, value: Any) -> Any:
        return None if value is None else str(value)  # `positive_class: 1` names class "1"

    @field_validator("image_path", "test_image_path")
    @classmethod
    def _image_path_has_id(cls, value: str | None) -> str | None:
        if value is None:
            return value
        fields = path_fields(value)  # raises ValueError for a malformed pattern
        if "id" not in fields:
            raise ValueError(f"{value!r} must contain '{{id}}', e.g. '{{id}}.jpeg' or "
                             f"'{{label}}/{{id}}.png'")
        return value

    @field_validator("group_pattern")
    @classmethod
    def _pattern_has_group(cls, value: str | None) -> str | None:
        if value is not None and re.compile(value).groups < 1:
            raise ValueError(f"{value!r} needs one capture group, e.g. '^(\\d+)_(left|right)$'")
        return value

    @model_validator(mode="after")
    def _one_group_source(self) -> DataConfig:
        if self.group_column and self.group_pattern:
            raise ValueError("set group_column or group_pattern, not both")
        return self

    @model_validator(mode="after")
    def _binary_settings(self) -> DataConfig:
        if self.positive_class is not None and self.positive_class not in self.classes:
            raise ValueError(f"positive_class {self.positive_class!r} is not one of the classes "
                             f"{self.classes}")
        binary_only = [name for name, used in (
            ("positive_class", self.positive_class is not None),
            ("metric: binary_f1", self.metric == "binary_f1"),
            ("submission: positive_probability", self.submission == "positive_probability"))
            if used]
        if binary_only and len(self.classes) != 2:
            verb = "needs" if len(binary_only) == 1 else "need"
            raise ValueError(f"{' and '.join(binary_only)} {verb} exactly two classes; got "
                             f"{len(self.classes)} ({self.classes})")
        return self

    @model_validator(mode="after")
    def _folder_labels(self) -> DataConfig:
        """train_csv: null reads the labels off the folder names: the path needs {label}, and no
        other column exists to fill a field or name a group."""
        if self.train_csv is not None:
            return self
        fields = path_fields(self.image_path)
        if "label" not in fields:
            raise ValueError(f"train_csv: null takes the labels from folder names, so image_path "
                             f"needs '{{label}}', e.g. '{{label}}/{{id}}.png' (got "
                             f"{self.image_path!r})")
        others = sorted(fields - {"id", "label"})
        if others:
            raise ValueError(f"train_csv: null has no columns for image_path fields {others}; use "
                             f"only {{label}} and {{id}}")
        if self.group_column:
            raise ValueError("train_csv: null has no columns: use group_pattern, not group_column")
        return self

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    @property
    def test_path_pattern(self) -> str:
        """The test folder's path pattern: test_image_path, else image_path."""
        return self.test_image_path or self.image_path


def path_fields(pattern: str) -> set[str]:
    """The fields of an image path pattern: '{label}/{id}.png' -> {'label', 'id'}.

    Fields are plain names (column names, spaces allowed); '{}' , '{0}', '{id.x}' and '{id[0]}'
    are refused, since a path field stands for one column of a row.
    """
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as err:
        raise ValueError(f"{pattern!r} is not a valid path pattern: {err} (write fields as "
                         f"{{column}}, and a literal brace as {{{{ or }}}})") from None
    fields = set()
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit() or "." in name or "[" in name:
            raise ValueError(f"{pattern!r}: field {{{name}}} must name a column, e.g. {{id}}")
        fields.add(name)
    return fields


class FoldsConfig(_Section):
    n_splits: int = Field(5, ge=2)
    seed: int = 42
    dir: str = "folds"  # folds.csv goes here
    # find the duplicate images (the audit's finding, audit/<c>/duplicates.csv: found once, by
    # `make folds` or `make audit`, whichever comes first) and keep each group in one fold, as a
    # group column or pattern keeps a patient's eyes
    duplicates: bool = True
    # a duplicate group whose labels disagree: keep it (listed), drop its rows, or give them the
    # group's majority label (ties: the first in the class list)
    duplicate_conflicts: Literal["keep", "drop", "majority"] = "keep"


class ModelConfig(_Section):
    name: str = "resnet18"  # ours: resnet18..152, resnet20..110; timm: timm/<name>
    # classification: one logit per class; regression: one output, the grade (ordinal
    # competitions), trained with train.regression_loss and decoded by thresholds; both: the
    # class logits and the grade on one body, the losses summed (train.grade_loss_weight), and
    # the ensemble chooses out of fold which of the two each member submits from
    head: Literal["classification", "regression", "both"] = "classification"
    pretrained: bool = False
    weights: str | None = None  # path to a .safetensors/.pt/.pth state_dict; overrides weights_dir
    weights_dir: str = "weights"  # pretrained weights found here by name: <name>.safetensors
    drop_rate: float = Field(0.0, ge=0, lt=1)  # dropout before the classifier
    # stochastic depth: each residual branch dropped per sample with a rate rising linearly over
    # the blocks from 0 to this (ours and timm's; identity at eval, no parameters)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    zero_init_last: bool = True  # zero each block's last BN gamma (train from scratch faster)
    # cifar: our resnet18..152 get a 3x3 stride-1 stem without max-pool (total stride 8, not 32),
    # for small images (< 64 px); the CIFAR family resnet20..110 always has it; not for timm.
    # auto: the CIFAR stem where the ImageNet stem would end below 2x2 px, else the ImageNet one
    # (the default: ahead on five members of the benchmark suite, level on the sixth)
    stem: Literal["imagenet", "cifar", "auto"] = "auto"


Transform = dict[str, dict[str, Any]]  # one albumentations transform: {Name: {arg: value}}


class AugmentConfig(_Section):
    image_size: int = Field(224, ge=8)  # pixels, square; the model's input size
    # Progressive resizing: {first epoch (1-based, as the log counts): size}, e.g. {1: 128, 9: 256}
    # trains epochs 1-8 at 128 px and the rest at 256. The largest size, which must be the last
    # and image_size, is the one validated, cached and predicted at. {}: image_size throughout.
    # "progressive": half of image_size for the first half of train.epochs (progressive_sizes),
    # resolved when the config is read, so the run's settings hold the schedule it trained.
    sizes: dict[int, Annotated[int, Field(ge=8)]] = Field(default_factory=dict)

    @field_validator("sizes", mode="before")
    @classmethod
    def _no_schedule(cls, value: Any) -> Any:
        return {} if value is None else value  # `augment.sizes=null` turns a schedule off
    # area: alias-free shrinking of large photos; linear/cubic: enlarging small images (digits)
    interpolation: Literal["area", "linear", "cubic", "nearest"] = "area"
    train: list[Transform] = Field(default_factory=list)  # after the resize; any albumentations
    eval: list[Transform] = Field(default_factory=list)
    normalize: Literal["model", "imagenet", "dataset", "custom", "none"] = "model"
    mean: list[float] | None = None  # only for normalize: custom; 0..1 scale, RGB
    std: list[float] | None = None

    @field_validator("train", "eval")
    @classmethod
    def _one_name_per_item(cls, value: list[Transform]) -> list[Transform]:
        for item in value:
            if len(item) != 1:
                raise ValueError(f"each transform is one 'Name: {{args}}' mapping, got {item}")
        return value

    @model_validator(mode="after")
    def _sizes_end_at_image_size(self) -> AugmentConfig:
        if not self.sizes:
            return self
        firsts = sorted(self.sizes)
        if firsts[0] != 1:
            raise ValueError(f"sizes: the schedule starts at epoch 1 (its keys are the first "
                             f"epoch of each size, counted from 1), got {self.sizes}")
        last = self.sizes[firsts[-1]]
        if last != self.image_size or max(self.sizes.values()) != last:
            raise ValueError(f"sizes {self.sizes}: the last size is the largest and is "
                             f"image_size, the one validated and predicted at; set "
                             f"augment.image_size={max(self.sizes.values())} and end with it")
        return self

    @model_validator(mode="after")
    def _custom_needs_stats(self) -> AugmentConfig:
        if self.normalize == "custom" and (self.mean is None or self.std is None):
            raise ValueError("normalize: custom needs mean and std (three numbers each, 0..1)")
        return self


# The learning rate and weight decay each optimiser starts from when they are not set. AdamW at
# 3e-3 (decay 0.05) is the default, measured on the benchmark suite (bench/BENCHMARKS.md): it
# beat SGD at 0.05 on every member, by up to +0.45 accuracy with many classes of few images, and
# never collapsed to the majority class; SGD keeps its 0.05 (Nesterov, 5e-4), Adam 1e-3.
OPTIMIZER_DEFAULTS = {"adamw": {"lr": 0.003, "weight_decay": 0.05},
                      "sgd": {"lr": 0.05, "weight_decay": 5e-4},
                      "adam": {"lr": 0.001, "weight_decay": 5e-4}}


def minutes(value: Any) -> Any:
    """A duration in minutes from 90, "90", "90m", "90min", "1.5h" or "2h30m" (BUDGET=2h)."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower().replace(" ", "")
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)(?:m|min)?)?", text)
    if not text or match is None:
        raise ValueError(f"{value!r} is no duration: minutes (90, 90m) or hours (2h, 1h30m)")
    hours, mins = match.groups()
    return 60 * float(hours or 0) + float(mins or 0)


class TrainConfig(_Section):
    epochs: int = Field(30, ge=1)
    # minutes a fold may train (BUDGET=): `make train` turns it into train.epochs from a timing
    # probe of the real model, data and device, recorded in runs/<c>/<experiment>/budget.json
    # (pipeline/training/budget.py); None: train.epochs as set
    time_budget: float | None = Field(None, gt=0)

    @field_validator("time_budget", mode="before")
    @classmethod
    def _minutes(cls, value: Any) -> Any:
        return minutes(value)
    batch_size: int = Field(64, ge=1)  # global: under torchrun each of N processes takes 1/N
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    # peak learning rate of the head (and body, see body_lr_mult); unset: the optimiser's own
    # (OPTIMIZER_DEFAULTS), so `train.optimizer=sgd` alone trains at SGD's 0.05
    lr: float = Field(0.003, gt=0)
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    weight_decay: float = 0.05  # unset: the optimiser's own, as lr
    scheduler: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)  # linear warm-up, then the schedule
    milestones: list[int] = Field(default_factory=list)  # multistep: epochs where lr *= gamma
    gamma: float = 0.1
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = 2.0
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # sqrt_inverse: chosen on the benchmark suite (README, "Training recipes"): never worse,
    # +0.09 QWK on the ordinal member whose rare grades have looks of their own. Unset: none
    # with the balanced sampler and on log-loss competitions (LOG_LOSS_DEFAULTS)
    # a list: one weight > 0 per class (a weight of 0 would make a batch of that class alone a
    # 0/0 loss; train.exclude leaves rows out)
    class_weights: Literal["none", "inverse", "sqrt_inverse", "effective"] | list[
        Annotated[float, Field(gt=0)]] = "sqrt_inverse"
    effective_beta: float = Field(0.999, gt=0, lt=1)  # for class_weights: effective
    sampler: Literal["shuffle", "balanced"] = "shuffle"  # balanced: classes drawn equally often
    head_only_epochs: int = Field(0, ge=0)  # two-stage fine-tuning: train only the head first
    body_lr_mult: float = Field(1.0, gt=0)  # body lr = lr * body_lr_mult after the head stage
    early_stopping: int = Field(0, ge=0)  # patience in epochs without improvement; 0: off
    grad_clip: float = Field(0.0, ge=0)  # max gradient norm; 0: off
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + scaler)
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the model (CUDA)
    # Several GPUs (torchrun): BatchNorm statistics over the global batch rather than each GPU's
    # batch_size / GPUs images. CUDA only; no effect in one process. batch_size is the global batch.
    sync_bn: bool = False
    workers: int | None = None  # DataLoader workers; None: chosen from the machine
    device: str = "auto"  # auto, cpu, cuda, cuda:1
    seed: int = 42
    max_batches: int | None = None  # debug: stop each epoch after this many batches
    regression_loss: Literal["mse", "smooth_l1"] = "smooth_l1"  # model.head: regression, both
    grade_loss_weight: float = Field(1.0, ge=0)  # model.head: both: loss = CE + this * grade loss
    # Weight EMA (timm ModelEmaV3, with its warm-up): validated, saved in best.pt and predicted
    # with the averaged weights; the raw ones stay in last.pt for a resume.
    ema: bool = False
    ema_decay: float = Field(0.999, gt=0, lt=1)  # per optimiser step, after the warm-up
    # mixup / cutmix (timm.data.Mixup): alpha of the Beta distribution; 0 is off. Targets become
    # soft; class weights then weigh each class's share of a soft target (losses.py).
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    mix_prob: float = Field(1.0, ge=0, le=1)  # share of batches mixed
    accumulate: int = Field(1, ge=1)  # micro-batches per optimiser step: batch_size * accumulate
    # Images per forward and backward pass on each device. The loader always yields batch_size
    # images (each GPU its share) in the order the seed fixes; a batch too large for the GPU
    # goes through in passes of at most micro_batch images, their gradients summed before the
    # step: the same images and optimiser steps on any GPU (BatchNorm's statistics are a pass's,
    # as they are a GPU's under torchrun). None: the whole batch in one pass; auto: the largest
    # pass that fits, measured on CUDA once per GPU, model, size and precision (training/
    # fitting.py); a CPU keeps the whole batch. In one process, a CUDA out-of-memory error in
    # training halves the pass and goes on from last.pt, whatever this is set to.
    micro_batch: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    average_best: int = Field(0, ge=0)  # best.pt = the mean weights of the k best epochs; 0: off
    # How a fold's best epoch (best.pt) is chosen, never by fitting on the rows it scores:
    # metric: the competition metric of a fixed decoding (argmax; a grade rounded); loss: the
    # validation loss; cross_fit: the metric after thresholds / a cut-off fitted on one half of
    # the validation fold and scored on the other. pipeline/base/task.py (EpochRule). The default,
    # loss, was chosen on the benchmark suite by the rule for defaults (bench/epoch_rule.py, README
    # "Training recipes"): never behind metric beyond the seed spread, ahead on 30 classes.
    epoch_rule: Literal["metric", "loss", "cross_fit"] = "loss"
    # a pseudo-label set of `make pseudo` (pseudo/<competition>/<name>/): its test images join
    # each fold's training part, never its validation part
    pseudo: str | None = None
    # a CSV with an `id` column (audit/<competition>/label_issues_<experiment>.csv): those rows
    # leave every fold's training part and the refit's; they stay in the validation folds, so
    # the CV still scores every row and stays comparable with the experiment without it
    exclude: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _optimizer_defaults(cls, values: Any) -> Any:
        """The chosen optimiser's lr and weight decay where the settings leave them out."""
        if not isinstance(values, dict):
            return values
        chosen = OPTIMIZER_DEFAULTS.get(values.get("optimizer", "adamw"), {})
        return {**{k: v for k, v in chosen.items() if values.get(k) is None}, **{
            k: v for k, v in values.items() if v is not None or k not in chosen}}

    @model_validator(mode="before")
    @classmethod
    def _balanced_sampler_needs_no_weights(cls, values: Any) -> Any:
        """The balanced sampler corrects the imbalance already: class weights on top would
        correct it twice, so they default to none with it."""
        if isinstance(values, dict) and values.get("sampler") == "balanced" and \
                values.get("class_weights") is None:
            return {**values, "class_weights": "none"}
        return values

    @model_validator(mode="after")
    def _mixing_needs_hard_labels(self) -> TrainConfig:
        if (self.mixup or self.cutmix) and self.loss == "focal":
            raise ValueError("mixup/cutmix make soft targets; use loss: ce with them")
        return self


class TTAConfig(_Section):
    views: Literal["none", "hflip", "vflip", "flips", "d4", "shifts", "scales"] = "none"
    reduce: Literal["mean", "geomean"] = "mean"
    shift: float = 0.1  # shifts: fraction of the image size
    scale: float = 0.1  # scales: +/- this zoom factor
    # Predict at this size instead of augment.image_size: above it, the train/test resolution
    # discrepancy (Touvron et al. 2019, FixRes: random-crop training sees objects larger than a
    # centred test image at the same size). The images are read at it (a cache of its own).
    image_size: int | None = Field(None, ge=8)


class PseudoConfig(_Section):
    """`make pseudo`: the current ensemble's test predictions as training labels."""

    mode: Literal["hard", "soft"] = "hard"  # hard: confident argmax labels; soft: the distribution
    threshold: float = Field(0.9, gt=0, le=1)  # hard: keep test images whose top probability >= this


class EnsembleConfig(_Section):
    # mean | median | trimmed | rank | fitted (weights) | hillclimb (greedy selection) | stack
    # (a level-2 model) | auto (each scored nested, the best used): pipeline/ensembling/combine.py
    method: Literal["mean", "median", "trimmed", "rank", "fitted", "hillclimb", "stack",
                    "auto"] = "mean"
    # stack: logistic regression on the members' log-probabilities, or (ordinal competitions)
    # ridge regression on their expected grades (pipeline/ensembling/stacking.py)
    stacker: Literal["logreg", "ridge"] = "logreg"
    hillclimb_rounds: int = Field(50, ge=1)  # hillclimb: at most this many picks
    # How probabilities become labels: thresholds on the expected grade (ordinal), a cut-off on
    # the positive class (binary); auto: thresholds for an ordinal QWK label submission, a cut-off
    # for a binary one scored by F1, else argmax. A fitted decoder is used only when its nested
    # out-of-fold score beats argmax (pipeline/ensembling/decode.py).
    decode: Literal["auto", "argmax", "thresholds", "cutoff"] = "auto"
    refit_weight: float = Field(1.0, ge=0)  # weight of a model's full-data refit beside its folds
    name: str | None = None  # submission file name; None: made from the models and CV score
    # Runs of one experiment that differ only in train.seed (SEEDS=0,1,2): averaged into one
    # member before the members are combined, or kept as members of their own.
    seeds: Literal["average", "separate"] = "average"


class PredictConfig(_Section):
    """Inference settings that change speed and memory only, never the predictions."""

    # images per inference batch; None: train.batch_size // TTA views on a GPU (all views of a
    # batch go through the model at once, so the model sees at most a training batch), and
    # train.batch_size on a CPU (one view per pass). See engine.inference_batch_size.
    batch_size: int | None = Field(None, ge=1)


class RefitConfig(_Section):
    epochs: int | None = Field(None, ge=1)  # None: the median best epoch of the folds


class CacheConfig(_Section):
    """The resized-image cache (pipeline/stages/cache.py): each image decoded and shrunk once.

    `enabled`, `format` and `dir` change only speed and disk use; `size`, `mode`,
    `crop_black_border`, `crop_circle` and `ben_graham` change the images, with or without the
    cache (the uncached loader runs the same preprocessing on every read).
    """

    enabled: bool = False  # train/predict read (and first build) the cache; `make cache` builds it
    # pixels; cap on the stored image (never enlarged). None: augment.image_size, because the
    # first transform resizes to image_size anyway: a margin above it is discarded again by a
    # ~0.55 ms resize per image and epoch, nearly as much as the rest of the cached read (bench/)
    size: int | None = Field(None, ge=8)
    # resize: squash to size x size, exactly the pipeline's first transform (smallest files);
    # keep_aspect: shorter side = size; center_crop: the centred square, then size x size
    mode: Literal["resize", "keep_aspect", "center_crop"] = "resize"
    crop_black_border: bool = False  # cut the black frame around a fundus photo before resizing
    # Fundus photos (the Kaggle retina write-ups). crop_circle: crop to the bright disc's bounding
    # box (as crop_black_border), then black outside the circle inscribed in that box, before
    # resizing: every eye becomes the same centred disc, whatever the camera's frame.
    crop_circle: bool = False
    # ben_graham (Ben Graham, EyePACS 2015 winner): subtract the local average colour, after the
    # resize: out = clip(4 * img - 4 * GaussianBlur(img, sigma) + 128, 0, 255), sigma = r / 30
    # pixels, r = the eye's radius in pixels at the stored size (about size / 2 after a crop; read
    # off the middle row as he did), and grey 128 beyond 0.9 r, as in his code (the blur of the
    # black frame leaves a ring at the rim). Lighting and pigment differences go, lesions stay.
    ben_graham: bool = False
    format: Literal["npy", "png"] = "npy"  # npy: fastest read; png: lossless, 3x smaller, 10x slower
    dir: str = "cache"  # one sub-folder per preprocessing setting, named by its hash


class AuditConfig(_Section):
    """`make audit` (pipeline/stages/audit.py): duplicates, train/test shift, label suspects."""

    # near copies need no setting: the cut is the competition's own (pipeline/data/duplicates.py)
    shift_folds: int = Field(5, ge=2)  # cross-validation of the train-vs-test classifier
    test_like: int = Field(100, ge=1)  # training rows listed as the most test-like
    shown: int = Field(24, ge=1)  # pictures: duplicate groups, label suspects

    @model_validator(mode="before")
    @classmethod
    def _without_the_hash_settings(cls, values: Any) -> Any:
        """audit.hash and audit.max_distance chose the perceptual hash before issue 27: saved
        configs of then still load (the settings are gone, the detector needs none)."""
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if k not in ("hash", "max_distance")}
        return values


class ReportConfig(_Section):
    """What `make report` shows (pipeline/stages/report.py); no result depends on it."""

    top_losses: int = Field(24, ge=0)  # the out-of-fold images with the highest loss, overall
    per_class: int = Field(6, ge=0)  # and for each class (of the first `classes_shown` classes)
    classes_shown: int = Field(30, ge=1)
    thumbnail: int = Field(128, ge=16)  # pixels, the longer side of each picture


def progressive_sizes(image_size: int, epochs: int) -> dict[int, int]:
    """`augment.sizes: progressive`: half the size for the first half of the epochs, then the
    full size (a quarter of the pixels: fastai's and ffcv's progressive resizing, simplified to
    two phases); the full size throughout where half would be under 8 px or one epoch."""
    half = image_size // 2
    if half < 8 or epochs < 2:
        return {}
    return {1: half, epochs // 2 + 1: image_size}


class Config(_Section):
    run_name: str  # names runs/<competition>/<run_name>/: the experiment file's name (+ suffix)
    data: DataConfig
    folds: FoldsConfig = FoldsConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    tta: TTAConfig = TTAConfig()
    predict: PredictConfig = PredictConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    pseudo: PseudoConfig = PseudoConfig()
    refit: RefitConfig = RefitConfig()
    cache: CacheConfig = CacheConfig()
    audit: AuditConfig = AuditConfig()
    report: ReportConfig = ReportConfig()
    runs_dir: str = "runs"
    submissions_dir: str = "submissions"
    pseudo_dir: str = "pseudo"  # pseudo-label sets of `make pseudo`, per competition
    bundles_dir: str = "bundles"  # offline inference bundles of `make bundle`, per competition
    audit_dir: str = "audit"  # `make audit`'s findings, per competition
    reports_dir: str = "reports"  # `make report`'s static HTML pages, per competition
    # where training's epochs are also logged (pipeline/training/tracking.py): MLflow (a store
    # under runs/<competition>/ unless MLFLOW_TRACKING_URI is set) or TensorBoard; decides nothing
    tracking: Literal["none", "mlflow", "tensorboard"] = "none"
    # How the command that made it was spelled: the experiment file MODEL= read (None: a model
    # name or a saved experiment's settings) and its overrides. A later command that names the
    # experiment judges it by that file as it is now, as `make train` would (state.py).
    experiment_file: str | None = None
    overrides: list[str] = Field(default_factory=list)
    # Paths of a competition's files: pipeline/experiments/layout.py (Layout.of(config)), their one owner.

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @model_validator(mode="before")
    @classmethod
    def _progressive_sizes(cls, values: Any) -> Any:
        augment = values.get("augment") if isinstance(values, dict) else None
        if not isinstance(augment, dict) or augment.get("sizes") != "progressive":
            return values
        size = augment.get("image_size", AugmentConfig.model_fields["image_size"].default)
        epochs = (values.get("train") or {}).get("epochs",
                                                  TrainConfig.model_fields["epochs"].default)
        return {**values, "augment": {**augment,
                                      "sizes": progressive_sizes(int(size), int(epochs))}}

    @property
    def task(self) -> Task:
        """The task (pipeline/base/task.py): metric, positive class, head, epoch rule. A pure
        function of the frozen sections, so not cached: a cache would survive a model_copy that
        changed them. load_config resolves it once, so a bad combination fails at load."""
        return Task.of(self.data, self.model, self.train)


# --------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            content = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(content).__name__}")
    return content


# Mappings that are one value, not sections: a later source replaces them whole (a schedule
# merged with another would keep the phases it meant to drop)
WHOLE_MAPPINGS = frozenset({"augment.sizes"})


def deep_merge(base: dict[str, Any], update: dict[str, Any], _at: str = "") -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base` (mappings merge, everything else, and
    the WHOLE_MAPPINGS, replaces)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{_at}.{key}" if _at else str(key)
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and \
                path not in WHOLE_MAPPINGS:
            merged[key] = deep_merge(merged[key], value, path)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """`train.epochs=3` -> {"train": {"epochs": 3}}; the value is read as YAML (`[1,2]`, `null`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def resolve_data_path(data: str) -> Path:
    """`digits` -> configs/data/digits.yaml; a path is taken as it is."""
    path = Path(data)
    if path.suffix in (".yaml", ".yml"):
        candidates = [path]
    else:
        candidates = [CONFIG_DIR / "data" / f"{data}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
    raise ConfigError(f"competition config {candidates[0]} not found; known: {known}")


def resolve_experiment(model: str) -> tuple[str, dict[str, Any], Path | None]:
    """Return (run name, experiment mapping, file) for `MODEL=...`.

    `resnet18` reads configs/resnet18.yaml; a name without a file (`resnet101`, `timm/convnext_tiny`)
    is a run of the defaults with that model, named with `/` replaced by `-`.
    """
    path = Path(model)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"experiment config {path} not found")
        return path.stem, _read_yaml(path), path
    candidate = CONFIG_DIR / f"{model.replace('/', '-')}.yaml"
    if candidate.is_file():
        return candidate.stem, _read_yaml(candidate), candidate
    return model.replace("/", "-"), {"model": {"name": model}}, None


def saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved experiment's resolved config as an experiment mapping: without its data section
    and name, and without the settings that change no result (where files go, workers, the
    device), which come from the command of now."""
    mapping = {key: copy.deepcopy(value) for key, value in saved.items()
               if key not in ("data", "run_name") and key not in NO_RESULT_KEYS}
    for key in NO_RESULT_KEYS:
        section, _, leaf = key.partition(".")
        if leaf and isinstance(mapping.get(section), dict):
            mapping[section].pop(leaf, None)
    return mapping


def _nearest_key(section: type[BaseModel], key: str) -> str | None:
    matches = difflib.get_close_matches(key, list(section.model_fields), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at `loc` (for 'did you mean')."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _format_errors(err: ValidationError, sources: list[str]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            section = _section_at(loc)
            hint = _nearest_key(section, str(loc[-1])) if section else None
            prefix = ".".join(str(p) for p in loc[:-1])
            if hint:
                hint = f"{prefix}.{hint}" if prefix else hint
                lines.append(f"  {key}: unknown key (did you mean {hint}?)")
            else:
                valid = ", ".join(section.model_fields) if section else ""
                lines.append(f"  {key}: unknown key (valid keys: {valid})")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required but missing")
        else:
            # a section's or the whole config's check: the message names the keys, the input
            # would be the whole section
            got = "" if isinstance(e.get("input"), dict) else f" (got {e.get('input')!r})"
            lines.append(f"  {key}: {e['msg']}{got}")
    where = " + ".join(sources)
    return f"invalid config ({where}):\n" + "\n".join(lines)


def build_config(merged: dict[str, Any], sources: list[str] | None = None) -> Config:
    """Validate a merged mapping into a Config, with errors that name keys."""
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, sources or ["<dict>"])) from None


# --------------------------------------------------------------------------------------------
# An experiment's identity: which settings change what it produces


# Settings that change how fast, where or how verbosely a stage runs, never what it produces:
# they are no part of an experiment's name or fingerprints (a resume may change them too).
NO_RESULT_KEYS = frozenset({
    "run_name", "runs_dir", "submissions_dir", "pseudo_dir", "bundles_dir", "audit_dir",
    "reports_dir", "folds.dir", "tracking", "data.kaggle",
    "train.workers", "train.device", "train.compile", "train.amp", "train.channels_last",
    "train.micro_batch",
    "cache.enabled", "cache.dir", "cache.format", "predict.batch_size",
    "experiment_file", "overrides",
})
# Sections that a later stage reads, not training: a change redoes that stage only (new TTA views
# are predicted again, never retrained), so they do not rename the experiment.
LATER_STAGE_SECTIONS = frozenset({"folds", "tta", "predict", "ensemble", "refit", "pseudo",
                                  "audit", "report"})
# Where a competition's files are and how its test side is submitted. The labelled rows, the fold
# assignment and the images are fingerprinted themselves, so a moved data folder is not a new
# experiment while an edited train.csv is a changed input. `submission` is here because training
# never reads it (the task, pipeline/base/task.py); `positive_class` is not: it changes the metric
# that chooses a binary fold's best epoch.
DATA_FILE_KEYS = frozenset({
    "root", "train_csv", "test_csv", "sample_submission", "solution_csv", "train_images",
    "test_images", "test_image_path", "submission", "drop_bad_images",
    "max_image_pixels", "kaggle",
    "group_column", "group_pattern", "defaults", "config_file",
})


# Settings added after runs were made, at the value that keeps a run as it was: left out of
# every fingerprint and name there, so that runs made before them stay current (no FORCE=1).
ADDED_SETTINGS_OFF = {"augment.sizes": {}, "tta.image_size": None, "train.time_budget": None}


def without_added_off(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """`values` of `section` less the ADDED_SETTINGS_OFF keys at their off value."""
    return {key: value for key, value in values.items()
            if ADDED_SETTINGS_OFF.get(f"{section}.{key}", ...) != value}


def training_settings(mapping: dict[str, Any]) -> dict[str, Any]:
    """The settings of a resolved config (`Config.to_dict()`) that change what training produces."""
    settings: dict[str, Any] = {}
    for section, value in mapping.items():
        if section in LATER_STAGE_SECTIONS or section in NO_RESULT_KEYS:
            continue
        if not isinstance(value, dict):
            settings[section] = value
            continue
        kept = {key: item for key, item in value.items()
                if f"{section}.{key}" not in NO_RESULT_KEYS
                and not (section == "data" and key in DATA_FILE_KEYS)}
        settings[section] = without_added_off(section, kept)
    return settings


def changed_settings(before: dict[str, Any], after: dict[str, Any],
                     prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, before, after) for every leaf that differs between two nested mappings."""
    changes = []
    for key in sorted(set(before) | set(after)):
        path = f"{prefix}{key}"
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += changed_settings(a, b, f"{path}.")
        elif a != b:
            changes.append((path, a, b))
    return changes


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """'train.lr: 0.05 -> 0.01' for every leaf that differs between two nested mappings."""
    return [f"{key}: {a!r} -> {b!r}" for key, a, b in changed_settings(before, after)]


NAME_SUFFIX_MAX = 40  # characters; a longer suffix becomes a hash of the changed settings


def _leaf_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:6]
    return str(value)


def identity_suffix(base: dict[str, Any], overridden: dict[str, Any]) -> str:
    """'lr0.01-epochs30' for the result-changing settings that overrides changed; '' for none.

    Each changed leaf is spelt by its last key (with its section where two changed settings share
    it) and its value; past NAME_SUFFIX_MAX characters, 'h' + 8 hex digits of
    the changed settings instead, so a long list of overrides still names one folder.
    """
    before, after = (_schedule_as_leaf(training_settings(m)) for m in (base, overridden))
    changes = changed_keys(before, after)
    if not changes:
        return ""
    paths = [change.split(":", 1)[0] for change in changes]
    leaves = [path.rsplit(".", 1)[-1] for path in paths]
    parts = []
    for path, leaf in zip(paths, leaves):
        value = after
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        label = leaf if leaves.count(leaf) == 1 else path
        if path == "model.name":
            label = ""  # a model override reads as the model's name itself
        parts.append(f"{label}{_leaf_value(value)}")
    suffix = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "-".join(parts)).strip("-")
    if len(suffix) > NAME_SUFFIX_MAX:
        digest = hashlib.sha256("\n".join(changes).encode()).hexdigest()[:8]
        suffix = f"h{digest}"
    return suffix


def _schedule_as_leaf(settings: dict[str, Any]) -> dict[str, Any]:
    """augment.sizes as one value ('1:128,9:256'), so a name spells the schedule as one setting
    (`sizes1-128-9-256`), not each epoch as a setting of its own."""
    augment = settings.get("augment")
    if not isinstance(augment, dict) or not augment.get("sizes"):
        return settings
    sizes = ",".join(f"{first}:{size}" for first, size in  # keys are strings in a JSON dump
                     sorted(augment["sizes"].items(), key=lambda item: int(item[0])))
    return {**settings, "augment": {**augment, "sizes": sizes}}


def check_run_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+@-]*", name):
        raise ConfigError(f"NAME={name!r}: an experiment name is letters, digits and ._=+@- "
                          f"(it names the folder runs/<competition>/<name>/)")
    return name


# Experiment defaults of every `ordinal: true` competition: the head measured best on both
# ordinal members of the benchmark suite (bench/suite.py; README.md, "Training recipes"): the
# regression head, decoded by thresholds fitted out of fold (ensemble.decode: auto).
ORDINAL_DEFAULTS: dict[str, Any] = {"model": {"head": "regression"}}
# ...and of a competition scored by log-loss: class weights would pull the probabilities the
# metric scores away from the classes' true shares (the suite, which chose sqrt_inverse, has
# no such member)
LOG_LOSS_DEFAULTS: dict[str, Any] = {"train": {"class_weights": "none"}}


def load_config(data: str = "digits", model: str | None = None,
                overrides: list[str] | tuple[str, ...] = (), name: str | None = None,
                *, saved: tuple[dict[str, Any], str] | None = None) -> Config:
    """Read the competition and experiment configs, apply overrides, validate once.

    The run name is the experiment file's stem; overrides that change what training produces add
    a suffix (`identity_suffix`), so another setting is another experiment folder and never
    reuses the first one's results. `name` (NAME=) names the experiment outright. `saved`: the
    resolved config an experiment `model` was trained with and where it was read (experiments/state.py,
    load_experiment), instead of an experiment file.
    """
    data_path = resolve_data_path(data)
    data_mapping = _read_yaml(data_path)
    competition_defaults = data_mapping.get("defaults") or {}
    if not isinstance(competition_defaults, dict):
        raise ConfigError(f"{data_path}: defaults must be a mapping of experiment keys")
    sources = [str(data_path)]

    experiment_path = None
    if model is None:
        run_name, experiment = "data", {}
    elif saved is not None:
        run_name, experiment = model, saved_settings(saved[0])
        sources.append(saved[1])
    else:
        run_name, experiment, experiment_path = resolve_experiment(model)
        sources.append(str(experiment_path) if experiment_path else f"MODEL={model}")
    if "data" in experiment:
        raise ConfigError(f"{sources[-1]}: an experiment cannot set data.*; use DATA=<competition>")

    if data_mapping.get("ordinal"):
        # the recipe measured best on ordinal competitions (bench/recipes.py, README) comes first;
        # the competition's own defaults and the experiment file still override it
        competition_defaults = deep_merge(ORDINAL_DEFAULTS, competition_defaults)
    if data_mapping.get("metric") == "log_loss":
        competition_defaults = deep_merge(LOG_LOSS_DEFAULTS, competition_defaults)
    merged = deep_merge(competition_defaults, experiment)
    merged = deep_merge({"run_name": run_name}, merged)
    merged["data"] = {**data_mapping, "config_file": str(data_path)}
    merged.update(_command_spelling(experiment_path, overrides, saved and saved[0]))
    base = merged
    for text in overrides:
        merged = deep_merge(merged, parse_override(text))
    if overrides:
        sources.append("overrides " + " ".join(overrides))
    config = named(build_config(merged, sources), base, sources, bool(overrides), name=name)
    config.task  # resolved once, here: what training reads of the competition and the settings
    return config


def _command_spelling(experiment_path: Path | None, overrides: list[str] | tuple[str, ...],
                      saved: dict[str, Any] | None) -> dict[str, Any]:
    """Config.experiment_file and .overrides: a saved experiment keeps its own, plus the new
    overrides."""
    if saved:
        return {"experiment_file": saved.get("experiment_file"),
                "overrides": [*saved.get("overrides", []), *overrides]}
    return {"experiment_file": str(experiment_path) if experiment_path else None,
            "overrides": list(overrides)}


def named(config: Config, base: dict[str, Any], sources: list[str], overridden: bool,
          *, name: str | None) -> Config:
    """The config under its experiment's name: NAME= outright, else the experiment's own name
    with a suffix for the result-changing settings the overrides changed from `base`."""
    if name is not None:
        return config.model_copy(update={"run_name": check_run_name(name)})
    run_name = base["run_name"]
    if overridden and config.run_name == run_name:
        try:
            base_dict = build_config(base, sources).to_dict()
        except ConfigError:  # valid only with the overrides: name by all of them
            base_dict = {}
        suffix = identity_suffix(base_dict, config.to_dict())
        if suffix:
            config = config.model_copy(update={"run_name": f"{run_name}-{suffix}"})
    return config


def save_config(config: Config, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_from_dict(mapping: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `save_config` or stored in a checkpoint."""
    return build_config(mapping, ["saved config"])


def parse_models(text: str | None) -> list[str] | None:
    """MODELS="a b,c" -> ['a', 'b', 'c'] as experiment names (`timm/x` -> `timm-x`, a YAML path
    -> its stem), as `resolve_experiment` names them; None for an empty text."""
    if not text or not text.strip():
        return None
    names = [part for part in re.split(r"[\s,]+", text.strip()) if part]
    return [Path(n).stem if n.endswith((".yaml", ".yml")) else n.replace("/", "-") for n in names]
