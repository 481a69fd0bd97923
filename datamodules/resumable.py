"""A training DataLoader whose place in the epoch is saved in Lightning checkpoints.

Lightning saves `state_dict()` of every train loader that has one (fit loop -> CombinedLoader) and,
when a run resumes mid-epoch, calls `load_state_dict()` before iterating: the resumed epoch then
yields exactly the batches the killed run had not trained on, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader


def _epoch_of(sampler: Any) -> int | None:
    epoch = getattr(sampler, "epoch", None)
    return epoch if isinstance(epoch, int) else None


class ResumableDataLoader(DataLoader):
    """`state_dict()`: the sampler's epoch and how many batches of it were handed out.

    After `load_state_dict()`, the next iteration over that same epoch skips those batches: by index
    when the sampler supports `start` (no data is read), else by drawing and dropping them (e.g.
    Lightning's DistributedSampler under DDP). Lightning only pre-fetches from loaders without a
    length, so the count is exactly the batches trained on when a checkpoint is written.

    The loader draws its workers' base seed from its own generator, not the global one, so that
    starting an epoch does not move the global RNG (whose state the checkpoint also restores).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        super().__init__(*args, **kwargs)
        self._handed_out = 0
        self._resume: tuple[int | None, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": _epoch_of(self._order_sampler), "batches": self._handed_out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batches = state.get("epoch"), int(state.get("batches", 0))
        self._resume = (epoch, batches)
        sampler = self._order_sampler
        if epoch is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # worker processes draw indices before Lightning's own set_epoch

    @property
    def _order_sampler(self) -> Any:
        """The sampler that orders the epoch (the batch sampler's, when one is given)."""
        return getattr(self.batch_sampler, "sampler", None) or self.sampler

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        # A generator: this runs at the first next(), after Lightning's set_epoch for the epoch.
        resume, self._resume = self._resume, None
        sampler = self._order_sampler
        skip = 0
        if resume is not None and resume[0] == _epoch_of(sampler):
            skip = resume[1]
        drop = 0
        if skip and hasattr(sampler, "start") and self.batch_size is not None:
            sampler.start = skip * self.batch_size  # same batches: drop_last only cuts the end
        else:
            drop = skip
        self._handed_out = skip
        for i, batch in enumerate(super().__iter__()):
            if i < drop:
                continue
            self._handed_out += 1
            yield batch
