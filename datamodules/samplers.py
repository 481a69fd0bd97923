"""Samplers that make the order of training and the coverage of evaluation exactly reproducible, and the
loaders every data module builds from them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler


class EpochSeededRandomSampler(RandomSampler):
    """Shuffles with a `torch.Generator` seeded from (seed, epoch): an epoch's order is a function of both.

    Lightning calls `set_epoch` at the start of every epoch, so a run resumed at epoch e replays
    epoch e's order without any saved generator state. A RandomSampler subclass, so under DDP
    Lightning swaps in its usual DistributedSampler(shuffle=True).
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0
        self.start = 0  # a resumed epoch starts here (set by ResumableDataLoader); back to 0 after

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # SeedSequence mixes the pair, so (seed, epoch + 1) never repeats (seed + 1, epoch).
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        start, self.start = self.start, 0
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()[start:]


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices ordered by decreasing length (ties in dataset order).

    Evaluation in this order pads each batch only to rows of about its own length: on RTE's
    dev split this roughly halves the tokens computed, and metrics do not depend on the order.
    """
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


class OrderedEvalSampler(Sampler[int]):
    """One process: every example once, in a given order (default: dataset order)."""

    def __init__(self, dataset: Sized, order: Sequence[int] | None = None) -> None:
        self.order = list(range(len(dataset))) if order is None else list(order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation shards ``order[rank::world_size]`` with no padding, so every example is scored once.

    Torch's DistributedSampler repeats examples to even out the shards, which biases metrics;
    here shards may differ by one example. Lightning keeps a sampler that is already a
    DistributedSampler, so it does not replace this one. Striding a longest-first order gives
    every rank a similar share of the long rows.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None,
                 order: Sequence[int] | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.total_size = len(dataset)
        self.order = list(range(self.total_size)) if order is None else list(order)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.order[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


def eval_sampler(data: Sized, lengths: Sequence[int]) -> Sampler[int]:
    """Longest rows first (less padding per batch); under DDP sharded without Lightning's padding, so
    each example is scored exactly once."""
    order = longest_first(lengths)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return UnpaddedDistributedSampler(data, order=order)
    return OrderedEvalSampler(data, order)


def data_loader(data: Any, batch_size: int, sampler: Sampler, collate: Callable, num_workers: int,
                loader: type[DataLoader] = DataLoader) -> DataLoader:
    """A loader over `data` in the sampler's order; workers, when any, are kept between epochs."""
    return loader(data, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
                  persistent_workers=num_workers > 0)
