"""Stochastic depth (model.drop_path_rate) in our ResNets and timm's: the rates, the keys, eval
identity and train-time randomness."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath

from pipeline.base.config import ModelConfig
from pipeline.models.factory import create_model
from pipeline.models.resnet import ARCHS

SMALL = ["resnet18", "resnet50", "resnet20"]  # both block types, both families


def drop_rates(model: torch.nn.Module) -> list[float]:
    """The drop-path rate of each residual block, in order (0 where it is the identity)."""
    return [block.drop_path.drop_prob if isinstance(block.drop_path, DropPath) else 0.0
            for stage in model.stages for block in stage]


@pytest.mark.parametrize("name", SMALL)
def test_state_dict_keys_and_shapes_are_unchanged(name):
    plain = create_model(name, 10).state_dict()
    dropped = create_model(name, 10, drop_path_rate=0.2).state_dict()
    assert list(plain) == list(dropped)  # pretrained weights and old checkpoints still load
    assert all(plain[key].shape == dropped[key].shape for key in plain)
    create_model(name, 10).load_state_dict(dropped)


@pytest.mark.parametrize("name", list(ARCHS))
def test_rates_rise_linearly_from_zero_to_the_rate_over_the_blocks(name):
    with torch.device("meta"):  # structure only: no memory, no init cost
        rates = drop_rates(create_model(name, 10, drop_path_rate=0.3))
        plain = drop_rates(create_model(name, 10))
    blocks = sum(ARCHS[name][1])
    assert len(rates) == blocks
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates == pytest.approx([0.3 * i / (blocks - 1) for i in range(blocks)])  # timm's rule
    assert plain == [0.0] * blocks


@pytest.mark.parametrize("name", SMALL)
def test_eval_output_is_identical_with_and_without_drop_path(name):
    torch.manual_seed(0)
    plain = create_model(name, 5, zero_init_last=False).eval()
    dropped = create_model(name, 5, drop_path_rate=0.5).eval()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), dropped(x))


@pytest.mark.parametrize("name", ["resnet20", "timm/resnet18"])
def test_train_mode_forward_passes_differ_with_a_rate(name):
    torch.manual_seed(0)
    model = create_model(name, 5, drop_path_rate=0.5).train()
    for module in model.modules():  # timm zeroes each block's last BN: make every branch count
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert not torch.allclose(first, second)  # another subset of blocks dropped per pass


def test_without_a_rate_train_mode_is_deterministic():
    torch.manual_seed(0)
    model = create_model("resnet20", 5, zero_init_last=False).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        # BatchNorm in train mode uses the batch statistics either way: the same batch, same output
        assert torch.equal(model(x), model(x))


def test_timm_models_take_the_rate():
    model = create_model("timm/resnet18", 5, drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)
    assert list(model.state_dict()) == list(create_model("timm/resnet18", 5).state_dict())


def test_the_config_bounds_the_rate():
    assert ModelConfig().drop_path_rate == 0.0
    assert ModelConfig(drop_path_rate=0.1).drop_path_rate == 0.1
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            ModelConfig(drop_path_rate=bad)
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_model("resnet18", 5, drop_path_rate=1.0)
