"""The pipeline's one output channel: `logging.getLogger("pipeline")`.

    from pipeline.base.log import log
    log.info("fold 0: current (...)")        # stdout, rank 0 only
    log.warning("a better setting is ...")    # stderr as "warning: ...", rank 0 only
    log.error("error: ...")                    # stderr as it is, every rank

`setup()` is called once by the entry (pipeline/__main__.py; the tests' conftest): plain messages
(no level, time or name: the lines are the user interface), records below WARNING to stdout and
warnings and errors to stderr. The handlers look up sys.stdout/sys.stderr when they write, not
when they are made, so that pytest's capsys (which swaps them per test) still sees the output.
Under torchrun only rank 0 speaks: the other ranks do the same work and would repeat each line.
Progress bars stay tqdm's.
"""

from __future__ import annotations

import logging
import sys

from pipeline.base import distributed

log = logging.getLogger("pipeline")


class _CurrentStream(logging.StreamHandler):
    """A StreamHandler writing to whatever sys.<name> is at emit time."""

    def __init__(self, name: str) -> None:
        logging.Handler.__init__(self)  # not StreamHandler's: it would bind the stream now
        self._name = name

    @property
    def stream(self):  # noqa: D102 - StreamHandler.emit writes here
        return getattr(sys, self._name)


class _MainRankOnly(logging.Filter):
    """Rank 0's records; errors of every rank (a rank that fails alone must say why)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or distributed.is_main()


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class _Prefixed(logging.Formatter):
    """Warnings read "warning: ...", as the pipeline always wrote them; an error's message says
    itself what it is ("error: ...", "interrupted: ...")."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"warning: {text}" if record.levelno == logging.WARNING else text


def setup() -> logging.Logger:
    """Configure the "pipeline" logger once (again: a no-op)."""
    if getattr(log, "_pipeline_setup", False):
        return log
    out, err = _CurrentStream("stdout"), _CurrentStream("stderr")
    out.addFilter(_Below(logging.WARNING))
    out.setFormatter(logging.Formatter("%(message)s"))
    err.setLevel(logging.WARNING)
    err.setFormatter(_Prefixed("%(message)s"))
    for handler in (out, err):
        handler.addFilter(_MainRankOnly())
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the root logger's handlers (pytest's, a notebook's) print it twice
    log._pipeline_setup = True
    return log
