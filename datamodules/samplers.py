"""Samplers that make the order of training and the coverage of evaluation exactly reproducible."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DistributedSampler, RandomSampler


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


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation shards rank::world_size with no padding, so every example is scored exactly once.

    Torch's DistributedSampler repeats examples to even out the shards, which biases metrics;
    here shards may differ by one example. Lightning keeps a sampler that is already a
    DistributedSampler, so it does not replace this one.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
