"""One entry point for every model: our ResNet table by name, any timm model as `timm/<name>`.

    from pipeline.models.factory import create_model, model_input_config
    model = create_model("resnet44", num_classes=10)
    model = create_model("timm/resnet50", num_classes=5, pretrained=True)   # weights/ or timm cache
    model_input_config(model)   # {"mean": ..., "std": ..., "input_size": (3, 224, 224)}

timm is always asked for a randomly initialised model (`pretrained=False`), so it never touches
the network; pretrained weights come from local files or the local timm cache (see weights.py)
and go through the same strict loader as ours.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.base.config import ConfigError
from pipeline.models.names import (
    MIN_FEATURE_MAP,
    TIMM_PREFIX,
    is_timm_name,
    model_names,
    total_stride,
)
from pipeline.models.resnet import ARCHS, create_resnet
from pipeline.models.weights import load_pretrained

logger = logging.getLogger(__name__)


def _unknown_name_error(name: str) -> ConfigError:
    import timm  # imported when needed: it costs ~1 s, which verbs without a model need not pay

    if timm.is_model(name):
        hint = f" timm has it: use 'timm/{name}'."
    else:
        close = difflib.get_close_matches(name, model_names(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown model {name!r}; ours are {', '.join(model_names())}, and any timm "
                       f"model is 'timm/<name>' (e.g. timm/resnet50, timm/convnext_tiny).{hint}")


def _create_timm(name: str, num_classes: int, drop_rate: float,
                 drop_path_rate: float = 0.0) -> nn.Module:
    import timm

    timm_name = name[len(TIMM_PREFIX):]
    if not timm.is_model(timm_name):
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
        raise ConfigError(f"timm has no model {timm_name!r} (see timm.list_models()).{hint}")
    # pretrained=False always: timm would download; our loader reads local files instead.
    # drop_path_rate is passed only when set: a few timm models take no such argument.
    extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes,
                             drop_rate=drop_rate, **extra)


def create_model(name: str, num_classes: int, pretrained: bool = False,
                 weights: str | Path | None = None, *, weights_dir: str | Path = "weights",
                 drop_rate: float = 0.0, zero_init_last: bool = True,
                 drop_path_rate: float = 0.0, stem: str = "imagenet") -> nn.Module:
    """Build model `name` with a `num_classes` head, and load pretrained weights if asked.

    Weights load when `pretrained` is true or an explicit `weights` file is given (naming a file
    is asking for it). A head of another class count is left freshly initialised; everything
    else must match (WeightsMismatchError). No weights found: WeightsNotFoundError, at once.
    An unknown name raises ConfigError (a ValueError) listing ours and the `timm/<name>` form.
    `zero_init_last` applies to our ResNets; timm models keep their own init.
    `drop_path_rate`: stochastic depth, rising linearly over the blocks up to this rate (ours and
    timm's). `stem="cifar"` gives our resnet18..152 a 3x3 stride-1 stem without max-pool (small
    images); the CIFAR family always has it, and timm models refuse it (`model.stem: auto` is
    resolved before: `names.built_stem`).
    """
    if stem not in ("imagenet", "cifar"):
        raise ConfigError(f"model.stem must be 'imagenet' or 'cifar', got {stem!r}")
    if is_timm_name(name):
        if stem != "imagenet":
            raise ConfigError(f"model.stem: {stem} applies to our ResNets, not to {name}; "
                              f"remove it or use resnet18..152 (or the CIFAR family resnet20..110)")
        model = _create_timm(name, num_classes, drop_rate, drop_path_rate)
    elif name in ARCHS:
        model = create_resnet(name, num_classes, drop_rate=drop_rate, zero_init_last=zero_init_last,
                              drop_path_rate=drop_path_rate, stem=stem)
    else:
        raise _unknown_name_error(name)
    if pretrained or weights is not None:
        logger.info("%s: %s", name, load_pretrained(model, name, weights, weights_dir))
    return model


CIFAR_FAMILY = "resnet20, resnet32, resnet44, resnet56, resnet110"


def _timm_total_stride(name: str) -> int | None:
    """The total stride of a timm model from its feature_info, built on the meta device (no
    memory, no weights); None when timm cannot say."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name[len(TIMM_PREFIX):], pretrained=False)
        return int(model.feature_info[-1]["reduction"])
    except Exception:  # noqa: BLE001 - an unknown name or an exotic model: no warning, not a crash
        return None


def small_input_warning(model_name: str, image_size: int, stem: str = "imagenet") -> str | None:
    """A message when `model_name` would end at a feature map smaller than 2x2 at `image_size`
    pixels (the ImageNet stem's total stride is 32: 1x1 at 32 px), else None.

    ImageNet-stem ResNets (ours and timm's) at 32 px end stage 4 at a single pixel per channel,
    whose 3x3 convolutions then see only zero padding around it; the CIFAR family (stride 4) and
    `model.stem: cifar` (stride 8) keep spatial maps there. timm models are judged by the
    reduction of their last feature_info entry.
    """
    if is_timm_name(model_name):
        if stem != "imagenet":
            return None  # create_model refuses the combination with its own message
        stride = _timm_total_stride(model_name)
    elif model_name in ARCHS:
        stride = total_stride(model_name, stem)
    else:
        return None  # an unknown name is create_model's error, not a warning
    if stride is None or image_size >= MIN_FEATURE_MAP * stride:
        return None
    side = f"{image_size / stride:.2g}"
    return (f"{model_name} shrinks its input {stride}x: at {image_size} px its last feature map is "
            f"{side}x{side} (under {MIN_FEATURE_MAP}x{MIN_FEATURE_MAP}), where the 3x3 "
            f"convolutions of its last stage see mostly zero padding. For small images use the "
            f"CIFAR family ({CIFAR_FAMILY}: stride 4), or `model.stem: cifar` for our "
            f"resnet18..152 (a 3x3 stride-1 stem, no max-pool: stride 8; `model.stem: auto` "
            f"takes it where it fits), or "
            f"augment.image_size >= {MIN_FEATURE_MAP * stride}.")


def model_input_config(model: nn.Module) -> dict[str, Any]:
    """The input a model's weights expect: {"mean", "std", "input_size": (C, H, W)}.

    Read from `model.pretrained_cfg`, which both timm models and ours carry, so the data pipeline
    normalises as the weights were trained.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg or not all(key in cfg for key in ("mean", "std", "input_size")):
        raise TypeError(f"{type(model).__name__} has no pretrained_cfg with mean/std/input_size; "
                        f"build it with pipeline.models.create_model")
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
            "input_size": tuple(cfg["input_size"])}
