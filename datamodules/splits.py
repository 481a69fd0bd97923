"""The paper's few-shot split, exactly as the authors' released code makes it."""

from __future__ import annotations

from datasets import Dataset

from datamodules.errors import DataConfigError


def check_split_size(k_shot: int, dev_size: int, num_rows: int, where: str) -> None:
    if k_shot + dev_size > num_rows:
        raise DataConfigError(
            f"k_shot={k_shot} + dev_size={dev_size} = {k_shot + dev_size} is more than the {num_rows} rows of {where}"
        )


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
