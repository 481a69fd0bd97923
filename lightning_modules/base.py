"""PELTModule: what the encoder (task) and decoder (instruction) Lightning modules share.

Both train only the trainable tensors of a model with `apply_pelt` applied: the same AdamW
groups (fused where torch has the kernel) and linear schedule, the same model selection and
exact-resume callbacks, and checkpoints that hold the trainable tensors only, refused in one
line when they belong to another run.
A subclass sets `main_metric` (and `monitor_mode` when lower is better) and says what its
checkpoints record (`checkpoint_identity`) and check (`check_checkpoint`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.trainer.states import TrainerFn
from transformers import get_linear_schedule_with_warmup

from lightning_modules.checkpointing import CHECKPOINT_KEY, ExactResume, LastCheckpoint
from unipelt import PELTError, spec_for
from unipelt.io import check_identity

FUSED_DEVICES = ("cpu", "cuda")  # where torch's AdamW has a fused kernel for every floating dtype


def adamw(groups: list[dict[str, Any]], fuse: bool = True, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where every trainable tensor's device has one (and ``fuse``).

    Its default on the CPU is a Python loop of about ten ops per tensor: at 2 threads that loop cost
    bert-base fine-tuning 470 ms per step and UniPELT 54 ms; fused, 70 and 9 ms (same update, one
    pass per tensor; benchmarks/step_time.py). Elsewhere torch's own default stays."""
    params = [p for group in groups for p in group["params"]]
    fused = fuse and bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES
                                          for p in params)
    return torch.optim.AdamW(groups, fused=True if fused else None, **kwargs)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to the configured run (method, backbone or task differ)."""


class ModelConfigError(ValueError):
    """A bad `--model.*` value (a path that is not a model, a bad option), told in one line."""


def check_options(**checks: tuple[Any, bool, str]) -> None:
    """``name=(value, ok, rule)``: ModelConfigError for the first value that is not ok."""
    for name, (value, ok, rule) in checks.items():
        if not ok:
            raise ModelConfigError(f"--model.{name} {value!r}: must be {rule}")


def check_training_options(learning_rate: float | None, weight_decay: float, warmup_ratio: float,
                           early_stopping_patience: int | None, checkpoint_every_n_steps: int | None) -> None:
    """The options every module takes, checked alike."""
    check_options(
        learning_rate=(learning_rate, learning_rate is None or 0 < learning_rate < math.inf, "> 0"),
        weight_decay=(weight_decay, 0 <= weight_decay < math.inf, ">= 0"),
        warmup_ratio=(warmup_ratio, 0 <= warmup_ratio <= 1, "in 0..1"),
        early_stopping_patience=(
            early_stopping_patience,
            early_stopping_patience is None or early_stopping_patience >= 0,
            ">= 0 (or null: never stop early)",
        ),
        checkpoint_every_n_steps=(
            checkpoint_every_n_steps,
            checkpoint_every_n_steps is None or checkpoint_every_n_steps >= 0,
            ">= 0 (0 or null: after each validation only)",
        ),
    )


def saved_identity(checkpoint: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint's unipelt identity, checked against ``model`` with the same check as
    ``unipelt.from_pretrained`` (method, backbone, labels); CheckpointMismatchError names what differs."""
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved is None:
        raise CheckpointMismatchError("the checkpoint was not written by unipelt (no 'unipelt' entry)")
    try:
        check_identity(saved, model)
    except PELTError as err:
        raise CheckpointMismatchError(str(err)) from None
    return saved


class PELTModule(pl.LightningModule):
    """A model with `apply_pelt` applied (``self.model``), trained on its trainable tensors only."""

    monitor_mode: ClassVar[str] = "max"  # how `main_metric` improves
    main_metric: str
    model: torch.nn.Module
    learning_rate: float

    @property
    def trainable_parameter_names(self) -> set[str]:
        return {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def checked_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, or FloatingPointError (the CLI keeps the last good checkpoints) if it is not finite."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}: "
                f"the learning rate ({self.learning_rate:g}) is likely too high"
            )
        return loss

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        spec = spec_for(self.model)  # biases and the family's normalisation weights take no decay
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (decay if spec.decays(name) else no_decay).append(param)
        # Lightning refuses to clip gradients under mixed precision for an optimizer that unscales
        # them in its own step, as the fused one does.
        clips_mixed = isinstance(self.trainer.precision_plugin, MixedPrecision) and bool(self.trainer.gradient_clip_val)
        optimizer = adamw(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            fuse=not clips_mixed,
            lr=self.learning_rate,
            eps=self.hparams.adam_epsilon,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(self.hparams.warmup_ratio * total)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[pl.Callback]:
        """Model selection on `main_metric`, plus what an exact resume needs: `last.ckpt` every
        `checkpoint_every_n_steps` steps and the RNG states.

        Checkpoints go to `<default_root_dir>/checkpoints/` whatever the logger's version, so that
        `--ckpt_path last` finds them in the next process and the best-checkpoint bookkeeping resumes.

        Only for `fit`: `validate`/`test` need none of them, and on a trainer that already holds them
        (the test after fit) Lightning 2.6 replaces callbacks by type walking a set, so whether the old
        `LastCheckpoint` (a ModelCheckpoint subclass) is replaced depends on hash order. Ranks could
        then hold different numbers of checkpoint callbacks, whose setup broadcasts hang DDP.
        """
        if self._trainer is not None and self.trainer.state.fn != TrainerFn.FITTING:
            return []
        dirpath = str(Path(self.trainer.default_root_dir) / "checkpoints") if self._trainer is not None else None
        callbacks: list[pl.Callback] = [
            ModelCheckpoint(dirpath=dirpath, monitor=self.main_metric, mode=self.monitor_mode, save_top_k=1,
                            filename="best-{epoch}-{step}", auto_insert_metric_name=False),
            LastCheckpoint(dirpath=dirpath, every_n_train_steps=self.hparams.get("checkpoint_every_n_steps") or 0),
            ExactResume(),
        ]
        if self.hparams.early_stopping_patience is not None:
            callbacks.append(EarlyStopping(monitor=self.main_metric, mode=self.monitor_mode,
                                           patience=self.hparams.early_stopping_patience))
        return callbacks

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint_identity(self) -> dict[str, Any]:
        """What a checkpoint records to be recognised (unipelt.io's identity and the task)."""
        raise NotImplementedError

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Raise CheckpointMismatchError naming what differs if `checkpoint` is not this run's."""
        raise NotImplementedError

    def check_complete(self, checkpoint: dict[str, Any]) -> None:
        """CheckpointMismatchError if `checkpoint` lacks a trainable tensor (strict loading is off)."""
        missing = self.trainable_parameter_names - set(checkpoint.get("state_dict", {}))
        if missing:
            raise CheckpointMismatchError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {min(missing)}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_parameter_names
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # never let NaN weights replace the last good checkpoint
            raise FloatingPointError(
                f"non-finite trainable weights ({bad[0]}) at global step {self.global_step}: "
                f"the learning rate ({self.learning_rate:g}) is likely too high"
            )
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_identity()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)
