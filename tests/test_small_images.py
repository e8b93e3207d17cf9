"""Small images: the warning for ImageNet-stem models whose last feature map falls under 2x2,
`model.stem: cifar` for our resnet18..152, and `model.stem: auto`, which takes it where it fits."""

from __future__ import annotations

import pytest
import torch

from pipeline.base.config import ConfigError, ModelConfig, load_config
from pipeline.experiments.freshness import freshness, training_inputs
from pipeline.experiments.layout import Layout
from pipeline.inference.engine import load_checkpoint
from pipeline.models.factory import create_model, small_input_warning
from pipeline.models.names import built_stem, chosen_stem, total_stride
from pipeline.models.resnet import ARCHS
from pipeline.stages.folds import make_folds
from tests.conftest import predict, read_folds_of, train

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
    assert ModelConfig().stem == "auto"  # the default since the suite measured it
    assert ModelConfig(stem="cifar").stem == "cifar"
    assert ModelConfig(stem="auto").stem == "auto"
    with pytest.raises(ValueError):
        ModelConfig(stem="tiny")
    with pytest.raises(ConfigError, match="model.stem"):
        create_model("timm/resnet18", 10, stem="cifar")
    with pytest.raises(ConfigError, match="model.stem"):
        create_model("resnet18", 10, stem="tiny")


def test_stem_auto_takes_the_cifar_stem_where_the_imagenet_one_would_end_under_2x2():
    assert chosen_stem("resnet18", 32, "auto")[0] == "cifar"
    assert last_map("resnet18", 32, stem=chosen_stem("resnet18", 32, "auto")[0]) == 4
    assert chosen_stem("resnet50", 63, "auto")[0] == "cifar"
    assert chosen_stem("resnet18", 64, "auto")[0] == "imagenet"  # 2x2: fits
    assert chosen_stem("resnet18", 224, "auto")[0] == "imagenet"
    assert chosen_stem("resnet20", 32, "auto")[0] == "imagenet"  # the family's own (3x3) stem
    assert chosen_stem("timm/resnet18", 32, "auto")[0] == "imagenet"  # timm keeps its own
    # ImageNet weights hold a 7x7 stem: auto keeps it for them (and the warning stays)
    pretrained = ModelConfig(name="resnet18", stem="auto", pretrained=True)
    assert built_stem(pretrained, 32)[0] == "imagenet"
    assert chosen_stem("resnet18", 32, "cifar") == ("cifar", "as set")
    assert "stride 32" in chosen_stem("resnet18", 32, "auto")[1]


def test_stem_auto_trains_and_predicts_as_the_run_of_the_stem_it_chose(tiny_competition,
                                                                      tmp_path):
    """At 16 px resnet18 with `auto` builds the CIFAR stem for training and again for
    prediction, and its identity is the CIFAR stem's: the same run under `model.stem=cifar` is
    current, not trained again."""
    where = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
             f"audit_dir={tmp_path / 'audit'}",
             "folds.n_splits=2", "train.epochs=1", "augment.image_size=16",
             "train.batch_size=4", "train.workers=0"]
    auto = load_config(str(tiny_competition), "resnet18", [*where, "model.stem=auto"],
                       name="small")
    make_folds(auto)
    train(auto, [0])
    part = Layout.of(auto).experiment("small").fold(0)
    weights = load_checkpoint(part.best)["model"]
    assert weights["conv1.weight"].shape[-1] == 3  # the CIFAR stem's 3x3
    predict(auto, [0])  # the model rebuilt from the checkpoint's settings loads its weights

    cifar = load_config(str(tiny_competition), "resnet18", [*where, "model.stem=cifar"],
                        name="small")
    inputs, details = training_inputs(cifar, read_folds_of(cifar), Layout.of(cifar))
    assert freshness(part.train_manifest, inputs, details).current
    imagenet = load_config(str(tiny_competition), "resnet18", [*where, "model.stem=imagenet"],
                           name="small")
    inputs, details = training_inputs(imagenet, read_folds_of(imagenet), Layout.of(imagenet))
    assert not freshness(part.train_manifest, inputs, details).current
