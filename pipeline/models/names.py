"""Our model names and their depths, without torch: what a verb that never builds a model (runs,
status, folds) needs to tell a model name from an experiment's name.

    from pipeline.models.names import is_timm_name, model_names
    model_names()              # ['resnet18', ..., 'resnet110']
    is_timm_name("timm/convnext_tiny")   # True: any timm model, built by timm

pipeline/models/resnet.py builds its ARCHS table (block classes, families) from DEPTHS: a new
depth is one line here.
"""

from __future__ import annotations

TIMM_PREFIX = "timm/"  # `timm/resnet50` names a timm model, `resnet50` ours

# name -> (block kind, blocks per stage, family); the family fixes stem and stage widths
DEPTHS: dict[str, tuple[str, tuple[int, ...], str]] = {
    "resnet18": ("basic", (2, 2, 2, 2), "imagenet"),
    "resnet34": ("basic", (3, 4, 6, 3), "imagenet"),
    "resnet50": ("bottleneck", (3, 4, 6, 3), "imagenet"),
    "resnet101": ("bottleneck", (3, 4, 23, 3), "imagenet"),
    "resnet152": ("bottleneck", (3, 8, 36, 3), "imagenet"),
    # CIFAR: depth = 6n + 2 with n BasicBlocks per stage.
    "resnet20": ("basic", (3, 3, 3), "cifar"),
    "resnet32": ("basic", (5, 5, 5), "cifar"),
    "resnet44": ("basic", (7, 7, 7), "cifar"),
    "resnet56": ("basic", (9, 9, 9), "cifar"),
    "resnet110": ("basic", (18, 18, 18), "cifar"),
}


def is_timm_name(name: str) -> bool:
    """`timm/resnet50` names a timm model; `resnet50` names ours."""
    return name.startswith(TIMM_PREFIX)


def model_names() -> list[str]:
    """Our model names (timm ones are `timm/<any timm.list_models() name>`)."""
    return list(DEPTHS)
