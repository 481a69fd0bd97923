"""The two kinds of run, classification and instruction tuning, and the one rule that picks a command line's.

A `RunKind` is what differs between them: the LightningModule and data module, and how the CLI links
their options. Everything else (lightning_modules/run.py) is shared.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml

from datamodules import TextDataModule
from datamodules.files import task_name_of
from datamodules.instruct import InstructionDataModule
from datamodules.multitask import MultiTaskDataModule
from lightning_modules.causal_lm import TASK as INSTRUCTION_TASK
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.checkpointing import CHECKPOINT_KEY, load_checkpoint_file
from lightning_modules.errors import CheckpointFileError
from lightning_modules.multitask_module import MultiTaskModule
from lightning_modules.unipelt_module import UniPELTLightningModule

SPECIAL_CKPT = ("last", "best", "hpc", "registry")  # `ckpt_path` values Lightning resolves itself

__all__ = ["CLASSIFICATION", "INSTRUCTION", "MULTITASK", "RunKind", "SPECIAL_CKPT", "choose_kind", "option_value"]


def _task_for_model(dm: Any) -> str | dict[str, Any]:
    """What the data module tells the classifier: a GLUE task's name, or your task's full description."""
    return dm.task_info.name if dm.task_info.is_glue else dm.task_info.to_dict()


def _tasks_for_model(dm: Any) -> list[str | dict[str, Any]]:
    """A multi-task data module's tasks, each as `_task_for_model` gives one."""
    return [t.name if t.is_glue else t.to_dict() for t in dm.task_infos]


def _multitask_folder(config: Any) -> str:
    """The run folder's task of a multi-task run: its tasks' names joined by "+" (sst2+rte)."""
    names = []
    for task in config.data.tasks or []:
        if isinstance(task, str):
            names.append(task.lower().replace("-", ""))
        else:
            task = dict(task)
            names.append(str(task.get("task") or task.get("name") or task_name_of(str(task.get("train_file")))))
    return "+".join(names) or "multitask"


def _classification_task(config: Any) -> str:
    """The run folder's task: the GLUE task, else --data.name, else the training file's name."""
    if config.data.task is not None:
        return str(config.data.task).lower().replace("-", "")
    return config.data.name or (task_name_of(config.data.train_file) if config.data.train_file else "custom")


# Settings a resumed `fit` may change: they do not change what is trained (where files are, how fast it is
# read, what `predict` does later; the backbone is checked by its fingerprint, not by its path).
FREE_ON_RESUME = frozenset({
    "model.model_name_or_path", "model.checkpoint_every_n_steps", "data.model_name_or_path", "data.eval_batch_size",
    "data.num_workers", "data.cache_dir", "data.predict_file", "data.test_file",
})


@dataclass(frozen=True)
class RunKind:
    """What differs between a classification and an instruction run: the classes, how they are linked, which of
    their options name where we write (never taken from a checkpoint: a file a user was sent must not choose
    where we write) and which a resumed run may change."""

    name: str
    module: type[pl.LightningModule]
    datamodule: type[pl.LightningDataModule]
    folder_task: Callable[[Any], str]  # config -> the task part of the default run folder
    links: tuple[dict[str, Any], ...] = field(default=())  # parser.link_arguments(**link), besides the backbone
    writes: frozenset[str] = frozenset({"data.cache_dir"})  # options naming a destination
    free_on_resume: frozenset[str] = FREE_ON_RESUME

    @property
    def options(self) -> frozenset[str]:
        """`--model.*` and `--data.*`: the classes' arguments."""
        return frozenset(
            f"--{section}.{name}"
            for section, cls in (("model", self.module), ("data", self.datamodule))
            for name in inspect.signature(cls).parameters
        )

    @property
    def link_targets(self) -> frozenset[str]:
        return frozenset({"data.model_name_or_path", *(link["target"] for link in self.links)})


CLASSIFICATION = RunKind(
    "classification", UniPELTLightningModule, TextDataModule, _classification_task,
    links=({"source": "data", "target": "model.task", "compute_fn": _task_for_model, "apply_on": "instantiate"},),
)
MULTITASK = RunKind(
    "multitask", MultiTaskModule, MultiTaskDataModule, _multitask_folder,
    links=({"source": "data", "target": "model.tasks", "compute_fn": _tasks_for_model, "apply_on": "instantiate"},),
)
INSTRUCTION = RunKind(
    INSTRUCTION_TASK, CausalLMModule, InstructionDataModule, lambda config: INSTRUCTION_TASK,
    links=({"source": "model.gguf_file", "target": "data.gguf_file"},),
    writes=frozenset({"data.cache_dir", "model.predict_output"}),
    free_on_resume=FREE_ON_RESUME | {"model.predict_output", "model.max_new_tokens", "model.do_sample",
                                     "model.generation_kwargs", "model.gguf_file", "data.gguf_file"},
)


def choose_kind(argv: list[str]) -> RunKind:
    """The one rule. A `--ckpt_path` file says what it was trained for (its recorded task, or tasks); without
    one, a command line or `--config` file naming an option only instruction runs have (e.g.
    `--data.prompt_field`, `--model.max_new_tokens`) is an instruction run, one naming an option only
    multi-task runs have (`--data.tasks`, ...) a multi-task run, anything else classification."""
    ckpt = option_value(argv, "--ckpt_path")
    if ckpt and ckpt not in SPECIAL_CKPT and Path(ckpt).is_file():
        try:
            saved = load_checkpoint_file(ckpt, mmap=True)[CHECKPOINT_KEY]
        except CheckpointFileError:
            return CLASSIFICATION  # the CLI refuses the file in one line
        if saved.get("tasks") is not None:
            return MULTITASK
        return INSTRUCTION if saved.get("task") == INSTRUCTION_TASK else CLASSIFICATION
    named = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    for path in option_values(argv, "--config", "-c"):
        try:
            config = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # the parser reports an unreadable config
        if isinstance(config, dict):
            named |= {f"--{section}.{key}" for section in ("model", "data")
                      if isinstance(config.get(section), dict) for key in config[section]}
    if named & (INSTRUCTION.options - CLASSIFICATION.options):
        return INSTRUCTION
    return MULTITASK if named & (MULTITASK.options - CLASSIFICATION.options) else CLASSIFICATION


def option_values(argv: list[str], *names: str) -> list[str]:
    """Every value given to one of ``names`` (`--name value` or `--name=value`), before the parser exists."""
    values = []
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.split("=", 1)[0] in names and "=" in arg:
            values.append(arg.split("=", 1)[1])
    return values


def option_value(argv: list[str], name: str) -> str | None:
    values = option_values(argv, name)
    return values[-1] if values else None
