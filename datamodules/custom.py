"""Your own labelled text as the source of a text data module: the task (text columns, label set or a
regression) read from the training file, and the GLUE protocol's split of it.

Files are read once, when the source is made (the label set decides the model's head), and checked
there, so a bad file fails with one line before anything is written.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset

from datamodules.cache import file_identity
from datamodules.errors import DataConfigError
from datamodules.files import (
    Table,
    choose_text_fields,
    infer_labels,
    is_hub_name,
    label_ids,
    label_name,
    read_hub,
    read_table,
    task_name_of,
    to_dataset,
)
from datamodules.splits import FewShot, Split, check_split_size, few_shot_split, train_size
from datamodules.tasks import TaskInfo, custom_task

LABELLED = ("train", "validation", "test")


class FileSource:
    """Labelled rows from your files (`files`: train, validation, test; a hub dataset name serves all three).

    The split (the same protocol as GLUE's): shuffle train by `seed`, first K rows train (all but the dev
    rows without K), the next `dev_size` rows dev when there is no validation file; the test after fit
    scores the test file, or the validation rows when there is none. Without a training file (predicting
    from a checkpoint) the task is built from the labels and text fields given.
    """

    cache_folder = "custom"

    def __init__(self, files: dict[str, str | None], text_fields: Sequence[str] | None, label_field: str,
                 labels: Sequence[Any] | None, regression: bool | None, name: str | None, few_shot: FewShot) -> None:
        self.files, self.label_field, self.few_shot = files, label_field, few_shot
        self._given_labels = [label_name(x) for x in labels] if labels else None
        if self._given_labels and len(set(self._given_labels)) != len(self._given_labels):
            raise DataConfigError(f"labels={list(labels or [])!r}: a label is given twice (1, 1.0 and '1' are one)")
        self._tables: dict[str, Table | None] = {}
        self.task: TaskInfo = self._read_task(list(text_fields) if text_fields else None, regression, name)
        if files["train"] is not None:
            self._check_splits()

    # ------------------------------------------------------------------------------ the task
    def _read_task(self, text_fields: list[str] | None, regression: bool | None, name: str | None) -> TaskInfo:
        train_file = self.files["train"]
        if train_file is None:  # predicting from a checkpoint: the label set is recorded there
            fields = tuple(text_fields or ("text",))
            return custom_task(name or "custom", fields, tuple(self._given_labels or ()), bool(regression))
        train = self.table("train")
        assert train is not None
        fields = choose_text_fields(train, text_fields)
        if self._given_labels is not None and regression:
            raise DataConfigError("labels=... and regression=True: a regression has no label set")
        if self._given_labels is not None:
            label_names, regression = tuple(self._given_labels), False
        else:
            label_names, regression = infer_labels(train, self.label_field, regression)
        if not regression and len(label_names) < 2:
            raise DataConfigError(
                f"{train_file}: column {self.label_field!r} holds one label ({list(label_names)}); "
                "a classifier needs two or more"
            )
        return custom_task(name or task_name_of(train_file), fields, label_names, regression)

    def _check_splits(self) -> None:
        """Every labelled split parses with the task's columns and labels; K + dev_size fits."""
        train = self.table("train")
        assert train is not None
        k, dev, where = self.few_shot.k_shot, self.few_shot.dev_size, str(self.files["train"])
        if self.table("validation") is None:
            train_size(k, dev, len(train), where)
        elif k is not None:
            check_split_size(k, 0, len(train), where)
        for split in LABELLED:
            if (table := self.table(split)) is not None:
                self._labelled(table)

    # ------------------------------------------------------------------------------ reading
    def table(self, split: str) -> Table | None:
        """A labelled split of the user's data, read once (None when not given)."""
        if split not in self._tables:
            source, train_file, option = self.files[split], self.files["train"], f"--data.{split}_file"
            if source is None and train_file is not None and is_hub_name(train_file) and split != "train":
                self._tables[split] = read_hub(train_file, split, "--data.train_file")
            elif source is None:
                self._tables[split] = None
            elif is_hub_name(source):
                table = read_hub(source, split, option)
                if table is None:
                    raise DataConfigError(f"{option}={source!r}: the hub dataset has no {split} split")
                self._tables[split] = table
            else:
                self._tables[split] = read_table(source, option)
        return self._tables[split]

    def _labelled(self, table: Table) -> Dataset:
        task = self.task
        option = "--data.labels" if self._given_labels else f"the labels of {self.files['train']}"
        ids = label_ids(table, self.label_field, task.label_names, task.is_regression, option)
        return to_dataset(table, task.text_fields, ids)

    def _labelled_split(self, split: str) -> Dataset:
        table = self.table(split)
        if table is None:  # only train can be missing here: the splits use no other file that is not given
            raise DataConfigError(f"{split}_file=None: this stage reads the labelled rows of --data.{split}_file")
        return self._labelled(table)

    # ------------------------------------------------------------------------------ splits
    @property
    def test_is_validation(self) -> bool:
        return self.table("test") is None

    def splits(self) -> dict[str, Split]:
        """train, validation and test: the rows of the given files, or the protocol's split of train."""
        k, seed, dev = self.few_shot.k_shot, self.few_shot.seed, self.few_shot.dev_size
        labelled = functools.cache(self._labelled_split)

        def drawn(part: int, dev_size: int) -> Callable[[], Dataset]:
            def build() -> Dataset:
                train, where = labelled("train"), str(self.files["train"])
                return few_shot_split(train, train_size(k, dev_size, len(train), where), seed, dev_size, where)[part]

            return build

        plan: dict[str, Split] = {}
        if self.table("validation") is not None:
            plan["validation"] = Split("dev", {"split": "validation"}, functools.partial(labelled, "validation"))
            if k is None:
                plan["train"] = Split("train-full", {"split": "train"}, functools.partial(labelled, "train"))
            else:
                plan["train"] = Split(f"train-k{k}-seed{seed}", {"split": "train", "k_shot": k, "seed": seed},
                                      drawn(0, 0))  # fmt: skip
        else:
            rows = {"split": "train", "k_shot": k, "seed": seed, "dev_size": dev}
            plan["train"] = Split(f"train-k{k or 'rest'}-seed{seed}", rows, drawn(0, dev))
            plan["validation"] = Split(f"dev-k{k or 'rest'}-seed{seed}-n{dev}", {**rows, "part": "dev"}, drawn(1, dev))
        if self.table("test") is not None:
            plan["test"] = Split("test", {"split": "test"}, functools.partial(labelled, "test"))
        else:  # no test data: the test after fit scores the validation rows (said in the summary)
            plan["test"] = plan["validation"]
        return plan

    def fingerprint(self, split: str) -> str:
        path = self.files[split] or self.files["train"]
        assert path is not None
        identity: list[Any] = [path, self.task.to_dict(), self.label_field]
        if not is_hub_name(path):
            identity += list(file_identity(path))
        return hashlib.sha256(repr(identity).encode()).hexdigest()[:16]

    def unlabeled(self) -> dict[str, tuple[str, Callable[[], Dataset]]]:
        raise DataConfigError("predict_file=None: give --data.predict_file, the rows to predict")
