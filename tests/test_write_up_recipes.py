"""The write-ups' recipes (configs/retina-*, leukemia, cifar10-resnet44): each file loads against
a competition of its kind, holds the settings its comment promises, and builds its augmentation.
Nothing is trained (the pretrained ones would need weights/ files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.base.config import CONFIG_DIR, load_config
from pipeline.data.augment import build_transforms

RETINA = ["retina-resnet18", "retina-resnet18-pretrained", "retina-resnet50",
          "retina-resnet50-pretrained", "retina-two-stage"]


def competition(tmp_path: Path, **changes) -> str:
    """configs/data/digits.yaml with `changes`: a config of another kind (only loaded, so its
    files need not exist)."""
    mapping = yaml.safe_load((CONFIG_DIR / "data" / "digits.yaml").read_text())
    mapping.update(changes)
    path = tmp_path / f"{changes.get('name', 'digits')}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return str(path)


@pytest.fixture
def retina(tmp_path):
    """A five-grade ordinal competition scored by QWK, like Kaggle's retina ones."""
    return competition(tmp_path, name="retina", classes=[0, 1, 2, 3, 4], metric="qwk",
                       ordinal=True, group_pattern=r"^(\d+)_(left|right)$")


@pytest.fixture
def leukemia(tmp_path):
    """A binary competition scored by weighted F1, like C-NMC 2019 (minority class first)."""
    return competition(tmp_path, name="leukemia", classes=["hem", "all"], metric="weighted_f1")


def test_every_recipe_file_says_where_it_comes_from():
    for stem in [*RETINA, "leukemia", "cifar10-resnet44"]:
        text = (CONFIG_DIR / f"{stem}.yaml").read_text()
        assert text.startswith("# Recipe from"), stem
        assert "For a " in text and "competition" in text and "Run: make" in text, stem


@pytest.mark.parametrize("stem", RETINA)
def test_retina_recipes(stem, retina):
    config = load_config(retina, stem)
    assert config.run_name == stem
    assert config.model.name == ("resnet18" if "18" in stem else "resnet50")
    assert config.model.pretrained == (stem.endswith("pretrained") or stem.endswith("two-stage"))
    train = config.train
    assert (train.optimizer, train.lr, train.momentum, train.weight_decay) == ("sgd", 1e-3, 0.9,
                                                                             5e-4)
    assert not train.nesterov
    if stem == "retina-two-stage":
        assert (train.head_only_epochs, train.epochs) == (5, 15)
    else:
        assert (train.head_only_epochs, train.epochs) == (0, 10)
    assert config.data.metric == "qwk" and config.data.ordinal


def test_leukemia_recipe(leukemia):
    config = load_config(leukemia, "leukemia")
    assert config.train.optimizer == "adam"
    assert config.train.class_weights == [1.2, 1.0]
    assert len(config.train.class_weights) == len(config.data.classes)  # binary: one each
    names = [next(iter(spec)) for spec in config.augment.train]
    assert names == ["Rotate", "HorizontalFlip", "VerticalFlip"]
    assert config.augment.train[0]["Rotate"]["limit"] == 90
    build_transforms(config.augment, train=True)


def test_cifar10_recipe():
    config = load_config("digits", "cifar10-resnet44")  # 10 classes, accuracy: CIFAR-10's kind
    assert (config.model.name, config.augment.image_size) == ("resnet44", 32)
    assert config.augment.normalize == "dataset"
    train = config.train
    assert (train.optimizer, train.lr, train.weight_decay, train.batch_size) == ("sgd", 0.1, 1e-4,
                                                                               128)
    # 32k and 48k iterations at 50,000 / 128 = 391 per epoch; 64k in all
    per_epoch = -(-50_000 // 128)
    assert per_epoch == 391
    assert train.milestones == [round(32_000 / per_epoch), round(48_000 / per_epoch)] == [82, 123]
    assert train.epochs == round(64_000 / per_epoch) == 164
    assert (train.scheduler, train.gamma, train.warmup_epochs) == ("multistep", 0.1, 0)
    transform = build_transforms(config.augment, train=True)
    image = np.full((32, 32, 3), 200, np.uint8)
    assert transform(image=image)["image"].shape == (32, 32, 3)  # padded to 40, cropped to 32


def test_recipes_load_against_the_demo_competition_too():
    """The demo (digits) stands in for each kind, as the README suggests for a first try."""
    for stem in [*RETINA, "leukemia", "cifar10-resnet44"]:
        assert load_config("digits", stem).run_name == stem
