"""A GLUE task as the source of a text data module: the paper's splits of its labelled files, its unlabeled
test rows for the leaderboard."""

from __future__ import annotations

import functools
from collections.abc import Callable

from datasets import Dataset

from datamodules.sources import (
    count_rows,
    eval_split,
    load_raw_split,
    load_unlabeled_test,
    raw_splits,
    source_fingerprint,
    split_files,
    unlabeled_test_splits,
)
from datamodules.splits import FewShot, Split, check_split_size, few_shot_split
from datamodules.tasks import TaskInfo, get_task

PREDICT_PREFIX = "predict:"


class GLUESource:
    """One GLUE task, read from `data_dir` (GLUE's TSVs or the hub's parquet export) if given, else the hub.

    Few-shot (`k_shot=K`): train = first K rows of GLUE train shuffled by `Dataset.shuffle(seed)`,
    validation = the next `dev_size` rows, test = GLUE dev. Full data (`k_shot=None`): train = GLUE
    train, validation = test = GLUE dev (the paper reports best-on-dev). MNLI has two test sets,
    matched then mismatched; its full-data validation is the matched one.
    """

    test_is_validation = False  # GLUE dev is the test set; the few-shot dev rows come from train

    def __init__(self, task: str, data_dir: str | None, few_shot: FewShot) -> None:
        self.task: TaskInfo = get_task(task)
        self.data_dir, self.few_shot = data_dir, few_shot
        self.cache_folder = self.task.name

    def check_files(self) -> None:
        """Every labelled split's local files exist and K + dev_size rows fit in train: fails before training."""
        if self.data_dir is None:
            return  # the hub: nothing to look at before loading
        for split in raw_splits(self.task):
            split_files(self.task, split, self.data_dir)
        if self.few_shot.k_shot is not None:
            rows = count_rows(self.task, "train", self.data_dir)
            check_split_size(self.few_shot.k_shot, self.few_shot.dev_size, rows, f"{self.task.name} train")

    def splits(self) -> dict[str, Split]:
        """train, validation and the task's test split(s); each raw split is read once per call."""
        task, data_dir = self.task, self.data_dir
        k, seed, dev = self.few_shot.k_shot, self.few_shot.seed, self.few_shot.dev_size

        @functools.cache
        def raw(split: str) -> Dataset:
            return load_raw_split(task, split, data_dir)

        def few_shot(part: int) -> Callable[[], Dataset]:
            assert k is not None
            return lambda: few_shot_split(raw("train"), k, seed, dev, f"{task.name} train")[part]

        plan = {test: Split(s, {"split": s}, functools.partial(raw, s))
                for test in task.test_splits for s in [eval_split(task, test)]}  # fmt: skip
        if k is None:
            plan["train"] = Split("train-full", {"split": "train"}, functools.partial(raw, "train"))
            plan["validation"] = plan[task.test_splits[0]]
        else:
            rows = {"split": "train", "k_shot": k, "seed": seed}
            plan["train"] = Split(f"train-k{k}-seed{seed}", rows, few_shot(0))
            plan["validation"] = Split(f"dev-k{k}-seed{seed}-n{dev}", {**rows, "part": "dev", "dev_size": dev},
                                       few_shot(1))  # fmt: skip
        return plan

    def fingerprint(self, split: str) -> str:
        return source_fingerprint(self.task, split, self.data_dir)

    def unlabeled(self) -> dict[str, tuple[str, Callable[[], Dataset]]]:
        """GLUE's unlabeled test split(s), what the leaderboard scores: {split: (its file's name, its rows)}."""
        return {
            PREDICT_PREFIX + split: (name, functools.partial(load_unlabeled_test, self.task, split, self.data_dir))
            for split, name in unlabeled_test_splits(self.task, self.data_dir).items()
        }
