"""Multi-task training batches: every batch holds rows of one task; which task each step trains is drawn by
a documented rule (docs/data.md#multi-task).

An epoch has as many steps as the tasks have batches together (``sum_t ceil(n_t / batch)``). Which task
each step trains:

- ``proportional``: every task's batches once, in a shuffled order: each row of each task is seen once per
  epoch, and a task trains in proportion to its size.
- ``temperature``: each step's task drawn independently with probability ``n_t^(1/T) / sum_s n_s^(1/T)``
  (Arivazhagan et al. 2019): ``T = 1`` is proportional in expectation, larger ``T`` flattens toward uniform,
  so small tasks are seen more often than their size gives (their rows then repeat within an epoch).

Every task's rows come in a fresh permutation each time they are used up. The order is a pure function of
(training seed, epoch): the same on every run and DDP rank, so a resumed epoch replays it. Under DDP every
rank trains the same task at each step (the other tasks' heads and gates take no gradient on any rank) on
its own share of that task's rows (``perm[rank::world]``, the permutation padded by its first rows to a
multiple of the ranks, as torch's ``DistributedSampler`` pads).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

from datamodules.errors import DataConfigError

SAMPLING = ("proportional", "temperature")


def _generator(*key: int) -> torch.Generator:
    state = np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def task_probabilities(sizes: Sequence[int], sampling: str, temperature: float) -> list[float]:
    """The share of steps each task gets (in expectation for ``temperature``, exactly for ``proportional``)."""
    power = 1.0 if sampling == "proportional" else 1.0 / temperature
    weights = [n ** power for n in sizes]
    return [w / sum(weights) for w in weights]


def check_sampling(sampling: str, temperature: float) -> None:
    if sampling not in SAMPLING:
        raise DataConfigError(f"sampling={sampling!r}: choose one of {', '.join(SAMPLING)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise DataConfigError(f"temperature={temperature!r}: must be a number > 0")


class TaskRows(Dataset):
    """Several tasks' rows, addressed ``(task, row)``; each row comes with its task's index."""

    def __init__(self, datasets: Sequence[Any]) -> None:
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, index: tuple[int, int]) -> dict[str, Any]:
        task, row = index
        return {**self.datasets[task][row], "task": task}


class TaskBatchSampler(BatchSampler):
    """Batches of one task at a time, ``[(task, row), ...]``, ordered by ``sampling`` (see the module doc).

    ``sampler`` only tells the epoch (``set_epoch``, Lightning's) and, when Lightning puts its
    ``DistributedSampler`` there under DDP, this process's rank and the number of ranks; the rows and the
    order are this sampler's own, drawn from ``seed`` and the epoch.
    """

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool = False, sizes: Sequence[int] = (),
                 seed: int = 0, sampling: str = "proportional", temperature: float = 2.0) -> None:
        check_sampling(sampling, temperature)
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.sizes, self.seed, self.sampling, self.temperature = list(sizes), seed, sampling, temperature

    @property
    def ranks(self) -> tuple[int, int]:
        """(this rank, number of ranks)."""
        if isinstance(self.sampler, DistributedSampler):
            return self.sampler.rank, self.sampler.num_replicas
        return 0, 1

    def task_batches(self) -> list[int]:
        """Batches of each task in one pass over its rows, on this rank."""
        world = self.ranks[1]
        return [math.ceil(math.ceil(n / world) / self.batch_size) for n in self.sizes]

    def __len__(self) -> int:
        return sum(self.task_batches())

    def schedule(self, epoch: int) -> list[int]:
        """The task of each step of ``epoch`` (the same on every rank)."""
        batches = self.task_batches()
        generator = _generator(self.seed, epoch)
        if self.sampling == "proportional":
            steps = torch.tensor([t for t, b in enumerate(batches) for _ in range(b)])
            return steps[torch.randperm(len(steps), generator=generator)].tolist()
        p = torch.tensor(task_probabilities(self.sizes, self.sampling, self.temperature), dtype=torch.float64)
        return torch.multinomial(p, sum(batches), replacement=True, generator=generator).tolist()

    def _rows(self, task: int, epoch: int) -> Iterator[list[int]]:
        """Task ``task``'s batches on this rank: one permutation of its rows after another."""
        rank, world = self.ranks
        n = self.sizes[task]
        for cycle in range(2**62):
            perm = torch.randperm(n, generator=_generator(self.seed, epoch, task, cycle)).tolist()
            padded = perm + perm[: (-n) % world]
            mine = padded[rank::world]
            for start in range(0, len(mine), self.batch_size):
                yield mine[start:start + self.batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        streams = [self._rows(t, epoch) for t in range(len(self.sizes))]
        for task in self.schedule(epoch):
            yield [(task, row) for row in next(streams[task])]


class EpochCounter(Sampler[int]):
    """What a ``TaskBatchSampler`` reads the epoch from outside DDP (Lightning calls ``set_epoch``)."""

    def __init__(self, data: Sized) -> None:
        self.data, self.epoch = data, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.data)))

    def __len__(self) -> int:
        return len(self.data)
