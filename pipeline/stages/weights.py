"""Fetch a model's pretrained weights ahead and write them as a folder to carry offline.

    make weights MODEL=timm-resnet50                 # into model.weights_dir (weights/)
    make weights MODEL=timm/convnext_tiny OUT=kaggle-weights
    make weights MODEL=resnet50 OUT=kaggle-weights   # torchvision's ImageNet weights

The weights are found as `model.pretrained: true` finds them (pipeline/models/weights.py: the
weights folder, `model.weights`, the torch and Hugging Face caches, torchvision's registry or
the hub on first use) and written as `<OUT>/<name>.safetensors` (`timm-<name>` for timm models), the first
name a run looks for in `model.weights_dir`. A code competition's notebook has no internet:
upload the folder as a Kaggle dataset and set `model.weights_dir=/kaggle/input/<dataset>`.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from pipeline.base.log import log
from pipeline.base.utils import atomic_path
from pipeline.experiments.state import load_experiment
from pipeline.models.weights import local_candidates, read_state_dict, weights_file

# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "model", "out", "overrides")


def write_weights(name: str, source: Path, folder: Path) -> Path:
    """`source`'s tensors as <folder>/<name's first weights name>.safetensors (written whole or
    not at all); the same file when it is already there."""
    target = local_candidates(name, folder)[0].with_suffix(".safetensors")
    if target.exists() and target.resolve() == source.resolve():
        return target
    tensors = {key: value.contiguous() for key, value in read_state_dict(source).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp))
    return target


def main(args) -> None:
    config = load_experiment(args.data, args.model or "resnet18", args.overrides)
    model = config.model
    folder = Path(args.out or model.weights_dir)
    source = weights_file(model.name, model.weights, model.weights_dir)
    target = write_weights(model.name, source, folder)
    where = "already there" if target.resolve() == source.resolve() else f"from {source}"
    log.info(f"{model.name}: {target} ({where}); a run finds it with "
             f"model.weights_dir={folder} (a Kaggle notebook: upload {folder}/ as a dataset "
             f"and set model.weights_dir=/kaggle/input/<dataset>)")
