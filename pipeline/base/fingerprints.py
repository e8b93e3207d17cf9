"""Fingerprints: short digests of values, tables, image files and checkpoints.

    fingerprint({"n_splits": 5})          # 16 hex digits of a SHA-256 of the value's JSON
    file_digest(part.best)                # of a file's bytes, remembered across processes

File digests are remembered across processes in a small SQLite table keyed by (path, size,
modification and change time, inode), as DVC's state database does: `make runs` or `make
ensemble` over 50 experiments x 5 folds of ResNet-50 (~25 GB of checkpoints) then stats the files
instead of reading them again (bench/runs_scale.py measures it). The table is a cache: when it
cannot be opened (a read-only home, a damaged file) digests are computed.

Inside `remembered()` (a whole command: pipeline/__main__.py), `once(key, compute)` computes each
key once: the labelled rows, the training images' and the test set's fingerprints are asked for
by every experiment and every submission that `make runs` or `make report` judges, and each ask
stats every image again (bench/scale.py measures it).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

DIGITS = 16  # hex digits kept of each SHA-256: collisions are not a concern at 64 bits
# Files at least this large have their digest remembered across processes (checkpoints); a
# smaller one (a CSV, a manifest) is hashed in microseconds, faster than a look-up.
REMEMBER_BYTES = 1 << 20
STATE_ENV = "PIPELINE_STATE"  # where the digest table lives; default ~/.cache/pipeline/


# --------------------------------------------------------------------------------------------
# Fingerprints


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:DIGITS]


def fingerprint(value: Any) -> str:
    """A digest of any JSON-able value (mappings in key order, so equal values hash equal)."""
    return digest_bytes(json.dumps(value, sort_keys=True, default=str).encode())


def sha256_file(path: Path | str) -> str:
    """The full SHA-256 of a file's bytes, read in 1 MiB chunks (~0.2 s for a 100 MB checkpoint)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def file_digest(path: Path | str) -> str:
    """A digest of a file's bytes, remembered per (path, size, mtime, ctime, inode): in this
    process always, across processes for files of REMEMBER_BYTES and more (module docstring).
    The change time is part of the key because a retrained checkpoint has the same size, and a
    coarse-mtime file system with inode reuse could give it the old mtime and inode; the rename
    that puts a file in place sets its ctime."""
    resolved = str(Path(path).resolve())
    stat = os.stat(resolved)
    return _digest(resolved, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, inode=stat.st_ino)


@functools.lru_cache(maxsize=8192)
def _digest(path: str, size: int, mtime_ns: int, ctime_ns: int, *, inode: int) -> str:
    key = (path, size, mtime_ns, ctime_ns, inode)
    remembered = _STATE.get(key) if size >= REMEMBER_BYTES else None
    if remembered is not None:
        return remembered
    digest = sha256_file(path)[:DIGITS]
    if size >= REMEMBER_BYTES:
        _STATE.put(key, digest)
    return digest


class DigestState:
    """The cross-process table of file digests (SQLite, one row per path)."""

    def __init__(self) -> None:
        self._connection: sqlite3.Connection | None = None
        self._failed = False

    def path(self) -> Path:
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pipeline"
        return Path(os.environ.get(STATE_ENV, default / "digests.sqlite"))

    def _open(self) -> sqlite3.Connection | None:
        if self._connection is None and not self._failed:
            try:
                self.path().parent.mkdir(parents=True, exist_ok=True)
                connection = sqlite3.connect(self.path(), timeout=10)
                connection.execute("PRAGMA synchronous=OFF")  # a cache: a lost row is recomputed
                connection.execute("CREATE TABLE IF NOT EXISTS file_digests (path TEXT PRIMARY "
                                   "KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, "
                                   "inode INTEGER, digest TEXT)")
                self._connection = connection
            except (sqlite3.Error, OSError, ValueError):
                self._failed = True
        return self._connection

    def get(self, key: tuple[str, int, int, int, int]) -> str | None:
        connection = self._open()
        if connection is None:
            return None
        with contextlib.suppress(sqlite3.Error):
            row = connection.execute("SELECT size, mtime_ns, ctime_ns, inode, digest FROM "
                                     "file_digests WHERE path = ?", (key[0],)).fetchone()
            if row is not None and tuple(row[:4]) == key[1:]:
                return row[4]
        return None

    def put(self, key: tuple[str, int, int, int, int], digest: str) -> None:
        connection = self._open()
        if connection is None:
            return
        with contextlib.suppress(sqlite3.Error):
            connection.execute("INSERT OR REPLACE INTO file_digests VALUES (?, ?, ?, ?, ?, ?)",
                               (*key, digest))
            connection.commit()


_STATE = DigestState()


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
# Once per command

_REMEMBERED: dict[Any, Any] | None = None  # None: outside `remembered()`, every ask computes


@contextlib.contextmanager
def remembered():
    """Inside the block, `once` computes each key once (nested blocks share the outer memory).

    Only for work during which the files behind the keys do not change: a command reading the
    competition's CSVs and images, not one writing them (`make demo-data`), since a key names the
    files, not their state."""
    global _REMEMBERED
    outer = _REMEMBERED
    _REMEMBERED = {} if outer is None else outer
    try:
        yield
    finally:
        _REMEMBERED = outer


def once(key: Any, compute: Callable[[], Any]) -> Any:
    """`compute()`, remembered under `key` inside `remembered()`; computed each time outside."""
    if _REMEMBERED is None:
        return compute()
    if key not in _REMEMBERED:
        _REMEMBERED[key] = compute()
    return _REMEMBERED[key]


# --------------------------------------------------------------------------------------------
# Manifests
