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
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_DIR = Path("configs")

METRICS = ("accuracy", "macro_f1", "qwk", "roc_auc", "log_loss")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the remedy."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where a competition's files are and what they mean. Paths are relative to `root`."""

    name: str
    root: str  # folder holding the CSVs and image folders
    train_csv: str = "train.csv"
    test_csv: str | None = "test.csv"  # None: test ids come from the sample submission
    sample_submission: str = "sample_submission.csv"
    solution_csv: str | None = None  # held-out test labels, when known (the demo); used for scoring
    train_images: str = "train"  # image folder of the labelled rows
    test_images: str = "test"
    id_column: str = "id"
    label_column: str = "label"
    image_path: str = "{id}.png"  # how an id maps to a file inside the image folder
    classes: list[str]  # numbers or names, as the competition spells them; order = model outputs
    metric: Literal["accuracy", "macro_f1", "qwk", "roc_auc", "log_loss"] = "accuracy"
    ordinal: bool = False  # labels are ordered grades (retina): enables QWK and threshold decoding
    group_column: str | None = None  # rows sharing a group never straddle folds
    group_pattern: str | None = None  # regex on the id whose first group is the group, e.g. ^(\d+)_
    submission: Literal["label", "probabilities"] = "label"
    drop_bad_images: bool = False  # drop missing/unreadable training images instead of failing
    defaults: dict[str, Any] = Field(default_factory=dict)  # experiment defaults for this competition

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

    @field_validator("image_path")
    @classmethod
    def _image_path_has_id(cls, value: str) -> str:
        if "{id}" not in value:
            raise ValueError(f"{value!r} must contain '{{id}}', e.g. '{{id}}.jpeg'")
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

    @property
    def root_path(self) -> Path:
        return Path(self.root)


class FoldsConfig(_Section):
    n_splits: int = Field(5, ge=2)
    seed: int = 42
    dir: str = "folds"  # folds.csv goes here


class ModelConfig(_Section):
    name: str = "resnet18"  # ours: resnet18..152, resnet20..110; timm: timm/<name>
    pretrained: bool = False
    weights: str | None = None  # path to a .safetensors/.pt/.pth state_dict; overrides weights_dir
    weights_dir: str = "weights"  # pretrained weights found here by name: <name>.safetensors
    drop_rate: float = Field(0.0, ge=0, lt=1)  # dropout before the classifier
    zero_init_last: bool = True  # zero each block's last BN gamma (train from scratch faster)


Transform = dict[str, dict[str, Any]]  # one albumentations transform: {Name: {arg: value}}


class AugmentConfig(_Section):
    image_size: int = Field(224, ge=8)  # pixels, square; the model's input size
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
    def _custom_needs_stats(self) -> AugmentConfig:
        if self.normalize == "custom" and (self.mean is None or self.std is None):
            raise ValueError("normalize: custom needs mean and std (three numbers each, 0..1)")
        return self


class TrainConfig(_Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)  # global: under torchrun each of N processes takes 1/N
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)  # peak learning rate of the head (and body, see body_lr_mult)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    scheduler: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)  # linear warm-up, then the schedule
    milestones: list[int] = Field(default_factory=list)  # multistep: epochs where lr *= gamma
    gamma: float = 0.1
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = 2.0
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Literal["none", "inverse", "sqrt_inverse", "effective"] | list[float] = "none"
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


class TTAConfig(_Section):
    views: Literal["none", "hflip", "vflip", "flips", "d4", "shifts", "scales"] = "none"
    reduce: Literal["mean", "geomean"] = "mean"
    shift: float = 0.1  # shifts: fraction of the image size
    scale: float = 0.1  # scales: +/- this zoom factor


class EnsembleConfig(_Section):
    method: Literal["mean", "median", "trimmed", "rank", "fitted"] = "mean"
    decode: Literal["argmax", "thresholds"] = "argmax"  # thresholds: ordinal competitions
    refit_weight: float = Field(1.0, ge=0)  # weight of a model's full-data refit beside its folds
    name: str | None = None  # submission file name; None: made from the models and CV score


class RefitConfig(_Section):
    epochs: int | None = Field(None, ge=1)  # None: the median best epoch of the folds


class CacheConfig(_Section):
    """The resized-image cache (pipeline/cache.py): each image decoded and shrunk once.

    `enabled`, `format` and `dir` change only speed and disk use; `size`, `mode` and
    `crop_black_border` change the images, with or without the cache (the uncached loader runs
    the same preprocessing on every read).
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
    format: Literal["npy", "png"] = "npy"  # npy: fastest read; png: lossless, 3x smaller, 10x slower
    dir: str = "cache"  # one sub-folder per preprocessing setting, named by its hash


class Config(_Section):
    run_name: str  # names runs/<run_name>/; the experiment file's name
    data: DataConfig
    folds: FoldsConfig = FoldsConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    tta: TTAConfig = TTAConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    refit: RefitConfig = RefitConfig()
    cache: CacheConfig = CacheConfig()
    runs_dir: str = "runs"
    submissions_dir: str = "submissions"

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    @property
    def folds_csv(self) -> Path:
        return Path(self.folds.dir) / "folds.csv"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


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


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base` (mappings merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
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
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    where = " + ".join(sources)
    return f"invalid config ({where}):\n" + "\n".join(lines)


def build_config(merged: dict[str, Any], sources: list[str] | None = None) -> Config:
    """Validate a merged mapping into a Config, with errors that name keys."""
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, sources or ["<dict>"])) from None


def load_config(data: str = "digits", model: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read the competition and experiment configs, apply overrides, validate once."""
    data_path = resolve_data_path(data)
    data_mapping = _read_yaml(data_path)
    competition_defaults = data_mapping.get("defaults") or {}
    if not isinstance(competition_defaults, dict):
        raise ConfigError(f"{data_path}: defaults must be a mapping of experiment keys")
    sources = [str(data_path)]

    if model is None:
        run_name, experiment = "data", {}
    else:
        run_name, experiment, experiment_path = resolve_experiment(model)
        sources.append(str(experiment_path) if experiment_path else f"MODEL={model}")
    if "data" in experiment:
        raise ConfigError(f"{sources[-1]}: an experiment cannot set data.*; use DATA=<competition>")

    merged = deep_merge(competition_defaults, experiment)
    merged = deep_merge({"run_name": run_name}, merged)
    merged["data"] = data_mapping
    for text in overrides:
        merged = deep_merge(merged, parse_override(text))
    if overrides:
        sources.append("overrides " + " ".join(overrides))
    return build_config(merged, sources)


def save_config(config: Config, path: Path) -> None:
    from pipeline.utils import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_from_dict(mapping: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `save_config` or stored in a checkpoint."""
    return build_config(mapping, ["saved config"])
