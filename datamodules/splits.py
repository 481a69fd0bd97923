"""The paper's few-shot split, exactly as the authors' released code makes it, and what names a split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from datamodules.errors import DataConfigError


@dataclass(frozen=True)
class FewShot:
    """The split settings every source of a data module shares: K training rows (None: all), the split
    seed, the dev rows drawn after them. A source draws its rows from these alone, so a task's split
    is the same whichever data module (and beside whichever other tasks) it is read in."""

    k_shot: int | None
    seed: int
    dev_size: int


@dataclass(frozen=True)
class Split:
    """One split a source serves: a readable cache label, what identifies its rows (the cache key; its
    "split" names the source split the rows come from) and how to build them, untokenised."""

    label: str
    rows: dict[str, Any]
    build: Callable[[], Dataset]


def check_split_size(k_shot: int, dev_size: int, num_rows: int, where: str) -> None:
    if k_shot + dev_size > num_rows:
        raise DataConfigError(
            f"k_shot={k_shot} + dev_size={dev_size} = {k_shot + dev_size} is more than the {num_rows} rows of {where}"
        )


def train_size(k_shot: int | None, dev_size: int, num_rows: int, where: str) -> int:
    """K, or every row but the dev rows when K is None; one line when the rows are too few for both."""
    k = k_shot if k_shot is not None else num_rows - dev_size
    if k < 1:
        raise DataConfigError(
            f"dev_size={dev_size}: {where} has {num_rows} rows, too few to also train on; "
            "give --data.validation_file or a smaller --data.dev_size"
        )
    check_split_size(k, dev_size, num_rows, where)
    return k


def few_shot_split(
    train: Dataset, k_shot: int, seed: int, dev_size: int, where: str = "train"
) -> tuple[Dataset, Dataset]:
    """Shuffle GLUE train, in its row order, with `Dataset.shuffle(seed)`: K rows train, next dev_size dev.

    `Dataset.shuffle` draws `np.random.default_rng(seed).permutation(n)`, so the split depends on
    (data, K, seed, dev_size) only: the same on every machine, run and DDP rank, and the two parts
    are disjoint slices of one permutation.
    """
    check_split_size(k_shot, dev_size, len(train), where)
    shuffled = train.shuffle(seed=seed, keep_in_memory=True)
    return shuffled.select(range(k_shot)), shuffled.select(range(k_shot, k_shot + dev_size))
