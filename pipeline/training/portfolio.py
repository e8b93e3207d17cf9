"""`make auto`'s portfolio: the experiments it trains for a competition, in order, chosen from
what the data is.

    members = portfolio(config, typical_side(config.data))   # [Member(name, model, args, why)]
    members = read_portfolio(path)                            # PORTFOLIO=file.yaml: one's own

The size: the competition's `augment.image_size` where its YAML sets one (its `defaults:`),
else from the images: their median side, in steps of 8 up to 64 px, else 224 (what ImageNet
weights were trained at). Small images (< 64 px) get our from-scratch ResNets, whose stems fit
them (`model.stem: auto`'s CIFAR stem; the CIFAR family); larger ones ImageNet-pretrained
ResNets (torchvision's weights, fetched on first use). Ordinal competitions get the `both` head
(class logits and the grade on one body), which the ensemble can decode by thresholds. The order
is the expected value per minute, and `make auto` gives the first member the largest share of
the budget: below 64 px resnet20 first (bench/BENCHMARKS.md: under `make auto BUDGET=8` on the
digits member its 36 epochs in 2.2 minutes scored 0.967 out of fold, resnet18 with the CIFAR
stem 0.900 in 8 epochs and 3.7 minutes; at equal epochs resnet18 is ahead), then the members that add
most to an ensemble (another architecture, another head, another seed). The TTA is not set
here: `make auto` tries flips on each member and keeps them where they score better out of fold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from pipeline.base.config import Config, DataConfig
from pipeline.base.utils import PipelineError
from pipeline.data.images import header_size
from pipeline.data.tables import train_image_paths

SMALL = 64  # px: under it the ImageNet stem of a ResNet ends below 2x2 (model.stem: auto)
PRETRAINED_SIZE = 224
SIDE_SAMPLE = 200  # images whose headers say the competition's typical side


@dataclass(frozen=True)
class Member:
    name: str  # the experiment's name: auto-<what it is>
    model: str  # MODEL=: an experiment file or a model name
    args: list[str] = field(default_factory=list)  # its settings, as ARGS= would give them
    why: str = ""


def typical_side(data: DataConfig) -> int:
    """The median shorter side of (up to SIDE_SAMPLE) training images, from their headers."""
    paths = train_image_paths(data)
    if not paths:
        raise PipelineError(f"{data.name} has no labelled images to choose a portfolio for")
    chosen = np.random.default_rng(0).choice(len(paths), min(SIDE_SAMPLE, len(paths)),
                                             replace=False)
    sides = []
    for index in chosen:
        try:
            size = header_size(Path(paths[index]).read_bytes())
        except OSError:  # a missing image: the check names it; the others say the side
            continue
        if size is not None:
            sides.append(min(size))
    return int(np.median(sides)) if sides else PRETRAINED_SIZE


def image_size(config: Config, side: int) -> int:
    """The competition's own size where its YAML sets one, else one that fits the images."""
    if "image_size" in config.data.defaults.get("augment", {}):
        return config.augment.image_size
    if side < SMALL:
        return max(16, side // 8 * 8)
    return PRETRAINED_SIZE


def portfolio(config: Config, side: int) -> list[Member]:
    """The members for this competition, in the order they are trained."""
    size = image_size(config, side)
    at = [f"augment.image_size={size}"]  # TTA: `make auto` tries flips on each member
    ordinal = config.data.ordinal
    another = config.train.seed + 1  # SEED=: the seed member is one past the others' seed
    if size < SMALL:
        members = [
            Member("auto-resnet20", "resnet20", at,
                   f"{size} px: the CIFAR family, cheap: the most epochs in the largest share"),
            Member("auto-resnet18", "resnet18", [*at, "model.stem=auto"],
                   "the CIFAR stem at this size: ahead at equal epochs, 9x an epoch's time"),
            Member("auto-resnet18-both", "resnet18", [*at, "model.stem=auto", "model.head=both"],
                   "ordinal: class logits and the grade") if ordinal else
            Member(f"auto-resnet18-seed{another}", "resnet18",
                   [*at, "model.stem=auto", f"train.seed={another}"],
                   "another seed: ensembles gain from them"),
            Member("auto-resnet56", "resnet56", at, "a deeper CIFAR ResNet"),
        ]
    else:
        weights = ["model.pretrained=true"]
        members = [
            Member("auto-resnet18", "resnet18", [*at, *weights], "ImageNet weights, cheap"),
            Member("auto-resnet50", "resnet50", [*at, *weights], "ImageNet weights, deeper"),
            Member("auto-resnet18-both", "resnet18", [*at, *weights, "model.head=both"],
                   "ordinal: class logits and the grade") if ordinal else
            Member(f"auto-resnet18-seed{another}", "resnet18",
                   [*at, *weights, f"train.seed={another}"],
                   "another seed: ensembles gain from them"),
            Member("auto-resnet34", "resnet34", [*at, *weights], "another depth"),
        ]
    return members


def read_portfolio(path: Path) -> list[Member]:
    """PORTFOLIO=<file.yaml>: a list of {name, model, args: [key=value, ...]}."""
    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PipelineError(f"PORTFOLIO={path}: {err}") from None
    if not isinstance(entries, list) or not entries:
        raise PipelineError(f"PORTFOLIO={path}: a list of members, each {{name: auto-a, model: "
                            f"resnet18, args: [augment.image_size=64]}}")
    members = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry:
            raise PipelineError(f"PORTFOLIO={path}: member {i + 1} needs a `model:`")
        args = entry.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) and "=" in a for a in args):
            raise PipelineError(f"PORTFOLIO={path}: member {i + 1}'s args are a list of "
                                f"key=value texts, e.g. [augment.image_size=64]; got {args!r}")
        members.append(Member(str(entry.get("name") or f"auto-{entry['model']}-{i}"),
                              str(entry["model"]), args,
                              str(entry.get("why", "from the portfolio file"))))
    names = [m.name for m in members]
    if len(set(names)) < len(names):
        raise PipelineError(f"PORTFOLIO={path}: two members share a name: "
                            f"{sorted({n for n in names if names.count(n) > 1})}")
    return members
