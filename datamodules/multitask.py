"""MultiTaskDataModule: several GLUE tasks and/or your own files in one run (`--data.tasks`).

Each task is read by its own `TextDataModule` (a *member*) with the run's shared settings (backbone, data
folder, K, split seed, dev size, lengths, batch sizes, cache), so each task's split is exactly the one a
single-task run draws with the same settings: the same rows, in the same order. Training batches hold one
task each, in the order `task_sampler.TaskBatchSampler` draws; validation, test and predict keep one loader
per task (and per test split), in the order of `eval_plan`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from datamodules.errors import DataConfigError
from datamodules.resumable import ResumableDataLoader
from datamodules.task_sampler import EpochCounter, TaskBatchSampler, TaskRows, check_sampling
from datamodules.tasks import GLUE_TASKS, TaskInfo
from datamodules.text import Collate, TextDataModule

# What a task given as a mapping may set: the file options of `TextDataModule`, or a GLUE task; and its own K.
TASK_OPTIONS = ("task", "train_file", "validation_file", "test_file", "text_fields", "label_field", "labels",
                "regression", "name", "k_shot")


def task_specs(tasks: Any) -> list[dict[str, Any]]:
    """``--data.tasks`` as one `TextDataModule` keyword set per task: a GLUE name, or a mapping of file options."""
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise DataConfigError(f"tasks={tasks!r}: give a list of tasks, e.g. '[sst2, rte]' (GLUE names, or mappings "
                              f"of your files' options: {{name: reviews, train_file: reviews.csv}})")
    specs = []
    for entry in tasks:
        if isinstance(entry, str):
            specs.append({"task": entry})
        elif isinstance(entry, Mapping):
            unknown = [k for k in entry if k not in TASK_OPTIONS]
            if unknown:
                raise DataConfigError(f"tasks={_shown(tasks)}: {unknown[0]!r} is not a task option; a task's "
                                      f"mapping takes {', '.join(TASK_OPTIONS)}")
            specs.append(dict(entry))
        else:
            raise DataConfigError(f"tasks={_shown(tasks)}: {entry!r} is neither a GLUE task name "
                                  f"({', '.join(GLUE_TASKS)}) nor a mapping of file options")
    return specs


def predict_tasks(tasks: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
    """The tasks a multi-task checkpoint records (GLUE names, or `TaskInfo.to_dict()` of your files') as
    ``--data.tasks`` for `predict`: your tasks by name, labels and text fields, without their files."""
    specs: list[str | dict[str, Any]] = []
    for task in tasks:
        if isinstance(task, str) or task.get("is_glue", False):
            specs.append(task if isinstance(task, str) else str(task["name"]))
        else:
            specs.append({"name": task["name"], "labels": list(task["label_names"]) or None,
                          "regression": bool(task["is_regression"]), "text_fields": list(task["text_fields"])})
    return specs


def build_members(specs: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, TextDataModule]:
    """One `TextDataModule` per task, by name; a name given twice is refused, naming how the two differ.

    A module-level function on purpose: Lightning's `save_hyperparameters` in each member walks up the
    calling `__init__` frames, and would take the multi-task module's arguments for the member's own."""
    members: dict[str, TextDataModule] = {}
    for spec in specs:
        try:
            member = TextDataModule(**{**shared, **spec})
        except DataConfigError as err:
            raise DataConfigError(f"tasks={_shown(specs)}: {err}") from None
        name = member.task_info.name
        if name in members:
            raise DataConfigError(f"tasks={_shown(specs)}: {_twice(members[name].task_info, member.task_info)}")
        members[name] = member
    return members


def _shown(tasks: Any) -> list[Any]:
    """The task list as an error names it: each task by its GLUE name, its name or its training file."""
    return [(t.get("task") or t.get("name") or t.get("train_file") or dict(t)) if isinstance(t, Mapping) else t
            for t in tasks]


def _twice(first: TaskInfo, second: TaskInfo) -> str:
    differ = [f"{what} {a} and {b}" for what, a, b in (
        ("labels", list(first.label_names) or "(a regression)", list(second.label_names) or "(a regression)"),
        ("text fields", list(first.text_fields), list(second.text_fields))) if a != b]
    return (f"task {first.name!r} is given twice" + (f", with {'; '.join(differ)}" if differ else "")
            + "; give each task once, and your own files a name of their own (name: ...)")


class MultiTaskDataModule(pl.LightningDataModule):
    """Several tasks in one run: GLUE tasks and/or your own labelled files, each split as a single-task run splits it.

    Args:
        tasks: the tasks, e.g. ``[sst2, rte]``; a task of your own files is a mapping of `TextDataModule`'s file
            options (``{name: reviews, train_file: reviews.csv, text_fields: [review], label_field: stars}``);
            a mapping may also set its own ``k_shot`` (``{task: sst2, k_shot: 1000}``).
        task: one of the tasks for `validate`, `test` and `predict` alone (`predict` with a predict_file needs it);
            unset: every task.
        sampling: which task each training step draws: proportional (every task's batches once per epoch, shuffled)
            or temperature (each step's task drawn with probability proportional to n_t^(1/temperature)).
        temperature: the temperature of temperature sampling (1: proportional in expectation; larger: flatter).
        predict_file: rows to predict with the head of `task`; unset: GLUE's unlabeled test split(s) of each task.
        model_name_or_path: the tokenizer's model (linked from --model.model_name_or_path by the CLI).
        data_dir: a local GLUE folder (RTE/train.tsv, ...); unset: the hub.
        k_shot: K training examples of every task (the first K after shuffling by `seed`); unset: all of them.
        seed: the split seed: which K examples and which dev rows are drawn (not the training seed).
        dev_size: dev rows drawn after the K training rows of each task (when it has no validation file).
        max_seq_length: longest input in tokens (longer ones are truncated).
        batch_size: training batch size (every batch holds one task's rows).
        eval_batch_size: batch size for validation, test and predict.
        num_workers: DataLoader worker processes (0: load in the main process).
        cache_dir: where tokenised splits are kept; unset: $UNIPELT_CACHE/glue or ~/.cache/unipelt/glue.
    """

    def __init__(
        self,
        tasks: list[str | dict[str, Any]] | None = None,
        task: str | None = None,
        sampling: str = "proportional",
        temperature: float = 2.0,
        predict_file: str | None = None,
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
        # Kept in checkpoints (a test from one reads the files from them), not merged into the logged hparams:
        # the model's `tasks` are the tasks as read (labels, fields), not the options that name their files.
        self.save_hyperparameters(logger=False)
        check_sampling(sampling, temperature)
        shared = dict(model_name_or_path=model_name_or_path, data_dir=data_dir, k_shot=k_shot, seed=seed,
                      dev_size=dev_size, max_seq_length=max_seq_length, batch_size=batch_size,
                      eval_batch_size=eval_batch_size, num_workers=num_workers, cache_dir=cache_dir)
        self.members = build_members(task_specs(tasks), shared)
        names = list(self.members)
        if task is not None and task not in names:
            raise DataConfigError(f"task={task!r} is not one of --data.tasks: {', '.join(names)}")
        self.task, self.predict_file = task, predict_file
        if task is not None:
            self.members[task].predict_file = predict_file  # its head scores the file
        self.sampling, self.temperature, self.batch_size = sampling, temperature, batch_size
        self.num_workers = num_workers
        self.stage: str | None = None  # set by the CLI before prepare_data, while no trainer is attached

    # ------------------------------------------------------------------------------ tasks
    @property
    def task_infos(self) -> list[TaskInfo]:
        """Every task, in the model's order (its heads and gates)."""
        return [m.task_info for m in self.members.values()]

    @property
    def cache_dir(self) -> Path:
        """Where every task's tokenised splits are kept (the members share the run's `cache_dir`)."""
        return next(iter(self.members.values())).cache_dir

    @property
    def tokenizer(self) -> Any:
        """One tokenizer for every task (the members share it)."""
        first, *others = self.members.values()
        for member in others:
            member._tokenizer = first.tokenizer
        return first.tokenizer

    def _stage(self) -> str | None:
        trainer = self._trainer if hasattr(self, "_trainer") else None
        if trainer is not None and trainer.state.fn is not None:
            return str(trainer.state.fn.value)
        return self.stage

    def _active(self, stage: str | None) -> dict[str, TextDataModule]:
        """The members a stage reads: every task for fit; `task` alone, when given, for the others."""
        if stage != "fit" and self.task is not None:
            return {self.task: self.members[self.task]}
        if stage == "predict" and self.predict_file is not None:
            raise DataConfigError(f"task=None: --data.predict_file is scored by one task's head; give --data.task "
                                  f"(one of {', '.join(self.members)})")
        return self.members

    def eval_plan(self, loaders: str) -> list[tuple[str, str]]:
        """(task, split) of each ``"validation"``, ``"test"`` or ``"predict"`` loader, in the loaders' order."""
        members = self._active(self._stage())
        if loaders == "validation":
            return [(name, "validation") for name in members]
        if loaders == "test":
            return [(name, split) for name, m in members.items() for split in m.task_info.test_splits]
        return [(name, split) for name, m in members.items() for split in m.predict_splits]

    # ------------------------------------------------------------------------------ stages
    def prepare_data(self) -> None:
        """Runs once per node: each task's member tokenises (into the disk cache) what this stage uses."""
        stage = self._stage()
        self.tokenizer  # noqa: B018 - one tokenizer for every member
        for member in self._active(stage).values():
            member.stage = stage
            member.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.tokenizer  # noqa: B018
        for member in self._active(stage).values():
            member.setup(stage)

    # ------------------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        rows = TaskRows([m._split("train") for m in self.members.values()])
        # Batch order belongs to the training seed, as in a single-task run (TextDataModule.train_dataloader).
        batches = TaskBatchSampler(EpochCounter(rows), self.batch_size, sizes=[len(d) for d in rows.datasets],
                                   seed=torch.initial_seed(), sampling=self.sampling, temperature=self.temperature)
        collate = TaskCollate(self.tokenizer, list(self.members))
        return ResumableDataLoader(rows, batch_sampler=batches, collate_fn=collate, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> list[DataLoader]:
        return [self.members[name]._eval_loader(split) for name, split in self.eval_plan("validation")]

    def test_dataloader(self) -> list[DataLoader]:
        return [self.members[name]._eval_loader(split) for name, split in self.eval_plan("test")]

    def predict_dataloader(self) -> list[DataLoader]:
        return [self.members[name]._eval_loader(split) for name, split in self.eval_plan("predict")]


class TaskCollate(Collate):
    """Pads a batch of one task's rows and names the task: ``batch["task"]``."""

    def __init__(self, tokenizer: Any, names: list[str]) -> None:
        super().__init__(tokenizer)
        self.names = names

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        (task,) = {row.pop("task") for row in rows}
        return {**super().__call__(rows), "task": self.names[task]}
