"""TextDataModule: a GLUE task or your own files, the paper's few-shot splits, the rows to predict, for the CLI.

The data module owns what every task shares: the tokenizer, the disk cache of tokenised splits, the
stages and the loaders. Where the rows come from is its source: `GLUESource` (a GLUE task, the
paper's splits) or `FileSource` (your files; the task read from them). A source gives its labelled
splits (`splits()`), what identifies the raw data (`fingerprint`) and the rows `predict` scores when
there is no predict file (`unlabeled()`); it reads rows and knows nothing of tokenisation.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from datamodules.cache import cache_key, default_cache_dir, load_or_build, tokenize, tokenizer_identity
from datamodules.custom import FileSource
from datamodules.errors import DataConfigError, check_integers
from datamodules.files import Table, read_table, to_dataset
from datamodules.glue import PREDICT_PREFIX, GLUESource
from datamodules.hub import load_tokenizer
from datamodules.resumable import ResumableDataLoader
from datamodules.samplers import EpochSeededRandomSampler, data_loader, eval_sampler
from datamodules.splits import FewShot, Split
from datamodules.tasks import TaskInfo


class TextSource(Protocol):
    """Where a text task's rows come from (`GLUESource`, `FileSource`)."""

    task: TaskInfo
    cache_folder: str  # the cache's subfolder for this source's splits
    test_is_validation: bool  # the test after fit scores the validation rows (no test data)

    def splits(self) -> dict[str, Split]: ...  # "train", "validation" and each of task.test_splits

    def fingerprint(self, split: str) -> str: ...  # identifies the raw rows of a source split

    def unlabeled(self) -> dict[str, tuple[str, Callable[[], Dataset]]]: ...  # {split: (output name, rows)}


