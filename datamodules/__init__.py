"""Data for UniPELT: the eight GLUE tasks or your own files, the paper's few-shot protocol, rows to predict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from datamodules.errors import DataConfigError
from datamodules.hub import HubUnreachableError
from datamodules.tasks import GLUE_TASKS, TaskInfo, custom_task, get_task, task_from

if TYPE_CHECKING:
    from datamodules.files import task_name_of
    from datamodules.multitask import MultiTaskDataModule
    from datamodules.text import GLUEDataModule, TextDataModule

__all__ = [
    "DataConfigError",
    "GLUEDataModule",
    "GLUE_TASKS",
    "HubUnreachableError",
    "MultiTaskDataModule",
    "TaskInfo",
    "TextDataModule",
    "custom_task",
    "get_task",
    "task_from",
    "task_name_of",
]


def __getattr__(name: str) -> Any:
    """The data modules pull in Lightning and transformers: import them on first use (keeps tasks light)."""
    if name in ("GLUEDataModule", "TextDataModule"):
        from datamodules import text

        return getattr(text, name)
    if name == "MultiTaskDataModule":
        from datamodules.multitask import MultiTaskDataModule

        return MultiTaskDataModule
    if name == "task_name_of":
        from datamodules.files import task_name_of

        return task_name_of
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
