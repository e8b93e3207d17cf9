"""Models: our ResNet family (one table of depths) and a factory that also serves timm models."""

from pipeline.models.factory import (
    create_model,
    is_timm_name,
    model_input_config,
    model_names,
    small_input_warning,
)
from pipeline.models.finetune import (
    body_parameters,
    freeze_body,
    head_parameters,
    param_groups,
    unfreeze,
)
from pipeline.models.resnet import ARCHS, BasicBlock, Bottleneck, ResNet, create_resnet
from pipeline.models.weights import (
    WeightsMismatchError,
    WeightsNotFoundError,
    load_pretrained,
)

__all__ = [
    "ARCHS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "body_parameters",
    "create_model",
    "create_resnet",
    "freeze_body",
    "head_parameters",
    "is_timm_name",
    "load_pretrained",
    "model_input_config",
    "model_names",
    "param_groups",
    "small_input_warning",
    "unfreeze",
]