class Collate:
    """Pads each batch to its longest row and returns a plain dict (picklable for worker processes)."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.pad(rows))


class TextDataModule(pl.LightningDataModule):
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
        super().__init__()
        # Lightning merges these with the model's hparams, whose `task` is the task read from the files.
        self.save_hyperparameters(ignore=["task"] if task is None else [])
        check_integers(k_shot=(k_shot, 1), seed=(seed, 0), dev_size=(dev_size, 1), max_seq_length=(max_seq_length, 8),
                       batch_size=(batch_size, 1), eval_batch_size=(eval_batch_size, 1),
                       num_workers=(num_workers, 0))  # fmt: skip
        few_shot = FewShot(k_shot, seed, dev_size)
        self.source: TextSource
        if task is not None and train_file is not None:
            raise DataConfigError(
                f"task={task!r} and train_file={train_file!r}: give one (a GLUE task, or your own files)"
            )
        if task is not None:
            self.source = GLUESource(task, data_dir, few_shot)
        elif train_file is None and not labels and regression is not True:
            raise DataConfigError(
                "task=None: give --data.task (a GLUE task) or --data.train_file (your own labelled data)"
            )
        else:
            files = {"train": train_file, "validation": validation_file, "test": test_file}
            self.source = FileSource(files, text_fields, label_field, labels, regression, name, few_shot)
        self.task_info: TaskInfo = self.source.task
        self.num_labels: int = self.task_info.num_labels
        self.model_name_or_path, self.predict_file = model_name_or_path, predict_file
        self.max_seq_length, self.batch_size, self.eval_batch_size = max_seq_length, batch_size, eval_batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.stage: str | None = None  # set by the CLI before prepare_data, while no trainer is attached
        self._tokenizer: Any = None
        self.datasets: dict[str, Dataset] = {}

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_name_or_path, use_fast=True)
        return self._tokenizer

    @property
    def split_names(self) -> tuple[str, ...]:
        return ("train", "validation", *self.task_info.test_splits)

    @property
    def test_is_validation(self) -> bool:
        return self.source.test_is_validation

    # ------------------------------------------------------------------------------ stages
    def _stage(self) -> str | None:
        trainer = self._trainer if hasattr(self, "_trainer") else None
        if trainer is not None and trainer.state.fn is not None:
            return str(trainer.state.fn.value)
        return self.stage

    def _stage_splits(self, stage: str | None, prepare: bool) -> tuple[str, ...]:
        """The splits a stage uses; `fit` ends with a test of the best checkpoint, so it prepares the tests too."""
        tests = self.task_info.test_splits
        fit = ("train", "validation", *tests) if prepare else ("train", "validation")
        stages = {"fit": fit, "validate": ("validation",), "test": tests, "predict": ()}
        return stages.get(stage or "", self.split_names)

    def prepare_data(self) -> None:
        """Runs once per node: tokenises (into the disk cache) only what this stage uses."""
        stage = self._stage()
        self._load(self._stage_splits(stage, prepare=True))
        if stage == "predict":
            self.predict_splits  # noqa: B018 - raises for a task of your own files without predict_file

    def setup(self, stage: str | None = None) -> None:
        """Cheap: memory-maps the cached splits this stage needs (building any that are missing)."""
        if stage == "predict":
            for name, (output, rows) in self._predict_sets().items():
                self.datasets[name] = self._tokenized_once(rows(), f"to predict ({output})")
            return
        self.datasets.update(self._load(self._stage_splits(stage, prepare=False)))

    # ------------------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        data = self._split("train")
        # Batch order belongs to the training seed (`seed_everything` sets torch's initial seed), as in
        # the authors' code; the split seed only picks the examples. The order is a pure function of
        # (training seed, epoch), see EpochSeededRandomSampler, and a run resumed mid-epoch gets exactly
        # the batches it had not trained on (resumable.py).
        sampler = EpochSeededRandomSampler(data, seed=torch.initial_seed())
        return data_loader(data, self.batch_size, sampler, Collate(self.tokenizer), self.num_workers,
                           ResumableDataLoader)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return _one_or_all([self._eval_loader(name) for name in self.task_info.test_splits])

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        return _one_or_all([self._eval_loader(name) for name in self.predict_splits])

    def _eval_loader(self, name: str) -> DataLoader:
        data = self._split(name)
        sampler = eval_sampler(data, [len(ids) for ids in data["input_ids"]])
        return data_loader(data, self.eval_batch_size, sampler, Collate(self.tokenizer), self.num_workers)

    def _split(self, name: str) -> Dataset:
        if name not in self.datasets:
            raise RuntimeError(f"the {name} split is not loaded: call setup() for its stage first")
        return self.datasets[name]

    # ------------------------------------------------------------------------------ rows to predict
    @property
    def predict_splits(self) -> dict[str, str]:
        """{split name: what the outputs are called}: the predict file, or GLUE's leaderboard files."""
        return {name: output for name, (output, _) in self._predict_sets().items()}

    def _predict_sets(self) -> dict[str, tuple[str, Callable[[], Dataset]]]:
        if self.predict_file is None:
            return self.source.unlabeled()
        rows = partial(self._predict_file_rows, self.predict_file)
        return {PREDICT_PREFIX + "file": (Path(self.predict_file).stem, rows)}

    def _predict_file_rows(self, path: str) -> Dataset:
        return to_dataset(read_table(path, "--data.predict_file"), self.task_info.text_fields, None)

    def predict_table(self) -> Table:
        """The predict file's own columns, to write back beside the predictions."""
        assert self.predict_file is not None
        return read_table(self.predict_file, "--data.predict_file")

    # ------------------------------------------------------------------------------ tokenising
    def _tokenized_once(self, raw: Dataset, split: str) -> Dataset:
        """Rows to predict with `idx` (their position, or GLUE's index); not cached (one-off files)."""
        fingerprint = "predict-" + uuid.uuid4().hex  # in memory only: nothing to find again
        return tokenize(raw, self.tokenizer, self.task_info, self.max_seq_length, fingerprint, split)

    def _load(self, names: tuple[str, ...]) -> dict[str, Dataset]:
        """Each split from the disk cache, tokenising only the rows it uses when it is not there yet."""
        if not names:
            return {}
        task, plan, tokenizer = self.task_info, self.source.splits(), self.tokenizer
        loaded = {}
        for name in names:
            split = plan[name]
            key = cache_key(
                task=task.name,
                rows=split.rows,
                source=self.source.fingerprint(split.rows["split"]),
                tokenizer=tokenizer_identity(tokenizer),
                max_seq_length=self.max_seq_length,
            )
            path = self.cache_dir / self.source.cache_folder / f"{split.label}-{key}"
            loaded[name] = load_or_build(
                path, lambda s=split, k=key, n=name: tokenize(s.build(), tokenizer, task, self.max_seq_length, k, n)
            )
        return loaded




def _one_or_all(loaders: list[DataLoader]) -> DataLoader | list[DataLoader]:
    return loaders[0] if len(loaders) == 1 else loaders


def GLUEDataModule(task: str = "rte", model_name_or_path: str = "bert-base-uncased", **settings: Any) -> TextDataModule:
    """A GLUE task's data module (the name README and docs/data.md give users): `TextDataModule(task=...)` with
    the same settings (data_dir, k_shot, seed, dev_size, ...), its local files checked at once (a missing file,
    K + dev_size over the rows of train) rather than when a stage loads them."""
    dm = TextDataModule(task=task, model_name_or_path=model_name_or_path, **settings)
    assert isinstance(dm.source, GLUESource)
    dm.source.check_files()
    return dm


__all__ = ["Collate", "GLUEDataModule", "TextDataModule", "TextSource"]
