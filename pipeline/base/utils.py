"""Small shared helpers: errors, atomic writes, tables, warnings."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import resource
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class PipelineError(RuntimeError):
    """An error the user can fix; printed without a traceback, exit code 1."""


# What torch.save's C++ writer says when the disk is full or the write fails otherwise
# ("file write failed", "[enforce fail at inline_container.cc:672] . unexpected pos ...",
# "basic_ios::clear: iostream error", "PytorchStreamWriter failed writing file ...").
TORCH_WRITE_FAILURES = ("write failed", "unexpected pos", "iostream error", "PytorchStreamWriter",
                        "inline_container")


@functools.lru_cache(maxsize=1)
def file_mode() -> int:
    """The mode a new file gets from this process's umask (0644 under umask 022). Temporary
    files are created 0600; the renamed result should be as readable as any other new file (a
    teammate's, a web server's showing the report)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds.

    A crash or kill inside the block leaves `path` as it was (old content or absent), never half
    written. The temporary name keeps the suffix so writers that dispatch on it (savefig) still work.
    A failed write (a full disk, a read-only or unwritable folder) becomes a PipelineError naming
    `path`, the reason and the remedy, with the temporary file removed. The file is given the
    mode the umask gives new files.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                                   suffix=f".tmp{path.suffix}")
        os.close(fd)
    except OSError as err:
        raise WriteError(write_failure(path, err)) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    except OSError as err:
        raise WriteError(write_failure(path, err)) from None
    except RuntimeError as err:
        if isinstance(err, PipelineError) or not any(s in str(err) for s in TORCH_WRITE_FAILURES):
            raise
        raise WriteError(write_failure(path, err)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


class WriteError(PipelineError):
    """A file could not be written (disk full, read-only, no permission); names the path."""


# Remedies by errno for failed writes.
_WRITE_REMEDIES = {
    errno.ENOSPC: "free some space on that disk, or write elsewhere",
    errno.EDQUOT: "free some space within your quota, or write elsewhere",
    errno.EFBIG: "the file is over the size limit of this process (ulimit -f) or of the file "
                 "system: raise the limit, or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "make the folder writable for you, or write elsewhere",
    errno.EPERM: "make the folder writable for you, or write elsewhere",
    errno.ENAMETOOLONG: "shorten the name (the file system allows 255 bytes per name)",
}
WRITE_ERRNOS = frozenset(_WRITE_REMEDIES)
_ELSEWHERE = "(runs_dir=, submissions_dir=, folds.dir=, cache.dir= move the outputs)"


def _space_needed(path: Path) -> str:
    """', about N MB needed': the size of the file being replaced, where there is one of a
    megabyte or more (a checkpoint, rewritten every epoch)."""
    with contextlib.suppress(OSError):
        size = path.stat().st_size
        if size >= 2**20:
            return f", about {size / 2**20:.0f} MB needed"
    return ""


def write_failure(path: Path, err: Exception) -> str:
    """'cannot write runs/x/best.pt: no space left on device; free some space ...': the reason
    from the errno (or, for torch's RuntimeError, from the free space left), the space needed
    where the file replaces an older one, and the remedy."""
    if isinstance(err, OSError):
        reason = (err.strerror or str(err)).lower()
        remedy = _WRITE_REMEDIES.get(err.errno, "check the disk and the folder's permissions")
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason += _space_needed(path)
    else:  # torch's RuntimeError says no errno: ask the disk and the process's limits why
        reason, remedy = _torch_write_reason(path)
    return f"cannot write {path}: {reason}; {remedy} {_ELSEWHERE}. Nothing was half-written."


def _torch_write_reason(path: Path) -> tuple[str, str]:
    """(reason, remedy) of a write torch.save reported as failed: a full disk, the process's
    file size limit (ulimit -f), or unknown."""
    reason, remedy = "the write failed", "check the disk and the folder's permissions"
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
        reason = f"the write failed with {free / 2**20:.0f} MB free on that disk"
        if free < 2**20 + (path.stat().st_size if path.exists() else 0):
            return "no space left on device" + _space_needed(path), _WRITE_REMEDIES[errno.ENOSPC]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return (f"{reason}, and this process may write files of at most {limit / 2**20:.1f} MB",
                _WRITE_REMEDIES[errno.EFBIG])
    return reason, remedy


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv_atomic(frame: Any, path: Path | str, **kwargs: Any) -> None:
    """Write a pandas DataFrame atomically (no index unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def cell(value: Any) -> str:
    """Scores keep four decimals; larger quantities (seconds, images/s) one."""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain, aligned text table (numbers right-aligned)."""
    text_rows = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in text_rows)) if text_rows else len(str(h))
              for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float, np.integer, np.floating)) for row in rows)
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line([str(h) for h in headers]), line(["-" * w for w in widths])]
    out += [line(r) for r in text_rows]
    return "\n".join(out)


def markdown_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def warn(message: str) -> None:
    """A warning through the pipeline's logger (pipeline/base/log.py): "warning: ..." on stderr,
    rank 0 only."""
    logging.getLogger("pipeline").warning(message)


def summarize_offenders(items: Sequence[Any], limit: int = 5) -> str:
    """'a, b, c (and 7 more; 10 in all)': the first few offenders and the count."""
    shown = ", ".join(str(i) for i in items[:limit])
    if len(items) > limit:
        return f"{shown} (and {len(items) - limit} more; {len(items)} in all)"
    return f"{shown} ({len(items)} in all)" if len(items) > 1 else shown


# --------------------------------------------------------------------------------------------
# Remedies: the `make ...` commands that messages print


DEFAULT_DATA = "digits"  # the Makefile's DATA default: a remedy for any other competition names it
_data_argument: list[str] = []  # DATA= as the running command spelled it (see data_argument)


@contextlib.contextmanager
def data_argument(data: str | None) -> Iterator[None]:
    """While a command runs, DATA= as its user spelled it (a name or a YAML path). The config
    holds the competition's name only, and a remedy must name the competition the way the user
    did, or `make` falls back to the demo. The entry point (pipeline/__main__.py) sets it."""
    _data_argument.append(data or "")
    try:
        yield
    finally:
        _data_argument.pop()


def make_command(verbs: str, competition: str, **variables: Any) -> str:
    """`make VERBS VAR=value ... DATA=<competition>`: a remedy that works as printed. The one
    owner of how a printed command names its competition: DATA= is the command's own spelling
    (else `competition`, the config's name), left out only for the Makefile's default. Variables
    whose value is None or "" are left out; values with spaces are quoted for the shell, but a
    placeholder (`MODEL=<model>`) is shown as it is: the user fills it in."""
    data = (_data_argument[-1] if _data_argument else "") or competition
    variables = {**{k: v for k, v in variables.items() if v is not None and v != ""},
                 **({"DATA": data} if data != DEFAULT_DATA else {})}
    words = [f"{name}={_shell_word(str(value))}" for name, value in variables.items()]
    return " ".join(["make", verbs, *words])


def _shell_word(value: str) -> str:
    placeholder = value.startswith("<") and value.endswith(">")
    return value if placeholder else shlex.quote(value)
