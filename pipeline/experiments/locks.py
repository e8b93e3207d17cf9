"""One process at a time on an experiment (and on a competition's folds and submissions).

    with holding(exp.lock, exp.dir, "trained"):      # a second process stops here at once
        ...

Two `make train` of one experiment at once (two terminals, a notebook's re-run) would both
write the same folder and both report success. The lock is filelock's (an OS lock on the file,
which the system drops when its process dies, however it dies); beside it a small JSON file says
who holds it and since when, so the refusal can name the process, and a lock left by a killed
process is taken over with a note. Under torchrun rank 0 holds the lock for every rank; the
processes of `--parallel folds` inherit their parent's (PIPELINE_LOCKS_HELD).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.base import distributed
from pipeline.base.utils import PipelineError, warn, write_text_atomic

HELD_ENV = "PIPELINE_LOCKS_HELD"  # lock paths a parent process holds for its children
_HELD: set[str] = set()  # lock paths this process holds: taking one again is a no-op
_exported: set[str] = set()  # the ones of _HELD put into HELD_ENV for child processes


class LockedError(PipelineError):
    """Another process works on the same experiment or competition files."""


def _info_path(lock: Path) -> Path:
    return lock.with_name(lock.name + ".json")


def _read_info(lock: Path) -> dict | None:
    try:
        return json.loads(_info_path(lock).read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    return True


def _holder(info: dict | None) -> str:
    if not info:
        return "another process"
    host = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
    return f"process {info.get('pid')}{host} since {info.get('since')} ({info.get('command')})"


def inherited() -> set[str]:
    return {p for p in os.environ.get(HELD_ENV, "").split(os.pathsep) if p}


@contextlib.contextmanager
def holding(lock: Path, what: Path | str, doing: str) -> Iterator[None]:
    """Hold `lock` for the block, or stop at once naming the process that holds it.

    `what` and `doing` make the refusal's words: "runs/digits/resnet18 is being trained by ...".
    """
    key = str(Path(lock).resolve())
    if not distributed.is_main() or key in _HELD or key in inherited():
        yield
        return
    Path(lock).parent.mkdir(parents=True, exist_ok=True)
    file_lock = FileLock(str(lock), timeout=0)
    try:
        file_lock.acquire()
    except Timeout:
        holder = _read_info(lock)
        # the holder's own verb (training holds the lock predict meets), else this command's
        doing = (holder or {}).get("doing") or doing
        raise LockedError(f"{what} is being {doing} by {_holder(holder)}: wait for it "
                          f"to finish, or stop it first; nothing was changed") from None
    try:
        _take_over(lock, doing)
        _HELD.add(key)
        _export()  # the processes this one starts (--parallel folds) work under its lock
        yield
    finally:
        _HELD.discard(key)
        _export()
        with contextlib.suppress(OSError):
            _info_path(lock).unlink()
        file_lock.release()


def _export() -> None:
    held = sorted((inherited() - _exported) | _HELD)
    _exported.clear()
    _exported.update(_HELD)
    os.environ[HELD_ENV] = os.pathsep.join(held)


def _take_over(lock: Path, doing: str) -> None:
    """Record this process as the holder, and what it is doing ("trained"), for the refusal
    another command meets; a note when a killed one left its record behind."""
    before = _read_info(lock)
    if before and before.get("pid") != os.getpid():
        state = "no longer running" if not _alive(int(before.get("pid", -1))) else \
            "no longer holding it"
        warn(f"took over the lock of {_holder(before)}, which is {state} (killed?): its "
             f"finished work is kept, and an interrupted fold resumes from its last checkpoint")
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "doing": doing,
            "command": " ".join(["python -m pipeline", *sys.argv[1:]])[:200]}
    with contextlib.suppress(PipelineError):
        write_text_atomic(_info_path(lock), json.dumps(info))
