"""UniPELTLightningModule: the one place where the PELT method (unipelt/) meets a task (GLUE's or your own).

The module owns the Hugging Face model with `apply_pelt` applied, the optimiser over the trainable
parameters only, the task's torchmetrics, gate logging, and checkpoints that never carry the
frozen backbone (it is rebuilt from `model_name_or_path` when a checkpoint is loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchmetrics import MetricCollection
from transformers import AutoModelForSequenceClassification

from datamodules.tasks import TaskInfo, task_from
from lightning_modules.base import CheckpointMismatchError, ModelConfigError, PELTModule, check_options, load_backbone
from lightning_modules.errors import UsageError
from lightning_modules.metrics import make_metric
from lightning_modules.predictions import FILE_FORMATS, added_columns, check_new_columns, write_predictions
from unipelt import gate_values
from unipelt.io import identity

__all__ = ["CheckpointMismatchError", "ModelConfigError", "UniPELTLightningModule"]


class UniPELTLightningModule(PELTModule):
    """A frozen Hugging Face encoder with gated UniPELT submodules, trained on one task.

    Args:
        model_name_or_path: hub name or local folder of the pretrained backbone.
        task: a GLUE task name, or a task read from your files (`TaskInfo.to_dict()`); the CLI hands
            over the data module's, which sets the labels (the model's id2label) and the metrics.
        head: the classification head, one of `unipelt.HEADS` (pooler, pooler_trainable, mean, cls_mlp;
            docs/method.md#heads); None: `pelt_overrides`' head, else `pooler` (the paper's).
        early_stopping_patience: validation rounds without improvement before stopping; None: never.
        **kwargs: the method and training options of `PELTModule` (method, pelt_overrides, learning_rate, ...).
    """

    def __init__(
        self,
        model_name_or_path: str = "bert-base-uncased",
        task: str | dict[str, Any] = "rte",
        head: str | None = None,
        early_stopping_patience: int | None = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.task_info: TaskInfo = task_from(task)
        self.configure_method(with_head(self.hparams.pelt_overrides, head))
        self.model = self._build_model()
        self.main_metric = f"val/{self.task_info.main_metric}"
        self.val_metrics = self._metrics("val/")
        self.test_metrics = torch.nn.ModuleList(self._metrics(f"{split}/") for split in self.task_info.test_splits)
        self._gates = GateMeans()
        self.last_test_gates: dict[str, float] = {}
        self.last_test_examples = 0

    # ----------------------------------------------------------------------------- model
    def _build_model(self) -> torch.nn.Module:
        task = self.task_info
        labels = {"id2label": dict(enumerate(task.label_names)),
                  "label2id": {n: i for i, n in enumerate(task.label_names)}} if task.label_names else {}
        problem = "regression" if task.is_regression else "single_label_classification"
        model = load_backbone(AutoModelForSequenceClassification, self.hparams.model_name_or_path,
                              config={"num_labels": task.num_labels, "problem_type": problem, **labels})
        return self.adapt(model)

    def _metrics(self, prefix: str) -> MetricCollection:
        return task_metrics(self.task_info, prefix)

    def _predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return predictions(logits, self.task_info)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per row: its `idx` (to restore the input order), the prediction (label id or score), probabilities."""
        return predicted_rows(self.model, batch, self.task_info)

    # ----------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.checked_loss(self.model(**batch).loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["labels"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: MetricCollection, stage: str) -> None:
        out = self.model(**batch)
        metrics.update(self._predictions(out.logits), batch["labels"])
        # Logging the Metric objects lets torchmetrics sync their states across ranks at epoch end.
        self.log_dict(metrics, on_step=False, on_epoch=True, add_dataloader_idx=False, prog_bar=stage == "val")
        self.log(
            f"{stage}/loss", out.loss, sync_dist=True, add_dataloader_idx=False, batch_size=batch["labels"].shape[0]
        )
        self._gates.add(gate_values(self.model), batch["attention_mask"].shape[0])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_metrics[dataloader_idx], self.task_info.test_splits[dataloader_idx])

    # ----------------------------------------------------------------------------- gates
    def on_validation_epoch_start(self) -> None:
        self._gates = GateMeans()

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        _, gates = self._gates.reduce(self.trainer.strategy, self.device)
        if gates:  # already reduced over every rank: rank zero logs the one value
            self.log_dict({f"gate/{k}": v for k, v in gates.items()}, rank_zero_only=True)

    def on_test_epoch_end(self) -> None:
        self.last_test_examples, self.last_test_gates = self._gates.reduce(self.trainer.strategy, self.device)

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint_identity(self) -> dict[str, Any]:
        """What an export's unipelt_config.json records (method, PELT config, backbone), plus the task and labels."""
        return {
            **identity(self.model, str(self.hparams.model_name_or_path)),
            "task": self.task_info.name,
            "labels": list(self.task_info.label_names),
        }

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Raise CheckpointMismatchError naming what differs (method, backbone or task) if `checkpoint` is not ours."""
        saved = self.saved_identity(checkpoint)
        if saved["task"] != self.task_info.name:
            raise CheckpointMismatchError(
                f"task differs: the checkpoint was trained on {saved['task']!r} "
                f"but the config uses {self.task_info.name!r}"
            )
        labels = list(self.task_info.label_names)
        if "labels" in saved and saved["labels"] != labels:
            raise CheckpointMismatchError(
                f"labels differ: the checkpoint predicts {saved['labels']} but the data gives {labels}"
            )
        self.check_complete(checkpoint)

    # ----------------------------------------------------------------------------- the end of a run
    @property
    def task_name(self) -> str:
        return self.task_info.name

    def summary_fields(self, datamodule: Any, best_val: dict[str, Any]) -> dict[str, Any]:
        return {
            "head": self.pelt_config.head,
            "labels": list(self.task_info.label_names),
            "test_split": "validation" if getattr(datamodule, "test_is_validation", False) else "test",
            "test_examples": self.last_test_examples,
            "gates": self.last_test_gates,
        }

    def predictions_path(self, datamodule: Any, given: str | None, run_folder: Path) -> Path:
        return predictions_target(datamodule.predict_file, given, run_folder)

    def check_predictions(self, datamodule: Any, target: Path) -> list[Path]:
        return predicted_files(datamodule, self.task_info, target)

    def write_predictions(self, outputs: list[list[Any]], datamodule: Any, target: Path) -> list[Path]:
        return write_predictions(outputs, datamodule, self.task_info, target)


# ----------------------------------------------------------------------------- shared with the multi-task module
def predicted_files(datamodule: Any, task_info: Any, target: Path) -> list[Path]:
    """What predict writes for one task: your file's predictions, one file (UsageError if a column they add is
    already the input's); a GLUE test set's, one leaderboard file per test split."""
    if datamodule.predict_file is None:
        return [target / f"{name}.tsv" for name in datamodule.predict_splits.values()]
    check_new_columns(datamodule.predict_table().columns, added_columns(task_info),
                      f"--data.predict_file {datamodule.predict_file!r}")
    return [target]


def with_head(overrides: dict[str, Any] | None, head: str | None) -> dict[str, Any]:
    """`pelt_overrides` with `--model.head` in them (it feeds the PELTConfig like an override); both given: the same."""
    overrides = dict(overrides or {})
    if head is not None:
        check_options(head=(head, overrides.get("head", head) == head,
                             f"the head pelt_overrides gives ({overrides.get('head')!r}), or left unset"))
        overrides["head"] = head
    return overrides


def task_metrics(task: TaskInfo, prefix: str) -> MetricCollection:
    """The task's torchmetrics, logged as ``<prefix><metric>``."""
    return MetricCollection({m: make_metric(m, task) for m in task.metrics}, prefix=prefix)


def predictions(logits: torch.Tensor, task: TaskInfo) -> torch.Tensor:
    """Label ids, or scores for a regression."""
    return logits.squeeze(-1) if task.is_regression else logits.argmax(-1)


def predicted_rows(model: torch.nn.Module, batch: dict[str, torch.Tensor], task_info: TaskInfo,
                   **call: Any) -> dict[str, Any]:
    """Per row: its `idx` (to restore the input order), the prediction (label id or score), probabilities;
    ``call``: more arguments of the model (a multi-task model's ``task``)."""
    inputs = {k: v for k, v in batch.items() if k not in ("idx", "labels")}
    logits = model(**inputs, **call).logits.float()
    out = {"idx": batch["idx"].cpu(), "prediction": predictions(logits, task_info).cpu()}
    if not task_info.is_regression:
        out["probs"] = logits.softmax(-1).cpu()
    return out


def predictions_target(predict_file: str | None, given: str | None, run_folder: Path) -> Path:
    """Your file's rows: `given` (.csv, .tsv, .jsonl), else `<run>/predictions/<file>.csv`; a GLUE
    test set: a folder of leaderboard files, `given` else `<run>/predictions/`."""
    if given is None:
        folder = run_folder / "predictions"
        return folder / f"{Path(predict_file).stem}.csv" if predict_file else folder
    if predict_file is not None and Path(given).suffix.lower() not in FILE_FORMATS:
        raise UsageError(f"--predictions {given!r}: give a .csv, .tsv or .jsonl file for --data.predict_file")
    return Path(given)


class GateMeans:
    """Per-example gates summed on the device over an evaluation (no host sync until it ends), then the mean
    gate per layer and submodule over every evaluated example, across ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, gates: dict[str, torch.Tensor], batch_size: int) -> None:
        for name, values in gates.items():
            self.sums[name] = self.sums.get(name, 0) + values.detach().float().sum()
        self.count += batch_size

    def reduce(self, strategy: Any, device: torch.device) -> tuple[int, dict[str, float]]:
        """(examples, mean gates), summed over every rank (a collective call: every rank calls it)."""
        count = strategy.reduce(torch.tensor(float(self.count), device=device), reduce_op="sum")
        means = {}
        for name in sorted(self.sums):
            total = strategy.reduce(self.sums[name].to(device), reduce_op="sum")
            means[name] = float(total / count.clamp(min=1))
        return int(count), means
