"""Our ResNet family: the ImageNet ResNets (18..152) and the CIFAR ResNets (20..110), one table.

    from pipeline.models.resnet import create_resnet
    model = create_resnet("resnet44", num_classes=10)      # (B, 3, 32, 32) -> (B, 10)

Module and parameter names are those of torchvision and timm (`conv1`, `bn1`, `layer1..4`, `fc`;
inside blocks `conv1, bn1, conv2, bn2, (conv3, bn3), downsample.0/1`), so their ImageNet
state_dicts load 1:1 into the ImageNet family. The CIFAR family follows He et al. 2015, sec. 4.2:
a 3x3 stem of 16 channels, no max-pool, three stages of 16/32/64 channels with n=(depth-2)/6
BasicBlocks each; where the shape changes it uses a 1x1 conv + BN projection (the paper's option B,
not the zero-padding option A), so its parameter counts are slightly above the paper's table.

Stochastic depth (`drop_path_rate`, Huang et al. 2016) as timm's ResNet does it: each block's
residual branch goes through timm's `DropPath`, its rate rising linearly from 0 at the first block
to `drop_path_rate` at the last; at eval it is the identity. DropPath has no parameters, so the
state_dict keys (and pretrained weights) are the same with and without it.

`stem="cifar"` gives the ImageNet family (resnet18..152) the CIFAR stem for small images: a 3x3
stride-1 conv without max-pool, total stride 8 instead of 32 (at 32 px the last maps are 4x4, not
1x1). Key names stay (`conv1.weight` is then 3x3), so ImageNet weights no longer fit the stem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.names import DEPTHS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1; no bias because a BatchNorm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (channel projection); no bias because a BatchNorm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def drop_path_module(rate: float) -> nn.Module:
    """timm's DropPath for rate > 0 (imported only then: timm costs seconds to import), else the
    identity; neither has parameters or buffers."""
    if rate <= 0:
        return nn.Identity()
    from timm.layers import DropPath

    return DropPath(rate)


class BasicBlock(nn.Module):
    """Two 3x3 convs and a residual; ResNet-18/34 and the CIFAR ResNets."""

    expansion = 1  # output channels = planes * expansion

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.drop_path = drop_path_module(drop_path_rate)  # on the residual branch only

    def zero_init_last(self) -> None:
        # With gamma=0 the block starts as the identity, which makes deep nets train faster early
        # (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.relu(self.drop_path(x) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4); ResNet-50/101/152.

    The stride sits on the 3x3 conv (ResNet v1.5, as torchvision and timm), not on the first 1x1.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path_module(drop_path_rate)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.relu(self.drop_path(x) + shortcut)


Block = type[BasicBlock] | type[Bottleneck]


@dataclass(frozen=True)
class Family:
    """What the variants of one family share: stem, stage widths and input statistics."""

    stem: str  # "imagenet": 7x7/2 conv + 3x3/2 max-pool; "cifar": 3x3/1 conv, no pool
    widths: tuple[int, ...]  # `planes` of each stage; stage k>0 halves the resolution
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int, int]  # (C, H, W) the family was designed for

    def pretrained_cfg(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "input_size": self.input_size,
                "classifier": "fc"}


IMAGENET = Family("imagenet", (64, 128, 256, 512), IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224))
CIFAR = Family("cifar", (16, 32, 64), CIFAR_MEAN, CIFAR_STD, (3, 32, 32))

# The one table: name -> (block, blocks per stage, family), built from the torch-free depths of
# pipeline/models/names.py (a new depth is one line there).
BLOCKS: dict[str, Block] = {"basic": BasicBlock, "bottleneck": Bottleneck}
FAMILIES = {"imagenet": IMAGENET, "cifar": CIFAR}
ARCHS: dict[str, tuple[Block, tuple[int, ...], Family]] = {
    name: (BLOCKS[block], layers, FAMILIES[family])
    for name, (block, layers, family) in DEPTHS.items()
}


class ResNet(nn.Module):
    """A ResNet built from a block type, blocks per stage and a family (stem + widths).

    forward(x) = forward_head(forward_features(x)); x is (B, 3, H, W) normalised RGB, the
    features are (B, num_features, H/32, W/32) for the ImageNet family, (B, num_features, H/8, W/8)
    for it with stem="cifar" and (B, 64, H/4, W/4) for the CIFAR family, the logits
    (B, num_classes).
    """

    def __init__(self, block: Block, layers: tuple[int, ...], family: Family = IMAGENET,
                 num_classes: int = 1000, drop_rate: float = 0.0,
                 zero_init_last: bool = True, drop_path_rate: float = 0.0,
                 stem: str | None = None) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if len(layers) != len(family.widths) or min(layers) < 1:
            raise ValueError(f"layers {tuple(layers)} must give >= 1 block for each of the "
                             f"{len(family.widths)} stages of the {family.stem} family")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {num_classes}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")

        self.drop_rate = drop_rate
        self.pretrained_cfg = family.pretrained_cfg()  # a copy per model: mean/std/input size
        self.inplanes = family.widths[0]
        self.stem = stem or family.stem
        self._make_stem(self.stem)
        # Stochastic depth rises linearly over the blocks of the whole net, from 0 at the first to
        # drop_path_rate at the last (timm's resnet.py, "linear decay rule" of Huang et al. 2016).
        total = sum(layers)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        for index, (planes, blocks) in enumerate(zip(family.widths, layers)):
            stride = 1 if index == 0 else 2
            first = sum(layers[:index])
            self.add_module(f"layer{index + 1}", self._make_layer(
                block, planes, blocks, stride, drop_path_rates=rates[first:first + blocks]))
        self.num_features = self.inplanes
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = self._new_classifier(num_classes)
        self._init_weights(zero_init_last)

    def _make_stem(self, stem: str) -> None:
        width = self.inplanes
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "cifar":
            # Small images keep their resolution: the stem's stride is 1 instead of 4.
            self.conv1 = conv3x3(3, width)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int,
                    *, drop_path_rates: list[float]) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # Projection shortcut only where the shape changes (torchvision; the paper's option B).
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, drop_path_rates[0])]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, drop_path_rate=drop_path_rates[i])
                   for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        # num_classes=0 gives a feature extractor, as in timm.
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self, zero_init_last: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_last:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    module.zero_init_last()

    @property
    def stages(self) -> list[nn.Sequential]:
        return [module for name, module in self.named_children() if name.startswith("layer")]

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for `num_classes` (0: no head)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.fc = self._new_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_features, h, w) feature map of the last stage."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> (B, num_classes) logits, or the pooled (B, C) features if pre_logits."""
        x = self.global_pool(x).flatten(1)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def create_resnet(name: str, num_classes: int = 1000, drop_rate: float = 0.0,
                  zero_init_last: bool = True, *, drop_path_rate: float = 0.0,
                  stem: str | None = None) -> ResNet:
    """Build one variant of the table by name, e.g. `create_resnet("resnet50", 5)`.

    `stem`: None or "imagenet" keeps the family's own stem (the CIFAR family always has its
    3x3 one); "cifar" gives resnet18..152 the 3x3 stride-1 stem without max-pool.
    """
    if name not in ARCHS:
        raise ValueError(f"unknown ResNet {name!r}; valid names: {', '.join(ARCHS)}")
    block, layers, family = ARCHS[name]
    if stem not in (None, "imagenet", "cifar"):
        raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
    return ResNet(block, layers, family, num_classes=num_classes, drop_rate=drop_rate,
                  zero_init_last=zero_init_last, drop_path_rate=drop_path_rate,
                  stem="cifar" if stem == "cifar" else family.stem)
