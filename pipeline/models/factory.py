"""One entry point for every model: our ResNet table by name, any timm model as `timm/<name>`.

    from pipeline.models import create_model, model_input_config
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

from pipeline.config import ConfigError
from pipeline.models.resnet import ARCHS, create_resnet
from pipeline.models.weights import TIMM_PREFIX, load_pretrained

logger = logging.getLogger(__name__)


def is_timm_name(name: str) -> bool:
    """`timm/resnet50` names a timm model; `resnet50` names ours."""
    return name.startswith(TIMM_PREFIX)


def model_names() -> list[str]:
    """Our model names (timm ones are `timm/<any timm.list_models() name>`)."""
    return list(ARCHS)


def _unknown_name_error(name: str) -> ConfigError:
    import timm  # imported when needed: it costs ~1 s, which verbs without a model need not pay

    if timm.is_model(name):
        hint = f" timm has it: use 'timm/{name}'."
    else:
        close = difflib.get_close_matches(name, model_names(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown model {name!r}; ours are {', '.join(model_names())}, and any timm "
                       f"model is 'timm/<name>' (e.g. timm/resnet50, timm/convnext_tiny).{hint}")


def _create_timm(name: str, num_classes: int, drop_rate: float) -> nn.Module:
    import timm

    timm_name = name[len(TIMM_PREFIX):]
    if not timm.is_model(timm_name):
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
        raise ConfigError(f"timm has no model {timm_name!r} (see timm.list_models()).{hint}")
    # pretrained=False always: timm would download; our loader reads local files instead.
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes,
                             drop_rate=drop_rate)


def create_model(name: str, num_classes: int, pretrained: bool = False,
                 weights: str | Path | None = None, weights_dir: str | Path = "weights",
                 drop_rate: float = 0.0, zero_init_last: bool = True) -> nn.Module:
    """Build model `name` with a `num_classes` head, and load pretrained weights if asked.

    Weights load when `pretrained` is true or an explicit `weights` file is given (naming a file
    is asking for it). A head of another class count is left freshly initialised; everything
    else must match (WeightsMismatchError). No weights found: WeightsNotFoundError, at once.
    An unknown name raises ConfigError (a ValueError) listing ours and the `timm/<name>` form.
    `zero_init_last` applies to our ResNets; timm models keep their own init.
    """
    if is_timm_name(name):
        model = _create_timm(name, num_classes, drop_rate)
    elif name in ARCHS:
        model = create_resnet(name, num_classes, drop_rate=drop_rate, zero_init_last=zero_init_last)
    else:
        raise _unknown_name_error(name)
    if pretrained or weights is not None:
        logger.info("%s: %s", name, load_pretrained(model, name, weights, weights_dir))
    return model


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
