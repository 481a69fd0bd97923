"""TextDataModule: a GLUE task or the user's own files, and the rows to predict, for the CLI.

With `task`, everything is GLUEDataModule's (the paper's splits). With `train_file`, the task is read
from the files: the text column(s), the label set (sorted, or `labels` in the user's order) or a
regression, and the same few-shot protocol (shuffle by `seed`, first K train, next `dev_size` dev)
when there is no `validation_file`. `predict_file` gives the rows `predict` scores; without it,
a GLUE task predicts GLUE's unlabeled test split(s) for the leaderboard.

Files are read once, in `__init__` (the label set decides the model's head), and checked there,
so a bad file fails with one line before anything is written.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset
from torch.utils.data import DataLoader

from datamodules.cache import cache_key, load_or_build, tokenize, tokenizer_identity
from datamodules.errors import DataConfigError
from datamodules.files import (
    Table,
    choose_text_fields,
    file_format,
    infer_labels,
    is_hub_name,
    label_ids,
    read_hub,
    read_table,
    to_dataset,
)
from datamodules.glue import GLUEDataModule, _eval_sampler
from datamodules.sources import load_unlabeled_test, unlabeled_test_splits
from datamodules.splits import check_split_size, few_shot_split
from datamodules.tasks import TaskInfo, custom_task, get_task

PREDICT_PREFIX = "predict:"
STAGE_SPLITS_FIT = ("train", "validation")


class TextDataModule(GLUEDataModule):
    """A GLUE task (`task`) or your own labelled text (`train_file`), few-shot or full, plus rows to predict.

    Args:
        task: a GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte); leave unset with train_file.
        train_file: your training data: .csv, .tsv, .jsonl or .parquet, or a hub dataset name (owner/name[:config]).
        validation_file: dev data for model selection; unset: `dev_size` rows drawn from train_file.
        test_file: data scored after training; unset: the hub dataset's test split, else the validation rows.
        predict_file: rows to predict (`predict`); unset for a GLUE task: GLUE's unlabeled test split(s).
        text_fields: the one or two text columns; unset: text, sentence, sentence1+sentence2, premise+hypothesis...
        label_field: the label column.
        labels: the label set in the model's order; unset: the training file's labels, sorted.
        regression: float labels, one output, Pearson/Spearman; unset: yes when the labels are non-whole numbers.
        name: your task's name (run folder, summary); unset: the training file's name.
        model_name_or_path: the tokenizer's model (linked from --model.model_name_or_path by the CLI).
        data_dir: a local GLUE folder (RTE/train.tsv, ... or the hub's parquet export); unset: the hub.
        k_shot: K training examples (the first K after shuffling by `seed`); unset: all of them.
        seed: the split seed: which K examples and which dev rows are drawn (not the training seed).
        dev_size: dev rows drawn after the K training rows when there is no validation file.
        max_seq_length: longest input in tokens (longer ones are truncated).
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict.
        num_workers: DataLoader worker processes (0: load in the main process).
        cache_dir: where tokenised splits are kept; unset: $UNIPELT_CACHE/glue or ~/.cache/unipelt/glue.
    """

    def __init__(
        self,
        task: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        text_fields: list[str] | None = None,
        label_field: str = "label",
        labels: list[str] | None = None,
        regression: bool | None = None,
        name: str | None = None,
        model_name_or_path: str = "bert-base-uncased",
        data_dir: str | None = None,
        k_shot: int | None = None,
        seed: int = 0,
        dev_size: int = 1000,
        max_seq_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        self.train_file, self.validation_file, self.test_file = train_file, validation_file, test_file
        self.predict_file = predict_file
        self.label_field, self.regression, self.name = label_field, regression, name
        self._given_text_fields = list(text_fields) if text_fields else None
        self._given_labels = [str(x) for x in labels] if labels else None
        self._tables: dict[str, Table | None] = {}
        self.stage: str | None = None  # set by the CLI before prepare_data, while no trainer is attached
        super().__init__(
            task=task,  # type: ignore[arg-type]
            model_name_or_path=model_name_or_path,
            data_dir=data_dir,
            k_shot=k_shot,
            seed=seed,
            dev_size=dev_size,
            max_seq_length=max_seq_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            cache_dir=cache_dir,
        )
        # Lightning merges these with the model's hparams, whose `task` is the task read from the files.
        self.save_hyperparameters(ignore=[] if self.task_info.is_glue else ["task"])
        if not self.task_info.is_glue and self.train_file is not None:
            self._check_custom_splits()

    # ------------------------------------------------------------------------------ the task
    def _resolve_task(self, task: Any) -> TaskInfo:
        if task is not None and self.train_file is not None:
            raise DataConfigError(
                f"task={task!r} and train_file={self.train_file!r}: give one (a GLUE task, or your own files)"
            )
        if task is not None:
            return get_task(task)
        if self.train_file is None and self._given_labels is None and self.regression is not True:
            raise DataConfigError(
                "task=None: give --data.task (a GLUE task) or --data.train_file (your own labelled data)"
            )
        if self.train_file is None:  # predicting from a checkpoint: the label set is recorded there
            fields = tuple(self._given_text_fields or ("text",))
            name = self.name or "custom"
            labels, regression = tuple(self._given_labels or ()), bool(self.regression)
        else:
            train = self._table("train")
            assert train is not None
            fields = choose_text_fields(train, self._given_text_fields)
            name = self.name or _task_name(self.train_file)
            if self._given_labels is not None and self.regression:
                raise DataConfigError("labels=... and regression=True: a regression has no label set")
            if self._given_labels is not None:
                labels, regression = tuple(self._given_labels), False
            else:
                labels, regression = infer_labels(train, self.label_field, self.regression)
            if not regression and len(labels) < 2:
                raise DataConfigError(
                    f"{self.train_file}: column {self.label_field!r} holds one label ({list(labels)}); "
                    "a classifier needs two or more"
                )
        return custom_task(name, fields, labels, regression)

    def _check_sources(self, splits: tuple[str, ...] | None = None) -> None:
        """GLUE files are checked per stage in prepare_data (predicting needs no train file)."""
        if splits is not None:
            super()._check_sources(splits)

    def _check_custom_splits(self) -> None:
        """Every labelled split parses with the task's columns and labels; K + dev_size fits."""
        train = self._table("train")
        assert train is not None
        if self.validation_file is None and self._table("validation") is None:
            k = self.k_shot if self.k_shot is not None else len(train) - self.dev_size
            if k < 1:
                raise DataConfigError(
                    f"dev_size={self.dev_size}: {self.train_file} has {len(train)} rows, too few to also train on; "
                    "give --data.validation_file or a smaller --data.dev_size"
                )
            check_split_size(k, self.dev_size, len(train), str(self.train_file))
        elif self.k_shot is not None:
            check_split_size(self.k_shot, 0, len(train), str(self.train_file))
        for split in ("train", "validation", "test"):
            if (table := self._table(split)) is not None:
                self._labelled(table, split)

    @property
    def label_option(self) -> str:
        return "--data.labels" if self._given_labels else f"the labels of {self.train_file}"

    # ------------------------------------------------------------------------------ reading
    def _table(self, split: str) -> Table | None:
        """A labelled split of the user's data, read once (None when not given)."""
        if split not in self._tables:
            source = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}[split]
            option = f"--data.{split}_file"
            if source is None and self.train_file is not None and is_hub_name(self.train_file) and split != "train":
                self._tables[split] = read_hub(self.train_file, split, "--data.train_file")
            elif source is None:
                self._tables[split] = None
            elif is_hub_name(source):
                table = read_hub(source, "train" if split == "train" else split, option)
                if table is None:
                    raise DataConfigError(f"{option}={source!r}: the hub dataset has no {split} split")
                self._tables[split] = table
            else:
                self._tables[split] = read_table(source, option)
        return self._tables[split]

    def _labelled_split(self, split: str) -> Dataset:
        table = self._table(split)
        assert table is not None
        return self._labelled(table, split)

    def _labelled(self, table: Table, split: str) -> Dataset:
        task = self.task_info
        ids = label_ids(table, self.label_field, task.label_names, task.is_regression, self.label_option)
        return to_dataset(table, task.text_fields, ids)

    # ------------------------------------------------------------------------------ stages
    @property
    def predict_splits(self) -> dict[str, str]:
        """{split name: what the outputs are called}: the predict file, or GLUE's leaderboard files."""
        if self.predict_file is not None:
            return {PREDICT_PREFIX + "file": Path(self.predict_file).stem}
        if self.task_info.is_glue:
            return {PREDICT_PREFIX + s: f for s, f in unlabeled_test_splits(self.task_info, self.data_dir).items()}
        raise DataConfigError("predict_file=None: give --data.predict_file, the rows to predict")

    def _stage(self) -> str | None:
        trainer = self._trainer if hasattr(self, "_trainer") else None
        if trainer is not None and trainer.state.fn is not None:
            return str(trainer.state.fn.value)
        return self.stage

    def _stage_split_names(self, stage: str | None) -> tuple[str, ...]:
        tests = self.task_info.test_splits
        return {
            "fit": (*STAGE_SPLITS_FIT, *tests),  # fit ends with a test of the best checkpoint
            "validate": ("validation",),
            "test": tests,
            "predict": (),
        }.get(stage or "", self.split_names)

    def prepare_data(self) -> None:
        """Tokenises (into the disk cache) only what this stage uses: predicting needs no training file."""
        stage = self._stage()
        if self.task_info.is_glue or self.train_file is not None:
            self._load(self._stage_split_names(stage))
        if stage == "predict":
            self.predict_splits  # noqa: B018 - raises for a task of your own files without predict_file

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            for name in self.predict_splits:
                self.datasets[name] = self._predict_rows(name)
            return
        names = self._stage_split_names(stage) if stage in ("fit", "validate", "test") else self.split_names
        if stage == "fit":
            names = STAGE_SPLITS_FIT
        self.datasets.update(self._load(names))

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [
            self._loader(self.datasets[n], self.eval_batch_size, _eval_sampler(self.datasets[n]))
            for n in self.predict_splits
        ]
        return loaders[0] if len(loaders) == 1 else loaders

    def _predict_rows(self, name: str) -> Dataset:
        """Tokenised rows to predict with `idx` (their position, or GLUE's index); not cached (one-off files)."""
        if name == PREDICT_PREFIX + "file":
            assert self.predict_file is not None
            table = read_table(self.predict_file, "--data.predict_file")
            raw = to_dataset(table, self.task_info.text_fields, None)
        else:
            raw = load_unlabeled_test(self.task_info, name.removeprefix(PREDICT_PREFIX), self.data_dir)
        fingerprint = "predict-" + uuid.uuid4().hex  # in memory only: nothing to find again
        split = self.predict_splits[name]
        return tokenize(raw, self.tokenizer, self.task_info, self.max_seq_length, fingerprint, f"to predict ({split})")

    def predict_table(self) -> Table:
        """The predict file's own columns, to write back beside the predictions."""
        assert self.predict_file is not None
        return read_table(self.predict_file, "--data.predict_file")

    # ------------------------------------------------------------------------------ the user's splits
    def _plan(self) -> dict[str, tuple[str, dict[str, Any], Callable[[], Dataset]]]:
        if self.task_info.is_glue:
            return super()._plan()
        k, seed, dev = self.k_shot, self.seed, self.dev_size
        given_dev = self._table("validation") is not None
        plan: dict[str, tuple[str, dict[str, Any], Callable[[], Dataset]]] = {}
        if given_dev:
            plan["validation"] = ("dev", {"split": "validation"}, lambda: self._labelled_split("validation"))
            if k is None:
                plan["train"] = ("train-full", {"split": "train"}, lambda: self._labelled_split("train"))
            else:
                rows = {"split": "train", "k_shot": k, "seed": seed}
                plan["train"] = (f"train-k{k}-seed{seed}", rows, lambda: self._split_train(k, 0)[0])
        else:
            rows = {"split": "train", "k_shot": k, "seed": seed, "dev_size": dev}
            plan["train"] = (f"train-k{k or 'rest'}-seed{seed}", rows, lambda: self._split_train(k, dev)[0])
            plan["validation"] = (f"dev-k{k or 'rest'}-seed{seed}-n{dev}", {**rows, "part": "dev"},
                                  lambda: self._split_train(k, dev)[1])  # fmt: skip
        if self._table("test") is not None:
            plan["test"] = ("test", {"split": "test"}, lambda: self._labelled_split("test"))
        else:  # no test data: the test after fit scores the validation rows (said in the summary)
            plan["test"] = plan["validation"]
        return plan

    def _split_train(self, k: int | None, dev: int) -> tuple[Dataset, Dataset]:
        train = self._labelled_split("train")
        k = k if k is not None else len(train) - dev
        return few_shot_split(train, k, self.seed, dev, str(self.train_file))

    @property
    def test_is_validation(self) -> bool:
        return not self.task_info.is_glue and self._table("test") is None

    def _fingerprint(self, rows: dict[str, Any]) -> str:
        if self.task_info.is_glue:
            return super()._fingerprint(rows)
        source = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        path = source[rows["split"]] or self.train_file
        assert path is not None
        identity: list[Any] = [path, self.task_info.to_dict(), self.label_field]
        if not is_hub_name(path):
            stat = Path(path).expanduser().resolve().stat()
            identity += [str(Path(path).expanduser().resolve()), stat.st_size, stat.st_mtime_ns]
        return hashlib.sha256(repr(identity).encode()).hexdigest()[:16]


def _task_name(train_file: str) -> str:
    """A readable name for the run folder: the training file's stem (`reviews.csv` -> reviews), or the hub name."""
    if file_format(train_file) is None:
        return train_file.replace("/", "_").replace(":", "_")
    stem = Path(train_file).stem
    return stem if stem not in ("train", "data") else Path(train_file).resolve().parent.name or stem


__all__ = ["TextDataModule", "cache_key", "tokenizer_identity", "load_or_build"]
