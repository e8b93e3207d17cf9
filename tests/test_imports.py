"""What importing a verb loads, in a fresh interpreter: the offline runtime reaches only what a
notebook needs (models, data readers, ensembling maths, the pure predictor), and the verbs that
never run a model do not pay for torch (~650 MB and seconds before any work)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What the offline runtime (pipeline/offline/infer.py) needs, by module; a package's __init__ is
# not counted. 23: base (6), data (5), ensembling (4), models (4: names, resnet, weights, factory),
# the predictor and its engine, experiments.layout (the bundle's file names) and infer itself.
INFER_MODULES_AT_MOST = 23
NEVER_OFFLINE = ("pipeline.experiments.freshness", "pipeline.experiments.locks",
                 "pipeline.experiments.state", "pipeline.data.duplicates",
                 "pipeline.training.schedule", "pipeline.models.finetune")


def loaded_by(module: str) -> dict[str, list[str]]:
    """{"pipeline": the pipeline modules (not packages) loaded, "third": the top-level third-party
    names of interest} after `import module` in a new interpreter."""
    code = (f"import json, sys, {module}\n"
            "mods = [m for m in sys.modules if m.startswith('pipeline')]\n"
            "print(json.dumps({'pipeline': sorted(m for m in mods\n"
            "                                     if not hasattr(sys.modules[m], '__path__')),\n"
            "                  'third': sorted({'torch', 'albumentations', 'timm'} & set(sys.modules))}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_the_offline_runtime_loads_what_a_notebook_needs_only():
    loaded = loaded_by("pipeline.offline.infer")["pipeline"]
    assert [m for m in loaded if m in NEVER_OFFLINE] == []
    assert [m for m in loaded if m.split(".")[1] in ("stages", "training", "reporting")] == []
    assert [m for m in loaded if m.startswith("pipeline.experiments.")] == \
        ["pipeline.experiments.layout"]
    assert len(loaded) <= INFER_MODULES_AT_MOST, loaded


@pytest.mark.parametrize("module", ["pipeline.__main__", "pipeline.stages.check",
                                    "pipeline.data.imagecache", "pipeline.base.distributed",
                                    "pipeline.stages.runs", "pipeline.stages.folds",
                                    "pipeline.models.names"])
def test_modules_of_verbs_without_a_model_do_not_load_torch(module):
    assert loaded_by(module)["third"] == []
