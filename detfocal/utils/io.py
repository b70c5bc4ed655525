"""Atomic file writes: readers see the old file or the complete new one, never a partial one.

Every file detfocal writes that a user keeps (checkpoints, results, subsets, configs) goes
through :func:`atomic_write`: the bytes go to a temporary file in the destination folder,
are flushed and fsynced, and the file is renamed over the destination with ``os.replace``.
A crash or ``kill -9`` mid-write leaves the previous file intact and, at worst, a
``.NAME.*.tmp`` file, which :func:`remove_stale_temporaries` clears.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Sequence

__all__ = ["append_jsonl", "atomic_write", "ensure_writable_dir", "read_jsonl", "remove_stale_temporaries",
           "write_json_atomic"]

_TMP_SUFFIX = ".tmp"


def _file_mode(path: Path) -> int:
    """The mode a new file would get from ``open()`` (0666 less the umask), or the existing file's."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); not every platform or filesystem allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], *, binary: bool = True) -> Path:
    """Call ``write(handle)`` on a temporary file, then move it over ``path`` atomically.

    The new file gets the mode of the file it replaces, or 0666 less the umask for a new
    one (``tempfile`` alone would make it 0600).

    Args:
        path: the destination; its parent folders are created.
        write: writes the content to the open handle.
        binary: open the temporary file in binary (``"wb"``) or text (``"w"``, UTF-8) mode.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a folder, expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile("wb" if binary else "w", dir=path.parent, prefix=f".{path.name}.",
                                             suffix=_TMP_SUFFIX, delete=False,
                                             **({} if binary else {"encoding": "utf-8"}))
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            os.chmod(handle.name, _file_mode(path))
        os.replace(handle.name, path)
    except OSError as exc:  # disk full, quota, ulimit -f, read-only: name the file, not the temporary
        Path(handle.name).unlink(missing_ok=True)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}"
                                 f"{'; the previous file is intact' if path.exists() else ''}") from None
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def ensure_writable_dir(path: str | os.PathLike, argument: str) -> Path:
    """Create the folder ``path`` if needed and check that files can be written in it, before any work.

    Args:
        path: the output folder.
        argument: the option that named it (``--out-dir``), for the message.

    Returns:
        The folder as a ``Path``.

    Raises:
        ValueError: ``path`` is a file, or cannot be created or written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{argument} {path} is a file, expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise ValueError(f"{argument} {path} cannot be written: {exc.strerror or exc}") from None
    return path


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as compact JSON with :func:`atomic_write`; return the path."""
    return atomic_write(path, lambda handle: json.dump(payload, handle, separators=(",", ":")), binary=False)


def remove_stale_temporaries(folder: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Delete the temporaries an interrupted :func:`atomic_write` of ``names`` left in ``folder``.

    Only files of atomic_write's exact pattern (``.NAME.XXXXXXXX.tmp``, eight characters from
    ``tempfile``) are touched: a user's own ``.notes.tmp`` stays. Call it only where no other
    process writes into ``folder`` (a locked run folder).

    Args:
        folder: the folder to clean; a missing folder is fine.
        names: the destination names whose temporaries go, e.g. ``("last.pth",)``.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir() or not names:
        return []
    pattern = re.compile(r"\.(?:%s)\.[a-z0-9_]{8}%s" % ("|".join(re.escape(name) for name in names),
                                                      re.escape(_TMP_SUFFIX)))
    removed = []
    for candidate in folder.iterdir():
        if pattern.fullmatch(candidate.name) and candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append ``record`` as one JSON line, with a wall-clock ``time``, to ``path``.

    One ``write`` of the whole line: a kill mid-append leaves at most a partial last line,
    which :func:`read_jsonl` skips.
    """
    line = json.dumps({**record, "time": round(time.time(), 3)}) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot append to {path}: {exc.strerror or exc}") from None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, in order; a partial last line (a kill mid-append) is skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line other than the last is not a JSON object (the message names the file
            and the line).
    """
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line, with no newline: an append that was cut off
                continue
            raise ValueError(f"{path}: line {number} is not JSON: {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is {line[:80]!r}, expected a JSON object")
        records.append(record)
    return records
