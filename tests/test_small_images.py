"""Small images: the warning for ImageNet-stem models whose last feature map falls under 2x2, and
`model.stem: cifar` for our resnet18..152."""

from __future__ import annotations

import pytest
import torch

from pipeline.base.config import ConfigError, ModelConfig
from pipeline.models.factory import create_model, small_input_warning
from pipeline.models.resnet import ARCHS, total_stride

IMAGENET_FAMILY = [name for name, (_, _, family) in ARCHS.items() if family.stem == "imagenet"]
CIFAR_FAMILY = [name for name, (_, _, family) in ARCHS.items() if family.stem == "cifar"]


def last_map(name: str, size: int, stem: str = "imagenet") -> int:
    """The side of the model's last feature map at `size` px, measured by running it."""
    model = create_model(name, 3, stem=stem).eval()
    with torch.no_grad():
        return model.forward_features(torch.zeros(1, 3, size, size)).shape[-1]


@pytest.mark.parametrize("name", IMAGENET_FAMILY)
def test_imagenet_stem_resnets_are_warned_about_under_64_px(name):
    message = small_input_warning(name, 32)
    assert message is not None
    assert "1x1" in message and "32x" in message
    assert "resnet20" in message and "resnet110" in message  # the CIFAR family, named
    assert "model.stem: cifar" in message
    assert small_input_warning(name, 48) is not None
    assert small_input_warning(name, 64) is None  # 2x2: no warning
    assert small_input_warning(name, 512) is None


@pytest.mark.parametrize("name", CIFAR_FAMILY)
def test_the_cifar_family_is_never_warned_about(name):
    assert small_input_warning(name, 8) is None  # stride 4; augment.image_size is >= 8
    assert small_input_warning(name, 32) is None


def test_the_warning_follows_the_measured_feature_maps():
    assert last_map("resnet18", 32) == 1 and total_stride("resnet18") == 32
    assert last_map("resnet18", 32, stem="cifar") == 4 and total_stride("resnet18", "cifar") == 8
    assert last_map("resnet20", 32) == 8 and total_stride("resnet20") == 4
    assert last_map("resnet20", 32, stem="cifar") == 8  # already its stem: no change
    assert small_input_warning("resnet18", 32, stem="cifar") is None
    assert small_input_warning("resnet18", 8, stem="cifar") is not None  # 1x1 again


def test_timm_models_are_judged_by_their_own_stride():
    assert "32x" in small_input_warning("timm/resnet18", 32)
    assert small_input_warning("timm/resnet18", 224) is None
    assert small_input_warning("timm/no_such_model", 32) is None  # create_model's error, not ours
    assert small_input_warning("no_such_model", 32) is None


def test_the_cifar_stem_keeps_the_key_names():
    imagenet = create_model("resnet18", 10).state_dict()
    cifar = create_model("resnet18", 10, stem="cifar").state_dict()
    assert list(imagenet) == list(cifar)
    assert imagenet["conv1.weight"].shape == (64, 3, 7, 7)
    assert cifar["conv1.weight"].shape == (64, 3, 3, 3)
    assert all(imagenet[k].shape == cifar[k].shape for k in imagenet if k != "conv1.weight")


def test_the_stem_setting_is_validated():
    assert ModelConfig().stem == "imagenet"
    assert ModelConfig(stem="cifar").stem == "cifar"
    with pytest.raises(ValueError):
        ModelConfig(stem="tiny")
    with pytest.raises(ConfigError, match="model.stem"):
        create_model("timm/resnet18", 10, stem="cifar")
    with pytest.raises(ConfigError, match="model.stem"):
        create_model("resnet18", 10, stem="tiny")
