"""GLUE data for UniPELT: the eight tasks, the paper's few-shot protocol, local files or the hub."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from datamodules.errors import DataConfigError
from datamodules.tasks import GLUE_TASKS, TaskInfo, get_task

if TYPE_CHECKING:
    from datamodules.glue import GLUEDataModule

__all__ = ["DataConfigError", "GLUEDataModule", "GLUE_TASKS", "TaskInfo", "get_task"]


def __getattr__(name: str) -> Any:
    """GLUEDataModule pulls in Lightning and transformers: import it on first use (keeps tasks light)."""
    if name == "GLUEDataModule":
        from datamodules.glue import GLUEDataModule

        return GLUEDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
