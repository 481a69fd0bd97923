"""UniPELTLightningModule: the one place where the PELT method (unipelt/) meets a task (GLUE's or your own).

The module owns the Hugging Face model with `apply_pelt` applied, the optimiser over the trainable
parameters only, the task's torchmetrics, gate logging, and checkpoints that never carry the
frozen backbone (it is rebuilt from `model_name_or_path` when a checkpoint is loaded).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import MetricCollection
from transformers import AutoConfig, AutoModelForSequenceClassification

from datamodules.hub import MODEL_HINT, prepare_for, resolve_local, unreachable
from datamodules.tasks import TaskInfo, task_from
from lightning_modules.base import (
    CheckpointMismatchError,
    ModelConfigError,
    PELTModule,
    check_options,
    check_training_options,
    saved_identity,
)
from lightning_modules.metrics import make_metric
from unipelt import PRESETS, PELTConfig, PELTError, apply_pelt, count_trainable, gate_values, spec_for
from unipelt.io import identity


class UniPELTLightningModule(PELTModule):
    """A frozen Hugging Face encoder with gated UniPELT submodules, trained on one task.

    Args:
        model_name_or_path: hub name or local folder of the pretrained backbone.
        task: a GLUE task name, or a task read from your files (`TaskInfo.to_dict()`); the CLI hands
            over the data module's, which sets the labels (the model's id2label) and the metrics.
        method: a preset of `unipelt.PRESETS` (case-insensitive).
        pelt_overrides: per-hyperparameter overrides of the preset, e.g. ``{"lora_r": 16}``.
        learning_rate: AdamW learning rate; None takes the method's default.
        weight_decay: AdamW weight decay of the trainable weights (not biases or LayerNorms).
        warmup_ratio: fraction of the training steps with linear warm-up.
        adam_epsilon: AdamW's epsilon.
        early_stopping_patience: validation rounds without improvement before stopping; None: never.
        checkpoint_every_n_steps: also write `last.ckpt` every this many optimizer steps, so a killed
            run resumes (`--ckpt_path last`) mid-epoch; 0 or None: only after each validation.
        head: the classification head, one of `unipelt.HEADS` (pooler, pooler_trainable, mean, cls_mlp;
            docs/method.md#heads); None: `pelt_overrides`' head, else `pooler` (the paper's).
    """

    def __init__(
        self,
        model_name_or_path: str = "bert-base-uncased",
        task: str | dict[str, Any] = "rte",
        method: str = "unipelt_apl",
        pelt_overrides: dict[str, Any] | None = None,
        learning_rate: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        adam_epsilon: float = 1e-8,
        early_stopping_patience: int | None = 10,
        checkpoint_every_n_steps: int | None = 500,
        head: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_training_options(learning_rate, weight_decay, warmup_ratio, early_stopping_patience,
                               checkpoint_every_n_steps)
        self.task_info: TaskInfo = task_from(task)
        method = str(method).lower()
        self.hparams.method = method
        if method not in PRESETS:
            raise PELTError(f"--model.method {method!r} is not a preset; choose one of {', '.join(PRESETS)}")
        _check_overrides_used(method, pelt_overrides or {})
        overrides = dict(pelt_overrides or {})
        if head is not None:  # --model.head feeds the PELTConfig like an override
            check_options(head=(head, overrides.get("head", head) == head,
                                 f"the head pelt_overrides gives ({overrides.get('head')!r}), or left unset"))
            overrides["head"] = head
        self.pelt_config = PELTConfig.preset(method, **overrides)
        self.learning_rate = learning_rate if learning_rate is not None else PRESETS[method].learning_rate
        self.model = self._build_model()
        # Checkpoints hold only the trainable tensors; the frozen rest comes from model_name_or_path.
        self.strict_loading = False
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
        path = self.hparams.model_name_or_path
        labels = {"id2label": dict(enumerate(task.label_names))} if task.label_names else {}
        prepare_for(path)
        try:
            local = resolve_local(path)
            config = AutoConfig.from_pretrained(
                local,
                num_labels=task.num_labels,
                problem_type="regression" if task.is_regression else "single_label_classification",
                **labels,
                **({"label2id": {n: i for i, n in enumerate(task.label_names)}} if labels else {}),
            )
            with _quiet_load_report():
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    local, config=config, output_loading_info=True
                )
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            if (hub := unreachable(str(path), "--model.model_name_or_path", MODEL_HINT)) is not None:
                raise hub from None
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ModelConfigError(
                f"--model.model_name_or_path {str(path)!r} is not a Hugging Face model folder or hub name ({first})"
            ) from None
        # The new head is expected (it trains, or comes from the checkpoint); a missing backbone weight is not.
        prefix = f"{model.base_model_prefix}."
        if odd := sorted(k for k in info.get("missing_keys", ()) if k.startswith(prefix)):
            warnings.warn(
                f"--model.model_name_or_path {str(path)!r}: {len(odd)} backbone weights are not in its files and "
                f"start random, e.g. {odd[0]}",
                stacklevel=2,
            )
        self.backbone_params = sum(p.numel() for p in model.base_model.parameters())
        # from_pretrained returns eval mode and Lightning keeps each module's mode: without .train()
        # the backbone's dropout would stay off during training.
        return apply_pelt(model, self.pelt_config).train()

    @property
    def max_input_length(self) -> int:
        """Longest input the backbone's position embeddings allow (the family's position offset removed)."""
        return spec_for(self.model).max_input_length(self.model.config)

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
        saved = saved_identity(checkpoint, self.model)
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

    # ----------------------------------------------------------------------------- reporting
    def parameter_counts(self) -> dict[str, Any]:
        """Trainable parameters as the paper counts them, and as a share of the pretrained backbone alone
        (without head or added modules): the one percentage the summary, the log and the report show."""
        trainable = count_trainable(self.model)
        return {
            "trainable_params": trainable,
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "backbone_params": self.backbone_params,
            "trainable_pct": 100.0 * trainable / max(1, self.backbone_params),
        }


def _check_overrides_used(method: str, overrides: dict[str, Any]) -> None:
    """`{adapter_bottleneck: 64}` with `lora` would change nothing: an error, never a silent no-op."""
    config = PELTConfig.preset(method, **{k: v for k, v in overrides.items() if k in ("adapter", "prefix", "lora")})
    for key in overrides:
        submodule = key.split("_", 1)[0]
        if "_" in key and submodule in ("adapter", "prefix", "lora") and not getattr(config, submodule):
            used = [m for m in ("adapter", "prefix", "lora") if getattr(config, m)]
            raise ModelConfigError(
                f"--model.pelt_overrides {key}: method {method!r} has no {submodule}, so it would change nothing "
                f"(its submodules: {', '.join(used) or 'none'}; add `{submodule}: true` to include one)"
            )


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """transformers' load report says the new head is "newly initialized ... train on a downstream task":
    true and useless here (the head trains, or comes from the checkpoint). Missing backbone weights are
    warned about by the caller instead."""
    logs = [logging.getLogger(n) for n in ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (without validation), for the efficiency table."""

    def __init__(self) -> None:
        self.epoch_times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start:  # validation inside fit ends the epoch's training part
            self.epoch_times.append(time.perf_counter() - self._start)
            self._start = 0.0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start:
            self.epoch_times.append(time.perf_counter() - self._start)
            self._start = 0.0
