"""Multi-task UniPELT: one backbone and one set of submodules shared by several tasks, each with its own
head and its own gates (``PELTConfig.tasks``; docs/method.md#multi-task).

A multi-task model is called with the task of its batch, ``model(**batch, task="rte")``: ``TaskForward``
(the model's forward) puts the task's index on ``context.TASKS`` for that forward, the base model's
context takes it (``ForwardContext.task``), and every ``TaskGateBank`` and the ``TaskHeads`` read it.
Gates are either one shared bank whose gates add a learned per-task bias, a task embedding of the bank's
size (``task_gates="embedding"``, the default: chosen on dev), or a gate bank per task (``"bank"``: per
task its own ``Linear(hidden, n)``). Either way one task of the model *is* a plain single-task model: the
shared weights, that task's gates as a ``GateBank`` and its head as the ``pelt_head``; ``task_export``
renames a saved model's weights to it (``save_pretrained(model, path, task=...)``, ``from_pretrained(path, task=...)``).

Parameters of the other tasks take no gradient in a step (their grad stays None, so AdamW leaves them
untouched); under DDP that needs ``find_unused_parameters=True``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from . import context
from .backbones import BackboneSpec
from .config import TASK_GATES, PELTConfig
from .errors import PELTError
from .gates import GateBank
from .heads import HEAD_ATTR, HeadForward, PoolingHead, install_head, pooling_head, replace_own_head


def task_index(tasks: Sequence[str], task: Any) -> int:
    """The position of ``task`` (a name) in a model's tasks; one line naming them otherwise."""
    if isinstance(task, str) and task in tasks:
        return list(tasks).index(task)
    if task is None:
        raise PELTError(f"task=None: this model serves several tasks ({', '.join(tasks)}); call it with "
                        f"task=<one of them>")
    raise PELTError(f"task={task!r} is not one of this model's tasks: {', '.join(tasks)}")


def current_task() -> int:
    task = context.current().task
    if task is None:
        raise PELTError("a multi-task model's gates were run without a task: call the model with task=<name>")
    return task


class TaskGateBank(GateBank):
    """The gates of one layer and input site for every task: per task its own ``Linear(hidden, n)``
    (``proj[t]``), or (``shared``) one ``Linear(hidden, n)`` without bias plus a learned bias per task."""

    def __init__(self, hidden: int, keys: list[str], layer: int, init_std: float, tasks: int, shared: bool) -> None:
        nn.Module.__init__(self)  # GateBank's own Linear is replaced by the tasks' (below)
        self.keys, self.layer, self.shared = tuple(keys), layer, shared
        n = len(self.keys)
        if shared:
            self.proj = nn.Linear(hidden, n, bias=False)
            nn.init.normal_(self.proj.weight, std=init_std)
            self.task_bias = nn.ParameterList(nn.Parameter(torch.zeros(n)) for _ in range(tasks))
        else:
            self.proj = nn.ModuleList(nn.Linear(hidden, n) for _ in range(tasks))
            for linear in self.proj:
                nn.init.normal_(linear.weight, std=init_std)
                nn.init.zeros_(linear.bias)

    def linear(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        task = current_task()
        if self.shared:
            return self.proj.weight, self.task_bias[task]
        return self.proj[task].weight, self.proj[task].bias

    def hold(self, fixed: Mapping[str, float]) -> None:
        raise PELTError("a multi-task model's gates cannot be fixed: take one task's model first "
                        "(unipelt.from_pretrained(folder, task=...))")


def gate_bank_factory(config: PELTConfig) -> Any:
    """What ``GateRequests`` builds each bank with in a model of ``config.tasks``."""
    tasks, shared = len(config.tasks), config.task_gates == "embedding"

    def make(hidden: int, keys: list[str], layer: int, init_std: float) -> TaskGateBank:
        return TaskGateBank(hidden, keys, layer, init_std, tasks, shared)

    return make


class TaskHeads(nn.Module):
    """One pooling head per task (``heads[t]``); the running forward's task chooses."""

    def __init__(self, heads: list[PoolingHead], labels: Sequence[Sequence[str]]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        # What transformers' loss reads, per task: a regression (MSE) or a classification (cross-entropy).
        self.loss_configs = [SimpleNamespace(num_labels=max(1, len(names)),
                                             problem_type="single_label_classification" if names else "regression")
                             for names in labels]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.heads[context.TASKS.top()[1]](hidden, mask)


class TaskForward(HeadForward):
    """``model.forward`` of a multi-task model: ``task=<name>`` chooses the gates and the head of the batch."""

    def __init__(self, inner: Any, tasks: tuple[str, ...]) -> None:
        super().__init__(inner)
        self.tasks = tasks
        params = list(self.__signature__.parameters.values())
        keyword = inspect.Parameter("task", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        self.__signature__ = self.__signature__.replace(parameters=[*params[:at], keyword, *params[at:]])

    def __call__(self, *args: Any, task: str | None = None, **kwargs: Any) -> Any:
        index = task_index(self.tasks, task)
        context.TASKS.push((id(self.inner.__self__.base_model), index))
        try:
            return super().__call__(*args, **kwargs)
        finally:
            context.TASKS.pop()

    def loss_config(self, model: nn.Module) -> Any:
        return getattr(model, HEAD_ATTR).loss_configs[context.TASKS.top()[1]]


def attach_task_heads(model: nn.Module, spec: BackboneSpec, config: PELTConfig) -> None:
    """Per task a ``config.head`` pooling head with its own outputs, in place of the model's own head."""
    replace_own_head(model, spec)
    labels = list(config.tasks.values())
    heads = [pooling_head(model, spec, config.head, max(1, len(names)), config.init_std) for names in labels]
    install_head(model, TaskHeads(heads, labels), TaskForward, tuple(config.tasks))


# ----------------------------------------------------------------------------- one task alone
def task_config(config: PELTConfig, task: str) -> PELTConfig:
    """The single-task config of one of ``config``'s tasks (the same method and head)."""
    task_index(tuple(config.tasks), task)
    return dataclasses.replace(config, tasks={}, task_gates=TASK_GATES[0])


_BANK = re.compile(r"(?P<bank>.*\.pelt_gates\.[^.]+)\.proj\.(?P<task>\d+)\.(?P<part>weight|bias)")
_SHARED = re.compile(r"(?P<bank>.*\.pelt_gates\.[^.]+)\.(?:proj\.weight|task_bias\.(?P<task>\d+))")
_HEAD = re.compile(rf"{HEAD_ATTR}\.heads\.(?P<task>\d+)\.(?P<rest>.+)")


def task_weights(weights: Mapping[str, torch.Tensor], config: PELTConfig, task: str) -> dict[str, torch.Tensor]:
    """A multi-task model's saved weights (``pelt_state_dict``) -> those of its task ``task`` alone, named as a
    single-task model of ``task_config(config, task)`` names them: the shared weights as they are, the task's
    gates as each layer's ``GateBank`` and its head as ``pelt_head``."""
    index = task_index(tuple(config.tasks), task)
    shared = config.task_gates == "embedding"
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if (m := _HEAD.fullmatch(name)) is not None:
            if int(m["task"]) == index:
                out[f"{HEAD_ATTR}.{m['rest']}"] = tensor
        elif not shared and (m := _BANK.fullmatch(name)) is not None:
            if int(m["task"]) == index:
                out[f"{m['bank']}.proj.{m['part']}"] = tensor
        elif shared and (m := _SHARED.fullmatch(name)) is not None:
            if m["task"] is None:
                out[f"{m['bank']}.proj.weight"] = tensor
            elif int(m["task"]) == index:
                out[f"{m['bank']}.proj.bias"] = tensor
        else:
            out[name] = tensor
    return out


def task_export(record: dict[str, Any], weights: Mapping[str, torch.Tensor], task: str
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An export's record and weights (unipelt/io.py) of a multi-task model -> those of one of its tasks: its
    config, its labels as the backbone's, its weights (``task_weights``)."""
    config = PELTConfig.from_dict(record["pelt_config"])
    if not config.tasks:
        raise PELTError(f"task={task!r}: this export is of a single-task model; load it without task=")
    single = task_config(config, task)
    labels = config.tasks[task]
    backbone = {**record["backbone"], "num_labels": max(1, len(labels)),
                "problem_type": "single_label_classification" if labels else "regression",
                "id2label": {str(i): name for i, name in enumerate(labels or ("LABEL_0",))}}
    card = {k: v for k, v in record.get("card", {}).items() if k != "tasks"}
    card.update({"task": task, **((record.get("card", {}).get("tasks") or {}).get(task) or {})})
    alone = task_weights(weights, config, task)
    return ({**record, "pelt_config": single.to_dict(), "backbone": backbone, "card": card,
             "trainable_params": sum(t.numel() for t in alone.values())}, alone)
