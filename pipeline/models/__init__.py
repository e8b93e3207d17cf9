"""Models: our ResNet family (one table of depths) and a factory that also serves timm models.

Fine-tuning's parameter groups and freezing (pipeline/models/finetune.py) are imported from their
module by training alone: building and loading a model (the offline `infer`) does not need them.
"""

from pipeline.models.factory import (
    create_model,
    is_timm_name,
    model_input_config,
    model_names,
    small_input_warning,
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
    "create_model",
    "create_resnet",
    "is_timm_name",
    "load_pretrained",
    "model_input_config",
    "model_names",
    "small_input_warning",
]
