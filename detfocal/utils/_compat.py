"""Every private torch and torchvision name detfocal uses, in one place.

When a torch or torchvision release moves or removes one of these, this is the only file to
change. Each entry says why it is needed and which versions were checked (torch 2.6-2.14,
torchvision 0.21-0.29; the CI runs torch 2.14.1 and torchvision 0.29.1).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# torchvision has no public home for RetinaNet's matcher and box coder; its own RetinaNet
# imports them from here (torchvision.models.detection._utils, unchanged 0.8-0.29).
from torchvision.models.detection._utils import BoxCoder, Matcher  # noqa: F401

__all__ = ["BoxCoder", "Matcher", "assert_async", "foreach_copy_", "foreach_lerp_", "graph_is_kept",
           "shutdown_workers", "tensor_version"]


def assert_async(condition: Tensor, message: str) -> None:
    """A device-side assert that fires at the next sync instead of stalling the stream now.

    ``torch._assert_async`` (present since torch 1.8; the message argument since 2.1).
    """
    torch._assert_async(condition, message)


def foreach_copy_(destinations: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """``d.copy_(s)`` for every pair in one fused kernel (``torch._foreach_copy_``, torch >= 2.1)."""
    torch._foreach_copy_(list(destinations), list(sources))


def foreach_lerp_(starts: Sequence[Tensor], ends: Sequence[Tensor], weight: float) -> None:
    """``s.lerp_(e, weight)`` for every pair in one fused kernel (``torch._foreach_lerp_``, torch >= 2.0)."""
    torch._foreach_lerp_(list(starts), list(ends), weight)


def graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph``), so another may follow.

    Read from ``torch._C._autograd._get_current_graph_task_keep_graph`` (torch >= 2.4). Where
    torch does not expose it, assume it is kept: correct, at the cost of autograd copying the
    gradient into a leaf's ``.grad``.
    """
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if getter is None else bool(getter())


def tensor_version(x: Tensor) -> int:
    """How many in-place changes ``x``'s storage has seen (``Tensor._version``, torch >= 1.0).

    Autograd's own check that a saved tensor was not modified before backward; the loss uses
    it for the inputs it recomputes from under ``create_graph``.
    """
    return x._version


def shutdown_workers(loader: object) -> None:
    """Stop a ``DataLoader``'s persistent worker processes now, and kill any that do not stop.

    ``DataLoader._iterator`` and ``_shutdown_workers`` (torch 1.7-2.14) are what the loader itself
    calls when it is garbage collected. detfocal's workers ignore SIGTERM (a signal to the whole
    job must reach the training process, not kill its workers), so the fallbacks that send it,
    ``Process.terminate`` and multiprocessing's exit handler, cannot stop them: they are asked to
    stop through the loader's own queues here, before the process exits.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is None or not hasattr(iterator, "_shutdown_workers"):
        return
    iterator._shutdown_workers()
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)
    loader._iterator = None  # type: ignore[attr-defined]
