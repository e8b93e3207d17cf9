"""Our model names and their depths, without torch: what a verb that never builds a model (runs,
status, folds) needs to tell a model name from an experiment's name.

    from pipeline.models.names import is_timm_name, model_names
    model_names()              # ['resnet18', ..., 'resnet110']
    is_timm_name("timm/convnext_tiny")   # True: any timm model, built by timm
    chosen_stem("resnet18", 32, "auto")  # ('cifar', 'resnet18 at 32 px: ...'): model.stem

pipeline/models/resnet.py builds its ARCHS table (block classes, families) from DEPTHS: a new
depth is one line here.
"""

from __future__ import annotations

from pipeline.base.config import ModelConfig

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


MIN_FEATURE_MAP = 2  # pixels: below 2x2 the last stage's 3x3 convolutions see mostly padding


def total_stride(name: str, stem: str | None = None) -> int:
    """How many times our variant `name` shrinks its input with that stem: 32 (ImageNet stem: 2
    in the conv, 2 in the max-pool, 2 in each of stages 2..4), 8 (resnet18..152 with the CIFAR
    stem), 4 (the CIFAR family: stride-1 stem, stages 2..3)."""
    _, layers, family = DEPTHS[name]
    stages = 2 ** (len(layers) - 1)  # every stage after the first halves the resolution
    imagenet_stem = family == "imagenet" and stem != "cifar"
    return stages * (4 if imagenet_stem else 1)


def chosen_stem(name: str, image_size: int, stem: str,
                pretrained: bool = False) -> tuple[str, str]:
    """(the stem model `name` is built with, why) for `model.stem`. `imagenet` and `cifar` are
    taken as set; `auto` takes the CIFAR stem for our resnet18..152 where the ImageNet stem would
    end at a feature map under MIN_FEATURE_MAP (below 64 px), else the ImageNet stem: timm
    models and the CIFAR family keep their own, and so do a large enough image and pretrained
    weights (`model.pretrained` or a `model.weights` file: ImageNet weights hold a 7x7 stem;
    weights of a CIFAR-stem model want `model.stem: cifar` said)."""
    if stem != "auto":
        return stem, "as set"
    if pretrained:
        return "imagenet", "its pretrained weights hold the ImageNet stem"
    if name in DEPTHS and DEPTHS[name][2] == "imagenet":
        stride = total_stride(name)
        if image_size < MIN_FEATURE_MAP * stride:
            return "cifar", (f"{name} at {image_size} px: the ImageNet stem (stride {stride}) "
                             f"would end at {image_size / stride:.2g} px, the CIFAR stem (stride "
                             f"{total_stride(name, 'cifar')}) ends at "
                             f"{image_size / total_stride(name, 'cifar'):.2g} px")
        return "imagenet", f"{name} at {image_size} px ends at {image_size / stride:.2g} px"
    return "imagenet", f"{name} keeps its own stem"


def built_stem(model: ModelConfig, image_size: int) -> tuple[str, str]:
    """(the stem `model.*` builds at `image_size`, why): what training, prediction and the
    run's identity all ask, so that they agree."""
    return chosen_stem(model.name, image_size, model.stem,
                       pretrained=model.pretrained or model.weights is not None)
