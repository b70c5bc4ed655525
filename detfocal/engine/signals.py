"""Stopping a run cleanly: Ctrl-C, SIGTERM and SIGUSR1 all stop at the next step boundary.

SIGTERM is what SLURM, Kubernetes and ``docker stop`` send before a kill; SIGUSR1 is what
``sbatch --signal=USR1@120`` sends ahead of a time limit. Each sets a flag that the loop
reads at the step's one host sync, so every rank stops after the same step; rank 0 then
writes ``interrupted.pth`` (consistent: never a half-applied optimizer step) and the run
raises :class:`Interrupted`. The command exits with 128 + the signal's number: 130 for
Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1. A second signal stops at once.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

__all__ = ["STOP_SIGNALS", "Interrupted", "StopRequest"]

logger = logging.getLogger(__name__)

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving its state; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopRequest:
    """While entered, :data:`STOP_SIGNALS` set :attr:`signum` instead of ending the process.

    Only the main thread can install handlers; elsewhere (a notebook's worker thread) the
    signals keep their previous behaviour.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_loop = False  # set by the loop: before it, a signal stops at once (nothing to save)
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def is_requested(self) -> bool:
        """Whether a stop signal arrived (for ``train_step``'s ``stop_requested``)."""
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.in_loop:
            raise Interrupted(signum, f"{signal.Signals(signum).name} before the first step: nothing to save")
        if self.signum is not None:
            raise Interrupted(signum, f"{signal.Signals(signum).name} again: stopped at once, without saving")
        self.signum = signum
        logger.warning("%s: stopping after this step and saving interrupted.pth (send it again to stop now)",
                       signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
