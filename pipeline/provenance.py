"""Every artefact knows what made it: fingerprints, manifests, and the one freshness rule.

    python -m pipeline status --data digits --model resnet18     # make status MODEL=resnet18

Each stage writes, last and atomically, a manifest beside its outputs (`<stage>.manifest.json`,
modelled on DVC's `dvc.lock`): the fingerprints of what it read (`inputs`), the digests of what it
wrote (`outputs`), and readable `details` (the settings themselves, counts) from which a message
can say *what* changed. One function, `freshness`, decides for every stage whether its outputs are
current: a manifest whose inputs equal the inputs computed now and whose outputs are on disk
unchanged. Nothing else in the pipeline asks "is it done?".

The fingerprints (16 hex digits of a SHA-256):

| input           | of                                                                        |
|-----------------|---------------------------------------------------------------------------|
| `rows`          | the labelled rows as read from train.csv (id, label, group) and the class list |
| `folds`         | the fold assignment: folds/<competition>.csv's (id, label, fold, group)    |
| `fold_settings` | folds.n_splits, folds.seed, the group rule, data.drop_bad_images           |
| `settings`      | every setting that changes what training produces (`config.training_settings`) |
| `train_images`  | each labelled image's id, size and modification time                      |
| `checkpoint`    | the bytes of the best.pt a prediction came from                           |
| `test`          | the test ids in order, and each test image's size and modification time   |
| `tta`           | the TTA settings of a prediction                                          |
| `epochs`        | the refit's epoch count and where it came from                            |
| `members`       | an ensemble's member predictions (their manifests' digests) and its settings |

What a stage does with the answer (`decide` says it in words):
- current: skipped, in one line;
- missing: done (an interrupted training resumes when its last.pt was made from the same inputs);
- stale: redone where nothing is lost (folds, predictions), refused where a user's work would be
  thrown away (a trained fold, a refit), with the inputs that changed and the remedy: FORCE=1, or
  NAME= / another experiment file to keep both.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import changed_keys
from pipeline.utils import PipelineError, write_text_atomic

FORMAT = 1  # of the manifest files; a manifest of another format is stale
DIGITS = 16  # hex digits kept of each SHA-256: collisions are not a concern at 64 bits

# What each input means to a user, for the messages that say what changed.
INPUT_NAMES = {
    "rows": "the labelled rows or the class list (train.csv)",
    "folds": "the fold assignment (folds/<competition>.csv)",
    "fold_settings": "the fold settings (folds.*, the group rule, data.drop_bad_images)",
    "settings": "the settings",
    "train_images": "the training images (files added, removed or modified)",
    "checkpoint": "the checkpoint (best.pt was retrained)",
    "test": "the test set (ids, or image files added, removed or modified)",
    "tta": "the TTA settings",
    "epochs": "the refit's epoch count",
    "members": "the member predictions or ensemble settings",
}


class StaleError(PipelineError):
    """A stage's earlier outputs were made from other inputs and redoing them would lose work."""


# --------------------------------------------------------------------------------------------
# Fingerprints


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:DIGITS]


def fingerprint(value: Any) -> str:
    """A digest of any JSON-able value (mappings in key order, so equal values hash equal)."""
    return digest_bytes(json.dumps(value, sort_keys=True, default=str).encode())


def file_digest(path: Path | str) -> str:
    """A digest of a file's bytes, read in 1 MiB chunks (a 100 MB checkpoint: ~0.2 s).

    Remembered per (path, size, modification time) for the process: one `make ensemble` or
    `make runs` asks for each best.pt several times (its training's outputs, its prediction's
    input), and a rewritten file has another size or mtime.
    """
    stat = os.stat(path)
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:DIGITS]


def table_fingerprint(frame: pd.DataFrame, columns: Sequence[str]) -> str:
    """A digest of the named columns of a table, as strings, in row order."""
    present = [c for c in columns if c in frame.columns]
    text = frame[present].astype(str).to_csv(index=False)
    return digest_bytes(text.encode())


def rows_fingerprint(table: pd.DataFrame, classes: Sequence[str]) -> str:
    """The labelled rows (id, label, group) and the class list they are read against."""
    return fingerprint([table_fingerprint(table, ["id", "label", "group"]), list(classes)])


def folds_fingerprint(folds: pd.DataFrame) -> str:
    return table_fingerprint(folds, ["id", "label", "fold", "group"])


def images_fingerprint(ids: Sequence[str], paths: Sequence[Path]) -> str:
    """Each image's id, size and modification time (a stat, not a read: 35k files in ~0.2 s).

    A missing file counts as (-1, -1): its later appearance changes the fingerprint too.
    """
    sha = hashlib.sha256()
    for image_id, path in zip(ids, paths):
        try:
            stat = os.stat(path)
            sha.update(f"{image_id}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:
            sha.update(f"{image_id}\t-1\t-1\n".encode())
    return sha.hexdigest()[:DIGITS]


# --------------------------------------------------------------------------------------------
# Manifests


def manifest_path(folder: Path, stage: str) -> Path:
    return Path(folder) / f"{stage}.manifest.json"


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
                   details: dict[str, Any] | None = None) -> Manifest:
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


# --------------------------------------------------------------------------------------------
# The one freshness rule


@dataclass
class Freshness:
    """Whether a stage's outputs are current, and if not, why (in words a user can act on)."""

    state: str  # "current", "missing" (never finished) or "stale"
    reasons: list[str] = field(default_factory=list)
    manifest: Manifest | None = None

    @property
    def current(self) -> bool:
        return self.state == "current"

    def why(self) -> str:
        return "; ".join(self.reasons) if self.reasons else self.state


def input_changes(recorded: dict[str, str], now: dict[str, str],
                  details_then: dict[str, Any] | None = None,
                  details_now: dict[str, Any] | None = None) -> list[str]:
    """What differs between two sets of input fingerprints, named for a user.

    A changed `settings` input names the keys that changed when both sides recorded them.
    """
    reasons = []
    for name in sorted(set(recorded) | set(now)):
        if recorded.get(name) == now.get(name):
            continue
        what = INPUT_NAMES.get(name, name)
        if name == "settings" and details_then and details_now and \
                "settings" in details_then and "settings" in details_now:
            keys = changed_keys(details_then["settings"], details_now["settings"])
            if keys:
                what = f"the settings ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
            else:  # equal values, other keys: the pipeline's settings were added or removed
                what = "the set of settings (this version of the pipeline has other ones)"
        reasons.append(f"{what} changed" if name in recorded and name in now
                       else f"{what} {'not recorded' if name in now else 'no longer used'}")
    return reasons


def freshness(path: Path, inputs: dict[str, str],
              details: dict[str, Any] | None = None) -> Freshness:
    """The one rule: current = a manifest with these inputs and its outputs unchanged on disk."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return Freshness("missing", ["not run yet" if not path.exists() else
                                     f"{path.name} unreadable or of an older format"])
    reasons = input_changes(manifest.inputs, inputs, manifest.details, details)
    for name, digest in manifest.outputs.items():
        output = path.parent / name
        if not output.is_file():
            reasons.append(f"{name} is missing")
        elif file_digest(output) != digest:
            reasons.append(f"{name} was modified after the stage wrote it")
    return Freshness("stale" if reasons else "current", reasons, manifest)


def refuse_stale(what: str, fresh: Freshness, remedy: str) -> StaleError:
    """The error for stale work that redoing would throw away."""
    return StaleError(f"{what} was made from other inputs: {fresh.why()}.\n{remedy}")
