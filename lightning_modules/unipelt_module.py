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
        overrides = dict(self.hparams.pelt_overrides or {})
        if head is not None:  # --model.head feeds the PELTConfig like an override
            check_options(head=(head, overrides.get("head", head) == head,
                                 f"the head pelt_overrides gives ({overrides.get('head')!r}), or left unset"))
            overrides["head"] = head
        self.configure_method(overrides)
        self.model = self._build_model()
        self.main_metric = f"val/{self.task_info.main_metric}"
        self.val_metrics = self._metrics("val/")
        self.test_metrics = torch.nn.ModuleList(self._metrics(f"{split}/") for split in self.task_info.test_splits)
        self._gate_sums: dict[str, torch.Tensor] = {}
        self._gate_count = 0
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
        return MetricCollection({m: make_metric(m, self.task_info) for m in self.task_info.metrics}, prefix=prefix)

    def _predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1) if self.task_info.is_regression else logits.argmax(-1)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per row: its `idx` (to restore the input order), the prediction (label id or score), probabilities."""
        inputs = {k: v for k, v in batch.items() if k not in ("idx", "labels")}
        logits = self.model(**inputs).logits.float()
        out = {"idx": batch["idx"].cpu(), "prediction": self._predictions(logits).cpu()}
        if not self.task_info.is_regression:
            out["probs"] = logits.softmax(-1).cpu()
        return out

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
        self._accumulate_gates(batch["attention_mask"].shape[0])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_metrics[dataloader_idx], self.task_info.test_splits[dataloader_idx])

    # ----------------------------------------------------------------------------- gates
    def _accumulate_gates(self, batch_size: int) -> None:
        """Sum per-example gates on the device; no host sync until the epoch ends."""
        for name, values in gate_values(self.model).items():
            total = values.detach().float().sum()
            self._gate_sums[name] = self._gate_sums.get(name, 0) + total
        self._gate_count += batch_size

    def _reduce_gates(self) -> dict[str, float]:
        """Mean gate per layer and submodule over every evaluated example, across ranks."""
        count = self.trainer.strategy.reduce(torch.tensor(float(self._gate_count), device=self.device), reduce_op="sum")
        means = {}
        for name in sorted(self._gate_sums):
            total = self.trainer.strategy.reduce(self._gate_sums[name].to(self.device), reduce_op="sum")
            means[name] = float(total / count.clamp(min=1))
        self._gate_sums, self._gate_count = {}, 0
        return means

    def on_validation_epoch_start(self) -> None:
        self._gate_sums, self._gate_count = {}, 0

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        gates = self._reduce_gates()
        if gates:  # already reduced over every rank: rank zero logs the one value
            self.log_dict({f"gate/{k}": v for k, v in gates.items()}, rank_zero_only=True)

    def on_test_epoch_end(self) -> None:
        self.last_test_examples = int(
            self.trainer.strategy.reduce(torch.tensor(float(self._gate_count), device=self.device), reduce_op="sum")
        )
        self.last_test_gates = self._reduce_gates()

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
        """Your file's rows: `given` (.csv, .tsv, .jsonl), else `<run>/predictions/<file>.csv`; a GLUE
        test set: a folder of leaderboard files, `given` else `<run>/predictions/`."""
        predict_file = datamodule.predict_file
        if given is None:
            folder = run_folder / "predictions"
            return folder / f"{Path(predict_file).stem}.csv" if predict_file else folder
        if predict_file is not None and Path(given).suffix.lower() not in FILE_FORMATS:
            raise UsageError(f"--predictions {given!r}: give a .csv, .tsv or .jsonl file for --data.predict_file")
        return Path(given)

    def check_predictions(self, datamodule: Any, target: Path) -> list[Path]:
        """Your file's predictions: one file; a GLUE test set's: one leaderboard file per test split."""
        if datamodule.predict_file is None:
            return [target / f"{name}.tsv" for name in datamodule.predict_splits.values()]
        check_new_columns(datamodule.predict_table().columns, added_columns(self.task_info),
                          f"--data.predict_file {datamodule.predict_file!r}")
        return [target]

    def write_predictions(self, outputs: list[list[Any]], datamodule: Any, target: Path) -> list[Path]:
        return write_predictions(outputs, datamodule, self.task_info, target)
