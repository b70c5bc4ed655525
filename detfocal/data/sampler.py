"""The training index stream: one sampler per run that can start at any iteration.

Like detectron2's ``TrainingSampler``, it is infinite, so the run keeps one ``DataLoader``
(and its worker processes) from the first step to the last, and a resumed run starts the
stream at its checkpoint's iteration without reading the batches before it. Epoch ``e``
is the permutation ``torch.randperm(n, seed + e)`` padded and split over ranks exactly as
``torch.utils.data.DistributedSampler`` does, so the order is a function of (seed, epoch,
rank) alone and matches runs made with per-epoch ``DistributedSampler`` loaders.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableBatchSampler"]


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices forever, epoch after epoch, from ``start_iteration`` on.

    An epoch is ``ceil(ceil(num_samples / world_size) / batch_size)`` batches; its last one
    may be short (no sample is dropped).

    Args:
        num_samples: the dataset's length (> 0).
        batch_size: samples per batch on this rank (> 0).
        seed: the shuffling seed, shared by every rank.
        rank: this process's rank in [0, world_size).
        world_size: the number of processes sharing the data.
        start_iteration: the first batch to yield, counted from the run's start.

    Example:
        >>> sampler = ResumableBatchSampler(10, batch_size=4, seed=0, start_iteration=2)
        >>> sampler.iters_per_epoch
        3
        >>> len(next(iter(sampler)))  # batch 2 of epoch 0 is its short last one
        2
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 start_iteration: int = 0) -> None:
        for name, value, low in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1),
                                 ("world_size", world_size, 1), ("start_iteration", start_iteration, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start_iteration = rank, world_size, start_iteration
        self.samples_per_rank = math.ceil(num_samples / world_size)
        self.iters_per_epoch = math.ceil(self.samples_per_rank / batch_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch``, in order (DistributedSampler's with ``shuffle=True``)."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        indices = torch.randperm(self.num_samples, generator=generator).tolist()
        total = self.samples_per_rank * self.world_size
        while len(indices) < total:  # pad by repeating from the start, as DistributedSampler
            indices += indices[:total - len(indices)]
        return indices[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start_iteration, self.iters_per_epoch)
        while True:
            indices = self.epoch_indices(epoch)
            for batch in range(offset, self.iters_per_epoch):
                yield indices[batch * self.batch_size:(batch + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0
