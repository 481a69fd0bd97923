"""The eight GLUE tasks UniPELT uses: fields, labels and the paper's metrics, in one table."""

from __future__ import annotations

from dataclasses import dataclass

from datamodules.errors import DataConfigError

# The paper selects checkpoints on, and reports, the first metric of this list that a task has.
METRIC_PRIORITY = ("f1", "matthews", "spearman", "accuracy")


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


def _task(
    name: str,
    glue_dir: str,
    text_fields: tuple[str, ...],
    label_names: tuple[str, ...],
    metrics: tuple[str, ...],
    test_splits: tuple[str, ...] = ("test",),
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
    )


# Field names and label order are those of the hub's `nyu-mll/glue`, so both sources agree.
GLUE_TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        _task("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews",)),
        _task("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",)),
        _task("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1")),
        _task("stsb", "STS-B", ("sentence1", "sentence2"), (), ("pearson", "spearman")),
        _task("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
        _task(
            "mnli",
            "MNLI",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            test_splits=("test_matched", "test_mismatched"),
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
