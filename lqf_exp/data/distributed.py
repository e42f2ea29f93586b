"""Samplers that make W data-parallel ranks see what one process sees.

Training: the W ranks split every *global* batch of the single-process order (``data.batch_size`` samples drawn by
:class:`~lqf_exp.data.sampling.EpochShuffle`) instead of each drawing batches of its own, so the union of the ranks'
k-th batches is the single-process k-th batch and a solver that all-reduces its sums takes the single-process steps.
Evaluation: each rank scores a contiguous, unpadded block of the split, so every sample is scored exactly once (a
``DistributedSampler`` pads the split to a multiple of W with repeated samples, which then count twice).

The data module builds these itself (the trainer configs set ``use_distributed_sampler: false``, so Lightning does
not replace them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import Sampler

__all__ = ["EvalShard", "GlobalBatchShard", "rank_and_world"]


def rank_and_world(trainer: Any) -> tuple[int, int]:
    """``(global rank, world size)`` of the trainer a data module is attached to; ``(0, 1)`` with none (a loader
    built outside a fit, e.g. by a benchmark, is the single-process one)."""
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), max(1, int(trainer.world_size))


def _share(length: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``length`` items: sizes differ by at most one, in rank order."""
    return slice(rank * length // world, (rank + 1) * length // world)


class GlobalBatchShard(Sampler[list[int]]):
    """A batch sampler: this rank's share of each global batch of ``sampler``'s order.

    ``batch_size`` is the global batch; each rank gets ``batch_size / world`` samples of every full batch and a near
    equal share of the last, shorter one, so every rank has the same number of batches (its steps meet the other
    ranks' all-reduces). ``splits_global_batches`` tells code that reads a loader directly (the K-FAC callback) that
    its batches are already this rank's share: taking every W-th one would drop the others' shares.
    """

    splits_global_batches = True

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int = 0, world: int = 1) -> None:
        size = len(sampler)  # type: ignore[arg-type]
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of {world} ranks")
        if batch_size % world:
            raise ValueError(
                f"data.batch_size={batch_size} is the global batch, split across the {world} ranks (trainer.devices × "
                f"trainer.num_nodes), so it must be divisible by {world}; use e.g. "
                f"data.batch_size={max(world, batch_size // world * world)}")
        tail = size % batch_size
        if 0 < tail < world:
            # A rank with nothing in the last batch would miss the others' all-reduces of that step.
            raise ValueError(
                f"the last training batch has {tail} sample(s) ({size} samples, data.batch_size={batch_size}), fewer "
                f"than the {world} ranks that split it; choose a data.batch_size that leaves 0 or at least {world}")
        self.sampler, self.batch_size, self.rank, self.world = sampler, int(batch_size), int(rank), int(world)
        self.size = size

    def set_epoch(self, epoch: int) -> None:
        # Lightning calls this before every epoch; the order is the wrapped sampler's.
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            yield batch[_share(len(batch), self.rank, self.world)]

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)


class EvalShard(Sampler[int]):
    """This rank's contiguous block of ``0..size-1``, unpadded: the blocks of the W ranks partition the split (their
    sizes differ by at most one), so summed metric states count every sample once."""

    def __init__(self, data: Sized | int, rank: int = 0, world: int = 1) -> None:
        size = data if isinstance(data, int) else len(data)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of {world} ranks")
        self.indices = range(size)[_share(size, rank, world)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
