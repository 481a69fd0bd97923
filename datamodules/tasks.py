"""The tasks UniPELT trains on, in one table: GLUE's eight (fields, labels, the paper's metrics, the
leaderboard's file names) and, built from a user's files, any text classification or regression task."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from datamodules.errors import DataConfigError

# The paper selects checkpoints on, and reports, the first metric of this list that a task has.
METRIC_PRIORITY = ("f1", "matthews", "spearman", "f1_macro", "accuracy")
# A task read from the user's own files is scored with these (the first is its main metric after the priority).
CUSTOM_METRICS = {"classification": ("accuracy", "f1_macro"), "regression": ("pearson", "spearman")}


@dataclass(frozen=True)
class TaskInfo:
    """What the rest of the project needs to know about a task; `name` is also its hub config name."""

    name: str
    glue_dir: str
    text_fields: tuple[str, ...]
    num_labels: int
    is_regression: bool
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    test_splits: tuple[str, ...]
    # GLUE's leaderboard: one file per unlabeled test split (test_matched -> MNLI-m), labels written as ids
    # (CoLA, SST-2, MRPC, QQP) or names (MNLI, QNLI, RTE). Empty for a task of the user's own files.
    submission_files: tuple[str, ...] = ()
    submission_label_ids: bool = False
    is_glue: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, str, numbers): what a checkpoint records and `task_from` reads back."""
        return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(self) for v in [getattr(self, f.name)]}


def _task(
    name: str,
    glue_dir: str,
    text_fields: tuple[str, ...],
    label_names: tuple[str, ...],
    metrics: tuple[str, ...],
    test_splits: tuple[str, ...] = ("test",),
    submission_files: tuple[str, ...] | None = None,
    submission_label_ids: bool = False,
) -> TaskInfo:
    main = next(m for m in METRIC_PRIORITY if m in metrics)
    regression = not label_names
    return TaskInfo(
        name=name,
        glue_dir=glue_dir,
        text_fields=text_fields,
        num_labels=1 if regression else len(label_names),
        is_regression=regression,
        label_names=label_names,
        metrics=metrics,
        main_metric=main,
        test_splits=test_splits,
        submission_files=submission_files or (glue_dir,),
        submission_label_ids=submission_label_ids,
    )


# Field names and label order are those of the hub's `nyu-mll/glue`, so both sources agree.
GLUE_TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        _task("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews",), submission_label_ids=True),
        _task("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",), submission_label_ids=True),
        _task(
            "mrpc",
            "MRPC",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
            submission_label_ids=True,
        ),
        _task("stsb", "STS-B", ("sentence1", "sentence2"), (), ("pearson", "spearman")),
        _task(
            "qqp",
            "QQP",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            ("accuracy", "f1"),
            submission_label_ids=True,
        ),
        _task(
            "mnli",
            "MNLI",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            test_splits=("test_matched", "test_mismatched"),
            submission_files=("MNLI-m", "MNLI-mm"),
        ),
        _task("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
        _task("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    )
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str) -> TaskInfo:
    """Look a task up by hub name or GLUE folder name, case-insensitively ("SST-2", "sst2", "STS-B")."""
    key = _normalise(str(name))
    for task in GLUE_TASKS.values():
        if key in (task.name, _normalise(task.glue_dir)):
            return task
    raise DataConfigError(f"task={name!r} is not a GLUE task here; choose one of: {', '.join(GLUE_TASKS)}")


def custom_task(
    name: str, text_fields: tuple[str, ...], label_names: tuple[str, ...], regression: bool
) -> TaskInfo:
    """A task read from the user's files: accuracy + macro-F1, or Pearson + Spearman for a regression."""
    metrics = CUSTOM_METRICS["regression" if regression else "classification"]
    return TaskInfo(
        name=name,
        glue_dir="",
        text_fields=tuple(text_fields),
        num_labels=1 if regression else len(label_names),
        is_regression=regression,
        label_names=() if regression else tuple(label_names),
        metrics=metrics,
        main_metric=next(m for m in METRIC_PRIORITY if m in metrics),
        test_splits=("test",),
        is_glue=False,
    )


def task_from(value: str | dict[str, Any] | TaskInfo) -> TaskInfo:
    """A GLUE task name, or a task's `to_dict()` (what the data module hands the model and checkpoints keep)."""
    if isinstance(value, TaskInfo):
        return value
    if isinstance(value, str):
        return get_task(value)
    if isinstance(value, dict):
        if value.get("is_glue", False):
            return get_task(str(value.get("name")))
        known = {f.name for f in fields(TaskInfo)}
        try:
            return TaskInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items() if k in known})
        except TypeError as err:
            raise DataConfigError(f"task={value!r}: not a task description ({err})") from None
    raise DataConfigError(f"task={value!r}: give a GLUE task name ({', '.join(GLUE_TASKS)}) or a task description")
