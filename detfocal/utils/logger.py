"""Where the library's log records go: configured by the command layer, never by the library.

Library modules log with ``logging.getLogger(__name__)`` and configure nothing; a notebook
or a test sees those records through its own handlers (or pytest's ``caplog``). The
``detfocal`` command calls :func:`setup_logging` once: records of rank 0 go to the terminal,
INFO to stdout and warnings to stderr, written through ``tqdm.write`` so that they land above
a running progress bar instead of through it. Other ranks show warnings only. A training
run adds a plain-text file handler for its folder (:func:`log_to_file`).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

__all__ = ["log_to_file", "setup_logging"]

ROOT = "detfocal"
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleHandler(logging.Handler):
    """INFO to stdout, WARNING and above to stderr, each written above any live tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # a broken pipe must not end training
            self.handleError(record)


def _rank() -> int:
    """torchrun's RANK, read from the environment: the process group may not exist yet."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Send the ``detfocal`` loggers' records to the terminal (rank 0 at ``level``, others at WARNING).

    Calling it again replaces the console handler instead of adding a second one.

    Returns:
        The ``detfocal`` root logger.
    """
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(handler)
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level if _rank() == 0 else logging.WARNING)
    return logger


def log_to_file(path: str | os.PathLike) -> logging.Handler:
    """Also append the ``detfocal`` records, with time and level, to ``path`` (a run's ``log.txt``).

    Returns:
        The handler; the caller removes and closes it when the run ends.
    """
    handler = logging.FileHandler(Path(path), encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger(ROOT)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler
