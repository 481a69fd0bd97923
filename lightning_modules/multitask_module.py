"""MultiTaskModule: one model trained on several tasks at once (`--data.tasks`, docs/data.md#multi-task).

The backbone and the method's submodules are shared; each task has its own pooling head and, for gated
methods, its own gates (`unipelt.multitask`). A training batch holds one task's rows and names it
(`batch["task"]`); evaluation has one loader per task (and test split), the data module's `eval_plan` says
which. Each task is scored with its own torchmetrics, logged as `val/<task>/<metric>`; the checkpoint is
chosen on `val/mean`, the mean over tasks of each task's main metric.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.trainer.states import TrainerFn
from transformers import AutoModelForSequenceClassification

from datamodules.tasks import TaskInfo, task_from
from lightning_modules.base import CheckpointMismatchError, ModelConfigError, PELTModule, load_backbone
from lightning_modules.checkpointing import CHECKPOINT_KEY
from lightning_modules.predictions import write_predictions
from lightning_modules.unipelt_module import (
    GateMeans,
    predicted_files,
    predicted_rows,
    predictions,
    predictions_target,
    task_metrics,
    with_head,
)
from unipelt import gate_values
from unipelt.io import identity

MEAN = "mean"  # `val/mean`: the mean over tasks of each task's main metric
DEFAULT_HEAD = "cls_mlp"  # chosen on dev for MiniLM at K=100 (results/minilm_k100_head); `pooler` has one label set
BEST_DEV_KEY = "unipelt_multitask_best_dev"  # the checkpoint's record of the best validation's scores


class MultiTaskModule(PELTModule):
    """A frozen Hugging Face encoder with UniPELT submodules shared by several tasks, each with its own head
    and gates.

    Args:
        model_name_or_path: hub name or local folder of the pretrained backbone.
        tasks: the tasks, in the model's order: GLUE names or tasks read from your files (`TaskInfo.to_dict()`);
            the CLI hands over the data module's.
        head: every task's pooling head, mean or cls_mlp (the model's own head has one label set); None:
            `pelt_overrides`' head, else cls_mlp.
        task_gates: embedding (one shared gate bank plus a learned bias per task) or bank (a gate bank per
            task); None: `pelt_overrides`' choice, else embedding (chosen on dev; docs/method.md#multi-task).
        early_stopping_patience: validation rounds without improvement of `val/mean` before stopping; None: never.
        **kwargs: the method and training options of `PELTModule` (method, pelt_overrides, learning_rate, ...).
    """

    def __init__(
        self,
        model_name_or_path: str = "bert-base-uncased",
        tasks: list[str | dict[str, Any]] | None = None,
        head: str | None = None,
        task_gates: str | None = None,
        early_stopping_patience: int | None = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not tasks:
            raise ModelConfigError("--model.tasks: give the tasks (the CLI takes them from --data.tasks)")
        self.tasks: list[TaskInfo] = [task_from(t) for t in tasks]
        overrides = with_head(self.hparams.pelt_overrides, head)
        overrides.setdefault("head", DEFAULT_HEAD)
        if task_gates is not None:
            overrides["task_gates"] = task_gates
        overrides["tasks"] = {t.name: list(t.label_names) for t in self.tasks}
        self.configure_method(overrides)
        self.model = self.adapt(load_backbone(AutoModelForSequenceClassification, self.hparams.model_name_or_path))
        self.main_metric = f"val/{MEAN}"
        self.index = {t.name: i for i, t in enumerate(self.tasks)}
        self.val_metrics = torch.nn.ModuleList(task_metrics(t, f"val/{t.name}/") for t in self.tasks)
        self.test_splits = [(t.name, split) for t in self.tasks for split in t.test_splits]
        self.test_metrics = torch.nn.ModuleList(task_metrics(self.tasks[self.index[name]], f"{split}/{name}/")
                                                for name, split in self.test_splits)
        self._gates: dict[str, GateMeans] = {}
        self.best_dev: dict[str, float] = {}
        self.last_test_gates: dict[str, dict[str, float]] = {}
        self.last_test_examples: dict[str, int] = {}

    # ----------------------------------------------------------------------------- steps
    def _plan(self, loaders: str) -> list[tuple[str, str]]:
        """(task, split) of each evaluation loader, from the data module."""
        return self.trainer.datamodule.eval_plan(loaders)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        task = batch.pop("task")
        loss = self.checked_loss(self.model(**batch, task=task).loss)
        size = batch["labels"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log(f"train/{task}/loss", loss, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], task: str, metrics: Any, prefix: str) -> None:
        out = self.model(**batch, task=task)
        metrics.update(predictions(out.logits, self.tasks[self.index[task]]), batch["labels"])
        size = batch["labels"].shape[0]
        self.log(f"{prefix}/loss", out.loss, sync_dist=True, add_dataloader_idx=False, batch_size=size)
        self._gates.setdefault(task, GateMeans()).add(gate_values(self.model), size)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        task, _ = self._plan("validation")[dataloader_idx]
        self._eval_step(batch, task, self.val_metrics[self.index[task]], f"val/{task}")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        task, split = self._plan("test")[dataloader_idx]
        self._eval_step(batch, task, self.test_metrics[self.test_splits.index((task, split))], f"{split}/{task}")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        task, _ = self._plan("predict")[dataloader_idx]
        return predicted_rows(self.model, batch, self.tasks[self.index[task]], task=task)

    # ----------------------------------------------------------------------------- the end of an evaluation
    def on_validation_epoch_start(self) -> None:
        self._gates = {}

    on_test_epoch_start = on_validation_epoch_start

    def _scores(self, stage: str) -> dict[str, float]:
        """Every metric of the tasks ``stage`` ("val" or "test") evaluated, computed across ranks (then reset), and
        `<stage>/mean`: the mean over those tasks of each one's main metric (on its first test split)."""
        scores: dict[str, float] = {}
        mains: dict[str, float] = {}
        for task, split in self._plan("validation" if stage == "val" else "test"):
            info = self.tasks[self.index[task]]
            if stage == "val":
                collection, prefix = self.val_metrics[self.index[task]], "val"
            else:
                collection, prefix = self.test_metrics[self.test_splits.index((task, split))], split
            values = {k: float(v) for k, v in collection.compute().items()}
            collection.reset()
            scores.update(values)
            mains.setdefault(task, values[f"{prefix}/{task}/{info.main_metric}"])
        scores[f"{stage}/{MEAN}"] = statistics.fmean(mains.values())
        return scores

    def _reduce_gates(self, loaders: str) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
        """Per task evaluated: examples and mean gates, across ranks (every rank reduces every task, in order)."""
        examples, gates = {}, {}
        for task in dict.fromkeys(task for task, _ in self._plan(loaders)):
            means = self._gates.setdefault(task, GateMeans())
            examples[task], gates[task] = means.reduce(self.trainer.strategy, self.device)
        return examples, gates

    def on_validation_epoch_end(self) -> None:
        scores = self._scores("val")
        mean = scores.pop(self.main_metric)
        self.log_dict(scores, sync_dist=True)  # equal on every rank (torchmetrics synced them): the mean is exact
        self.log(self.main_metric, mean, prog_bar=True, sync_dist=True)
        scores[self.main_metric] = mean
        _, gates = self._reduce_gates("validation")
        flat = {f"gate/{task}/{k}": v for task, values in gates.items() for k, v in values.items()}
        if flat:
            self.log_dict(flat, rank_zero_only=True)
        fitting = not self.trainer.sanity_checking and self.trainer.state.fn == TrainerFn.FITTING
        best = self.best_dev.get(self.main_metric)
        if fitting and (best is None or scores[self.main_metric] > best):  # ModelCheckpoint's rule: strictly better
            self.best_dev = scores

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._scores("test"), sync_dist=True)
        self.last_test_examples, self.last_test_gates = self._reduce_gates("test")

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint_identity(self) -> dict[str, Any]:
        """unipelt's identity (method, PELT config with the tasks, backbone), plus every task and its labels."""
        return {
            **identity(self.model, str(self.hparams.model_name_or_path)),
            "task": self.task_name,
            "tasks": [{"name": t.name, "labels": list(t.label_names)} for t in self.tasks],
        }

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """CheckpointMismatchError naming what differs (the tasks, their labels, method or backbone)."""
        saved = checkpoint.get(CHECKPOINT_KEY) or {}
        mine = [{"name": t.name, "labels": list(t.label_names)} for t in self.tasks]
        theirs = saved.get("tasks")
        if theirs is None:
            raise CheckpointMismatchError(f"the checkpoint is of a single-task run ({saved.get('task')!r}); "
                                          f"the config gives several tasks: {self.task_name}")
        names = [t["name"] for t in theirs], [t["name"] for t in mine]
        if names[0] != names[1]:
            raise CheckpointMismatchError(f"tasks differ: the checkpoint was trained on {names[0]} but the config "
                                          f"gives {names[1]}")
        for a, b in zip(theirs, mine, strict=True):
            if a["labels"] != b["labels"]:
                raise CheckpointMismatchError(f"labels of {a['name']!r} differ: the checkpoint predicts {a['labels']} "
                                              f"but the data gives {b['labels']}")
        self.saved_identity(checkpoint)
        self.check_complete(checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[BEST_DEV_KEY] = dict(self.best_dev)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.best_dev = dict(checkpoint.get(BEST_DEV_KEY) or {})

    # ----------------------------------------------------------------------------- the end of a run
    @property
    def task_name(self) -> str:
        return "+".join(t.name for t in self.tasks)

    def summary_fields(self, datamodule: Any, best_val: dict[str, Any]) -> dict[str, Any]:
        """Per task: its labels, dev scores at the selected checkpoint, test scores, test split and gates."""
        tasks = {}
        for t in self.tasks:
            member = datamodule.members[t.name]
            tasks[t.name] = {  # scores named as a single-task run's summary names them (val/accuracy, test/accuracy)
                "labels": list(t.label_names),
                "main_metric": t.main_metric,
                "dev": _of_task(self.best_dev, t.name, ("val",)),
                "test": _of_task(self.trainer.callback_metrics, t.name, t.test_splits),
                "test_split": "validation" if member.test_is_validation else "test",
                "test_examples": self.last_test_examples.get(t.name, 0),
                "gates": self.last_test_gates.get(t.name, {}),
            }
        return {
            "head": self.pelt_config.head,
            "task_gates": self.pelt_config.task_gates if self.pelt_config.gated else None,
            "sampling": {"rule": datamodule.sampling, "temperature": datamodule.temperature}
            if datamodule.sampling == "temperature" else {"rule": datamodule.sampling},
            "tasks": tasks,
            "test_examples": sum(self.last_test_examples.values()),
            "gates": {name: t["gates"] for name, t in tasks.items() if t["gates"]},
        }

    def card_info(self, test: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
        """The export's card: every task's scores and gates (`from_pretrained(export, task=...)` shows one's)."""
        tasks = {name: {"metrics": t["test"], "gates": t["gates"]} for name, t in extra["tasks"].items()}
        gates = {f"{task}/{k}": v for task, values in extra["gates"].items() for k, v in values.items()}
        return {"tasks": tasks, "metrics": test, **({"gates": gates} if gates else {})}

    def predictions_path(self, datamodule: Any, given: str | None, run_folder: Path) -> Path:
        return predictions_target(datamodule.predict_file, given, run_folder)

    def check_predictions(self, datamodule: Any, target: Path) -> list[Path]:
        """Each predicted task's files, checked as its single-task run checks them."""
        return [path for name, member in datamodule._active("predict").items()
                for path in predicted_files(member, self.tasks[self.index[name]], target)]

    def write_predictions(self, outputs: list[list[Any]], datamodule: Any, target: Path) -> list[Path]:
        """Each predicted task's file (or GLUE's leaderboard files of each task, into one folder)."""
        plan, written = datamodule.eval_plan("predict"), []
        for name in dict.fromkeys(task for task, _ in plan):
            mine = [out for (task, _), out in zip(plan, outputs, strict=True) if task == name]
            written += write_predictions(mine, datamodule.members[name], self.tasks[self.index[name]], target)
        return written


def _of_task(metrics: Any, task: str, splits: tuple[str, ...]) -> dict[str, float]:
    """``{"<split>/<task>/<metric>": v}`` -> ``{"<split>/<metric>": v}`` for one task and ``splits`` (no losses)."""
    out = {}
    for key, value in metrics.items():
        split, *rest = key.split("/")
        if split in splits and len(rest) == 2 and rest[0] == task and rest[1] != "loss":
            out[f"{split}/{rest[1]}"] = float(value)
    return out
