"""The run folder: one training at a time, with an identity, and nothing of a user's lost.

A run folder holds one run. :class:`RunFolder` makes that true on a shared filesystem:

- **A lock.** An advisory ``fcntl`` lock on the folder itself is held for the run's life
  and dies with its process (a kill -9 leaves no stale lock); ``OUT/.detfocal.lock`` names
  the holder. A second training into the same folder is refused at once.
- **An identity.** ``OUT/run.json`` holds a run id, written when the run starts and stored
  in each of its checkpoints. ``--resume`` of a checkpoint from another run into a folder
  that holds a run is refused unless ``--overwrite``.
- **Nothing we did not write is deleted.** Only the files in :data:`RUN_FILES` and our own
  checkpoint temporaries count as the run's. ``--overwrite`` moves the old run's files
  aside (``OUT/.previous-run/``) once the new run has passed every check, deletes them at
  the new run's first checkpoint, and puts them back if the new run fails before it (or, after
  a kill -9, when the folder is next used).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

from detfocal.utils.io import (atomic_write, ensure_writable_dir, read_jsonl, remove_stale_temporaries,
                               write_json_atomic)

__all__ = ["RUN_FILES", "RunFolder", "choose_resume_checkpoint", "describe_run"]

logger = logging.getLogger(__name__)

# What a run writes into its folder; --overwrite moves exactly these aside, nothing else.
RUN_FILES = ("run.json", "metrics.jsonl", "metrics.json", "config.yaml", "log.txt", "last.pth", "best.pth",
             "interrupted.pth", "results.json", "loss.png", "ap.png", "pr_curves.png", "per_class_ap.png",
             "per_class.csv")
CHECKPOINTS = ("last.pth", "best.pth", "interrupted.pth")
LOCK_NAME = ".detfocal.lock"
ASIDE_NAME = ".previous-run"


def describe_run(out_dir: Path) -> str:
    """"epoch 4, best AP 0.57" from a run's metrics.jsonl (the checkpoints are not read)."""
    try:
        epochs = [r for r in read_jsonl(out_dir / "metrics.jsonl") if r.get("type") == "epoch"]
    except (OSError, ValueError):
        return "files " + ", ".join(name for name in RUN_FILES if (out_dir / name).exists())
    numbers = [r["epoch"] for r in epochs if isinstance(r.get("epoch"), int)]
    if not numbers:
        return "no finished epoch"
    best = max((r["AP"] for r in epochs if isinstance(r.get("AP"), (int, float))), default=None)
    return f"epoch {numbers[-1] + 1}" + (f", best AP {best:.2f}" if best is not None else "")


def _stored_iteration(path: Path) -> int | None:
    """The iteration a checkpoint holds, or None (with a warning) when it cannot be read."""
    from detfocal.engine.checkpoint import load_checkpoint

    try:
        iteration = load_checkpoint(path).get("iteration", -1)
    except ValueError as exc:
        logger.warning("--resume: skipping %s: %s", path.name, exc)
        return None
    return int(iteration) if isinstance(iteration, int) else -1


def choose_resume_checkpoint(out_dir: Path) -> Path:
    """The checkpoint of ``out_dir`` with the most iterations, read from the files (never their mtime).

    Between ``interrupted.pth`` and ``last.pth`` at the same iteration, ``last.pth`` wins; an
    unreadable one (truncated by a kill) is skipped with a warning.

    Raises:
        FileNotFoundError: the folder has neither.
        ValueError: neither can be read.
    """
    candidates = [path for path in (out_dir / "last.pth", out_dir / "interrupted.pth") if path.is_file()]
    if not candidates:
        raise FileNotFoundError(f"--resume: {out_dir} has no last.pth or interrupted.pth to continue from")
    iterations = {path: _stored_iteration(path) for path in candidates}
    readable = [path for path in candidates if iterations[path] is not None]
    if not readable:
        raise ValueError(f"--resume: no checkpoint in {out_dir} can be read ({', '.join(p.name for p in candidates)})")
    return max(readable, key=lambda path: iterations[path])  # max keeps the first of equals: last.pth


