"""Manifests: what every stage records of what it read and wrote.

    write_manifest(part.train_manifest, "train", inputs, outputs, details)   # last, atomically
    manifest = read_manifest(part.train_manifest)                             # None: none, or unreadable

Each stage writes, last and atomically, a manifest beside its outputs (`<stage>.manifest.json`,
modelled on DVC's `dvc.lock`): the fingerprints of what it read (`inputs`), the digests of what it
wrote (`outputs`), and readable `details` (the settings themselves, counts) from which a message
can say *what* changed. The one rule that compares them with the inputs of now lives in
pipeline/experiments/freshness.py; the stage runner (pipeline/experiments/runner.py) writes them.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.base.fingerprints import file_digest
from pipeline.base.utils import write_text_atomic

FORMAT = 1  # of the manifest files; a manifest of another format is stale
@dataclass
class Manifest:
    stage: str
    inputs: dict[str, str]  # input name -> fingerprint
    outputs: dict[str, str]  # file name, relative to the manifest's folder -> digest
    details: dict[str, Any] = field(default_factory=dict)  # readable: settings, counts, sources

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "stage": self.stage, "inputs": self.inputs,
                           "outputs": self.outputs, "details": self.details},
                          indent=1, sort_keys=True, default=str)


def write_manifest(path: Path, stage: str, inputs: dict[str, str], outputs: Iterable[Path],
                   *, details: dict[str, Any] | None = None) -> Manifest:
    """Record a finished stage; call it after every output is in place (the manifest is last)."""
    path = Path(path)
    digests = {}
    for output in outputs:
        output = Path(output)
        name = os.path.relpath(output, path.parent)
        digests[name] = file_digest(output)
    manifest = Manifest(stage, dict(inputs), digests, details or {})
    write_text_atomic(path, manifest.to_json())
    return manifest


def read_manifest(path: Path) -> Manifest | None:
    """The manifest at `path`, or None when there is none (or it is unreadable or outdated)."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        return None
    return Manifest(content.get("stage", ""), content.get("inputs", {}),
                    content.get("outputs", {}), content.get("details", {}))


def outputs_problems(path: Path, manifest: Manifest) -> list[str]:
    """The outputs a manifest lists that are missing or were modified after it was written."""
    problems = []
    for name, digest in manifest.outputs.items():
        output = Path(path).parent / name
        if not output.is_file():
            problems.append(f"{name} is missing")
        elif file_digest(output) != digest:
            problems.append(f"{name} was modified after the stage wrote it")
    return problems
