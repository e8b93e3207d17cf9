"""GPU settings chosen from the device, tested without a GPU: the mixed-precision dtype by compute
capability, and the inference batch size by TTA views."""

from __future__ import annotations

import pytest
import torch

from pipeline.base.config import ConfigError, PredictConfig, load_config
from pipeline.inference.engine import amp_dtype, inference_batch_size

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture
def capability(monkeypatch):
    """Pretend the GPU has a given compute capability; is_bf16_supported must not be asked."""
    def set_capability(major_minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: major_minor)

    def no(*args, **kwargs):
        raise AssertionError("amp_dtype must decide by compute capability")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no)
    return set_capability


@pytest.mark.parametrize("major_minor, dtype", [
    ((6, 0), torch.float16),   # P100
    ((7, 0), torch.float16),   # V100
    ((7, 5), torch.float16),   # T4: bf16 only emulated
    ((8, 0), torch.bfloat16),  # A100
    ((8, 6), torch.bfloat16),  # RTX 30xx
    ((9, 0), torch.bfloat16),  # H100
])
def test_bf16_only_from_ampere_on(capability, major_minor, dtype):
    capability(major_minor)
    assert amp_dtype(CUDA, enabled=True) == dtype
    assert amp_dtype(torch.device("cuda", 1), enabled=True) == dtype


def test_no_autocast_on_cpu_or_when_off(capability):
    capability((9, 0))
    assert amp_dtype(CPU, enabled=True) is None
    assert amp_dtype(CUDA, enabled=False) is None


@pytest.mark.parametrize("device, views, expected", [
    (CUDA, 8, 8),     # d4: 8 views x 8 images = the training batch of 64
    (CUDA, 3, 21),    # 3 x 21 = 63 <= 64
    (CUDA, 1, 64),
    (CUDA, 0, 64),    # no TTA
    (CUDA, 100, 1),   # never below one image
    (CPU, 8, 64),     # one view per pass on a CPU
    (CPU, 1, 64),
])
def test_inference_batch_from_views(device, views, expected):
    batch = inference_batch_size(PredictConfig(), 64, views, device)
    assert batch == expected
    if device.type == "cuda":
        assert batch * max(views, 1) <= 64 or batch == 1


def test_explicit_inference_batch_wins():
    assert inference_batch_size(PredictConfig(batch_size=500), 64, 8, CUDA) == 500
    assert inference_batch_size(PredictConfig(batch_size=3), 64, 1, CPU) == 3


def test_predict_section_in_the_config():
    config = load_config("digits", None, ["predict.batch_size=16"])
    assert config.predict.batch_size == 16
    assert load_config("digits").predict.batch_size is None
    with pytest.raises(ConfigError, match=r"predict.batch_size"):
        load_config("digits", None, ["predict.batch_size=0"])