class RunFolder:
    """Lock ``out_dir`` for one run and keep its files safe; use as a context manager on rank 0.

    Args:
        out_dir: the run folder (created if missing).
        checkpoint: the checkpoint being resumed (its ``run_id`` and path), or None for a new run.
        checkpoint_path: where ``checkpoint`` was read from.
        overwrite: the user's ``--overwrite``: replace the run the folder holds.

    Raises (on entering):
        ValueError: the folder is a file or not writable, another training holds its lock, or
            it holds a run that this one may not replace or continue.
    """

    def __init__(self, out_dir: Path, *, checkpoint: Mapping[str, Any] | None = None,
                 checkpoint_path: Path | None = None, overwrite: bool = False) -> None:
        self.out_dir, self.overwrite = Path(out_dir), overwrite
        self.checkpoint, self.checkpoint_path = checkpoint, checkpoint_path
        self.run_id = ""
        self._lock_handle: Any = None
        self._replace = False
        self._aside: Path | None = None

    # ---- entering: lock, check, identity
    def __enter__(self) -> "RunFolder":
        ensure_writable_dir(self.out_dir, "--output-dir")
        self._lock()
        try:
            self._recover_aside()
            self._check_ownership()
            removed = remove_stale_temporaries(self.out_dir, RUN_FILES)
            if removed:
                logger.info("removed %d temporary file(s) of an interrupted checkpoint write in %s", len(removed),
                            self.out_dir)
        except BaseException:
            self._unlock()
            raise
        return self

    def _lock(self) -> None:
        """Lock the folder itself (deleting the lock file cannot break it); the file names the holder."""
        import fcntl

        descriptor = os.open(self.out_dir, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(descriptor)
            try:
                holder = (self.out_dir / LOCK_NAME).read_text(encoding="utf-8").strip() or "another process"
            except OSError:
                holder = "another process"
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ValueError(f"--output-dir {self.out_dir} is in use by another training ({holder}); "
                                 f"wait for it, or choose another --output-dir") from None
            raise
        self._lock_handle = descriptor
        (self.out_dir / LOCK_NAME).write_text(f"pid {os.getpid()} on {os.uname().nodename}\n", encoding="utf-8")

    def _unlock(self) -> None:
        if self._lock_handle is not None:
            os.close(self._lock_handle)  # closing releases the flock
            self._lock_handle = None

    def holds_run(self) -> bool:
        return any((self.out_dir / name).exists() for name in RUN_FILES if name != "log.txt")

    def _folder_run_id(self) -> str | None:
        try:
            run_id = json.loads((self.out_dir / "run.json").read_text(encoding="utf-8"))["run_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return str(run_id) if isinstance(run_id, str) and run_id else None

    def _check_ownership(self) -> None:
        """Decide whether this run may continue or replace what the folder holds."""
        resuming = self.checkpoint is not None
        if not self.holds_run():
            self.run_id = str(self.checkpoint.get("run_id") or "") if resuming else ""
            return
        folder_id = self._folder_run_id()
        if resuming:
            checkpoint_id = self.checkpoint.get("run_id") or None
            in_folder = self.checkpoint_path is not None and (
                self.checkpoint_path.resolve().parent == self.out_dir.resolve())
            # Ids decide where both have one, wherever the file sits (a copied-in checkpoint of
            # another run is not this run's); a checkpoint from before run ids counts as the
            # run of the folder it is in.
            own = checkpoint_id == folder_id if folder_id and checkpoint_id else in_folder
            if own:
                self.run_id = folder_id or str(checkpoint_id or "")
                return
            if not self.overwrite:
                raise ValueError(f"--resume {self.checkpoint_path}: the checkpoint is from another run than the one "
                                 f"{self.out_dir} holds ({describe_run(self.out_dir)}); resume into a new "
                                 f"--output-dir, or add --overwrite to replace that run")
        elif not self.overwrite:
            raise ValueError(f"{self.out_dir} holds a run ({describe_run(self.out_dir)}); use --resume to continue "
                             f"it, --output-dir for a new folder, or --overwrite to replace it")
        self.run_id = str(self.checkpoint.get("run_id") or "") if resuming else ""
        self._replace = True

    def _recover_aside(self) -> None:
        """A --overwrite that died before its first checkpoint (kill -9, OOM) left the run it was
        replacing in .previous-run/: put it back before anything else looks at the folder."""
        aside = self.out_dir / ASIDE_NAME
        if not aside.exists():
            return
        ours = set(RUN_FILES) | {"tensorboard"}
        foreign = sorted(path.name for path in aside.iterdir() if path.name not in ours)
        foreign += sorted(f"tensorboard/{path.name}" for path in (aside / "tensorboard").glob("*")
                          if not path.name.startswith("events.out.tfevents."))
        if foreign:
            raise ValueError(f"{aside} holds files detfocal did not put there ({', '.join(foreign[:4])}); move "
                             f"them out of it, then start again (it holds a run that an --overwrite moved aside)")
        self._aside = aside
        self._restore_aside()

    # ---- starting: once every check has passed
    def start(self, config_yaml: str) -> str:
        """Move a replaced run aside, write run.json and config.yaml; returns the run id.

        Call it when the data and the model are built and checked, just before the first step.
        """
        if self._replace:
            self._aside = self.out_dir / ASIDE_NAME
            self._aside.mkdir()  # a leftover one was put back on entering
            for name in RUN_FILES:
                if (self.out_dir / name).exists():
                    os.replace(self.out_dir / name, self._aside / name)
            events = sorted((self.out_dir / "tensorboard").glob("events.out.tfevents.*"))
            if events:
                (self._aside / "tensorboard").mkdir()
                for path in events:
                    os.replace(path, self._aside / "tensorboard" / path.name)
            logger.info("--overwrite: moved the previous run's files to %s; they are deleted at this run's first "
                        "checkpoint", self._aside)
        self.run_id = self.run_id or self._folder_run_id() or uuid.uuid4().hex[:12]
        write_json_atomic(self.out_dir / "run.json", {"run_id": self.run_id})
        atomic_write(self.out_dir / "config.yaml", lambda handle: handle.write(config_yaml), binary=False)
        return self.run_id

    def checkpoint_written(self) -> None:
        """The new run has a checkpoint: the replaced run's files are no longer needed."""
        if self._aside is None:
            return
        for name in RUN_FILES:
            (self._aside / name).unlink(missing_ok=True)
        for events in (self._aside / "tensorboard").glob("events.out.tfevents.*"):
            events.unlink()
        for folder in (self._aside / "tensorboard", self._aside):
            with contextlib.suppress(OSError):  # left in place if something else is in it
                folder.rmdir()
        self._aside = None

    def _restore_aside(self) -> None:
        """The new run failed before its first checkpoint: put the replaced run back."""
        if self._aside is None:
            return
        if (self._aside / "tensorboard").is_dir():  # the failed run's events go, the old run's come back
            for events in (self.out_dir / "tensorboard").glob("events.out.tfevents.*"):
                events.unlink()
        for path in sorted(self._aside.rglob("*")):
            if path.is_file():
                target = self.out_dir / path.relative_to(self._aside)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
        for folder in (self._aside / "tensorboard", self._aside):
            with contextlib.suppress(OSError):
                folder.rmdir()
        logger.warning("the new run stopped before its first checkpoint; the previous run's files are back in %s",
                       self.out_dir)
        self._aside = None

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        try:
            if exc_type is not None:
                self._restore_aside()
        finally:
            self._unlock()
