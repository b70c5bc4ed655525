"""Distributed helpers: a few explicit functions around ``torch.distributed``, no wrappers.

Launch with ``torchrun --nproc_per_node=N tools/train.py ...``; torchrun sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, and :func:`init_distributed` reads
them. Started as a plain ``python`` process (none of those variables set), every helper
here is a no-op and the code runs single-process unchanged.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

_ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def is_dist_initialized() -> bool:
    """Whether a default process group exists (``torch.distributed`` available and initialised)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_dist_initialized() else 1


def get_rank() -> int:
    """This process's global rank; 0 when not distributed."""
    return dist.get_rank() if is_dist_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that logs, evaluates and saves."""
    return get_rank() == 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes.

    The input is left untouched and the result never carries gradient: this is for counts
    and metrics (for example the number of positive anchors that normalises the loss),
    not for values that backpropagate.

    Args:
        tensor: any tensor, on the device the backend expects (CUDA for NCCL).

    Returns:
        A new tensor holding the element-wise sum over processes; ``tensor.detach()``
        (no copy, no communication) when not distributed or with one process.

    Example:
        >>> total = all_reduce_sum(torch.tensor(3.0))  # 3.0 in a single process
    """
    if get_world_size() == 1:
        return tensor.detach()
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(backend: str | None = None) -> tuple[int, int, int, torch.device]:
    """Initialise the default process group from torchrun's environment variables.

    Uses NCCL when CUDA is available and gloo otherwise (unless ``backend`` says), and on
    CUDA binds this process to GPU ``LOCAL_RANK``. Calling it again once initialised just
    returns the current values.

    Args:
        backend: "nccl", "gloo", ...; None picks NCCL on CUDA and gloo on CPU.

    Returns:
        ``(rank, local_rank, world_size, device)``. Without RANK/LOCAL_RANK/WORLD_SIZE in
        the environment: ``(0, 0, 1, cuda:0 or cpu)`` and no process group is created.

    Raises:
        ValueError: only some of RANK, LOCAL_RANK and WORLD_SIZE are set, or one is not an
            integer.

    Example:
        >>> rank, local_rank, world_size, device = init_distributed()
        >>> # ... model.to(device); DistributedDataParallel(model) when world_size > 1 ...
        >>> cleanup()
    """
    present = [name for name in _ENV_VARS if name in os.environ]
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if not present:
        return 0, 0, 1, torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if len(present) != len(_ENV_VARS):
        missing = [name for name in _ENV_VARS if name not in os.environ]
        raise ValueError(f"distributed launch needs RANK, LOCAL_RANK and WORLD_SIZE; set {present}, missing {missing}")
    rank, local_rank, world_size = (_env_int(name) for name in _ENV_VARS)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not is_dist_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), init_method="env://",
                                rank=rank, world_size=world_size)
    return rank, local_rank, world_size, device


def cleanup() -> None:
    """Destroy the default process group, if there is one."""
    if is_dist_initialized():
        dist.destroy_process_group()
