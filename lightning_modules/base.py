"""PELTModule: what the classification and instruction Lightning modules share.

Both train only the trainable tensors of a model with `apply_pelt` applied: the method taken from
`unipelt.PRESETS` (any case), the same AdamW groups (fused where torch has the kernel) and linear
schedule, the same model selection and exact-resume callbacks, and checkpoints that hold the
trainable tensors only, refused in one line when they belong to another run.
A subclass builds its model (`load_backbone`, then `adapt`), sets `main_metric` (and
`monitor_mode` when lower is better) and says what its checkpoints record (`checkpoint_identity`)
and check (`check_checkpoint`), what `summary.json` adds for it and how its predictions are written.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.trainer.states import TrainerFn
from transformers import get_linear_schedule_with_warmup

from datamodules.hub import MODEL_HINT, prepare_for, unreachable
from lightning_modules.checkpointing import CHECKPOINT_KEY, ExactResume, LastCheckpoint
from lightning_modules.errors import CheckpointMismatchError, ModelConfigError
from unipelt import PRESETS, PELTConfig, PELTError, apply_pelt, count_trainable, spec_for
from unipelt.checkpoint import check_tensors
from unipelt.io import check_identity, load_pretrained
from unipelt.record import IDENTITY, check_record

FUSED_DEVICES = ("cpu", "cuda")  # where torch's AdamW has a fused kernel for every floating dtype

__all__ = ["CheckpointMismatchError", "ModelConfigError", "PELTModule", "adamw", "load_backbone"]


def adamw(groups: list[dict[str, Any]], fuse: bool = True, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where every trainable tensor's device has one (and ``fuse``).

    Its default on the CPU is a Python loop of about ten ops per tensor: at 2 threads that loop cost
    bert-base fine-tuning 470 ms per step and UniPELT 54 ms; fused, 70 and 9 ms (same update, one
    pass per tensor; benchmarks/step_time.py). Elsewhere torch's own default stays."""
    params = [p for group in groups for p in group["params"]]
    fused = fuse and bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES
                                          for p in params)
    return torch.optim.AdamW(groups, fused=True if fused else None, **kwargs)


def check_options(**checks: tuple[Any, bool, str]) -> None:
    """``name=(value, ok, rule)``: ModelConfigError for the first value that is not ok."""
    for name, (value, ok, rule) in checks.items():
        if not ok:
            raise ModelConfigError(f"--model.{name} {value!r}: must be {rule}")


def load_backbone(auto_class: Any, path: str, what: str = "Hugging Face model",
                  config: dict[str, Any] | None = None, hint: str = MODEL_HINT, **kwargs: Any) -> torch.nn.Module:
    """``auto_class.from_pretrained(path, **kwargs)`` in train mode (``config``: settings of its
    AutoConfig, e.g. the labels), or one line saying why not (`unipelt.io.load_pretrained`: never
    unpickles code, no load report).

    A hub name that cannot be fetched says which options take local files (HubUnreachableError, ending
    with ``hint``);
    anything else that is not a model is a ModelConfigError naming `--model.model_name_or_path`.
    A backbone weight missing from the files is warned about (the new head is expected to be)."""
    prepare_for(path)
    try:
        model, info = load_pretrained(auto_class, path, config=config, **kwargs)
    except PELTError as err:
        if (hub := unreachable(str(path), "--model.model_name_or_path", hint)) is not None:
            raise hub from None
        raise ModelConfigError(f"--model.model_name_or_path {str(path)!r} is not a {what} folder or hub name "
                               f"({getattr(err, 'reason', err)})") from None
    prefix = f"{model.base_model_prefix}."
    if odd := sorted(k for k in info.get("missing_keys", ()) if k.startswith(prefix)):
        warnings.warn(
            f"--model.model_name_or_path {str(path)!r}: {len(odd)} backbone weights are not in its files and "
            f"start random, e.g. {odd[0]}",
            stacklevel=2,
        )
    return model


class PELTModule(pl.LightningModule):
    """A model with `apply_pelt` applied (``self.model``), trained on its trainable tensors only.

    The options every kind of run takes (a subclass passes them on with ``**kwargs``; the CLI lists them
    with the subclass's own).

    Args:
        method: the method, a preset (case-insensitive): {presets}.
        pelt_overrides: per-hyperparameter overrides of the preset, e.g. ``{{"lora_r": 16}}``.
        learning_rate: AdamW learning rate; None takes the method's default.
        weight_decay: AdamW weight decay of the trainable weights (not biases or normalisation weights).
        warmup_ratio: fraction of the training steps with linear warm-up.
        adam_epsilon: AdamW's epsilon.
        checkpoint_every_n_steps: also write `last.ckpt` every this many optimizer steps, so a killed
            run resumes (`--ckpt_path last`) mid-epoch; 0 or None: only after each validation.
    """

    monitor_mode: ClassVar[str] = "max"  # how `main_metric` improves
    main_metric: str
    model: torch.nn.Module
    learning_rate: float
    backbone_params: int

    def __init__(
        self,
        method: str = "unipelt_apl",
        pelt_overrides: dict[str, Any] | None = None,
        learning_rate: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        adam_epsilon: float = 1e-8,
        checkpoint_every_n_steps: int | None = 500,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # these arguments and the subclass's (Lightning reads both calls)
        check_options(
            learning_rate=(learning_rate, learning_rate is None or 0 < learning_rate < math.inf, "> 0"),
            weight_decay=(weight_decay, 0 <= weight_decay < math.inf, ">= 0"),
            warmup_ratio=(warmup_ratio, 0 <= warmup_ratio <= 1, "in 0..1"),
            checkpoint_every_n_steps=(checkpoint_every_n_steps,
                                      checkpoint_every_n_steps is None or checkpoint_every_n_steps >= 0,
                                      ">= 0 (0 or null: after each validation only)"),
        )
        patience = self.hparams.get("early_stopping_patience")  # the subclass's (its default differs per kind)
        check_options(early_stopping_patience=(patience, patience is None or patience >= 0,
                                               ">= 0 (or null: never stop early)"))
        self.strict_loading = False  # checkpoints hold only the trainable tensors; the rest is the backbone

    def configure_method(self, overrides: dict[str, Any]) -> PELTConfig:
        """The method's PELTConfig, with ``overrides`` (`pelt_overrides` and the subclass's own).

        The method is looked up in `unipelt.PRESETS` (any case) and recorded by its preset's name, so
        checkpoints, summaries and run folders spell it one way; the preset refuses an override of a
        submodule it lacks (it would change nothing)."""
        method = self.hparams.method
        preset = PRESETS.get(str(method))
        if preset is None:
            raise PELTError(f"--model.method {method!r} is not a preset; choose one of {', '.join(PRESETS)}")
        self.pelt_config = PELTConfig.preset(preset.name, **overrides)
        self.hparams.method = preset.name
        learning_rate = self.hparams.learning_rate
        self.learning_rate = learning_rate if learning_rate is not None else preset.learning_rate
        return self.pelt_config

    def adapt(self, backbone: torch.nn.Module) -> torch.nn.Module:
        """``backbone`` with the method applied, in train mode; its pretrained size (without head or added
        modules) is kept for the summary's share of trainable parameters."""
        self.backbone_params = sum(p.numel() for p in backbone.base_model.parameters())
        # from_pretrained returns eval mode and Lightning keeps each module's mode: without .train()
        # the backbone's dropout would stay off during training.
        return apply_pelt(backbone, self.pelt_config).train()

    @property
    def trainable_parameter_names(self) -> set[str]:
        return {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}

    @property
    def max_input_length(self) -> int:
        """Longest input the backbone's position embeddings allow (the family's position offset removed)."""
        return spec_for(self.model).max_input_length(self.model.config)

    @property
    def attached_trainer(self) -> pl.Trainer | None:
        """The trainer, or None before one is attached (`self.trainer` raises then)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

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
        trainer = self.attached_trainer
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            return []
        dirpath = str(Path(trainer.default_root_dir) / "checkpoints") if trainer is not None else None
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

    def saved_identity(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's unipelt identity, checked against this model with the same check as
        ``unipelt.from_pretrained`` (method, backbone, labels); CheckpointMismatchError names what differs."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise CheckpointMismatchError("the checkpoint was not written by unipelt (no 'unipelt' entry)")
        try:
            check_record(saved, IDENTITY, "the checkpoint", f"{CHECKPOINT_KEY}.")  # any loader, Lightning's too
            check_identity(saved, self.model)
        except PELTError as err:
            raise CheckpointMismatchError(str(err)) from None
        return saved

    def check_complete(self, checkpoint: dict[str, Any]) -> None:
        """CheckpointMismatchError if `checkpoint` lacks a trainable tensor (strict loading is off) or holds one
        of another shape than the model's."""
        state = checkpoint.get("state_dict", {})
        missing = self.trainable_parameter_names - set(state)
        if missing:
            raise CheckpointMismatchError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {min(missing)}")
        shapes = {name: tuple(p.shape) for name, p in self.named_parameters() if name in state}
        try:
            check_tensors({name: state[name] for name in shapes}, "checkpoint", shapes)
        except PELTError as err:
            raise CheckpointMismatchError(str(err).removeprefix("checkpoint: ")) from None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_parameter_names
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # never let NaN weights replace the last good checkpoint
            raise FloatingPointError(
                f"non-finite trainable weights ({bad[0]}) at global step {self.global_step}: "
                f"the learning rate ({self.learning_rate:g}) is likely too high"
            )
        # beside what callbacks recorded there (the run's seeds: run.RunRecord)
        checkpoint[CHECKPOINT_KEY] = {**checkpoint.get(CHECKPOINT_KEY, {}), **self.checkpoint_identity()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Lightning's, without its warning that every frozen backbone tensor is missing from the checkpoint:
        by design (checkpoints hold the trainable tensors, and `check_checkpoint` refuses one lacking any)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the")
            return super().load_from_checkpoint(*args, **kwargs)

    def load_trainable(self, checkpoint: dict[str, Any]) -> None:
        """Put a checkpoint's trainable tensors (checked to be this run's) into the model."""
        self.check_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"], strict=False)

    # ----------------------------------------------------------------------------- the end of a run
    @property
    def task_name(self) -> str:
        """The task's name in summaries, exports and checkpoints."""
        raise NotImplementedError

    def tests_after_fit(self, datamodule: Any) -> bool:
        """Whether `fit` ends by testing the best checkpoint (on the test split, or on dev when there is none)."""
        return True

    def test_scores(self, metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The test metrics `summary.json` and the export record: the scores, not the loss logged for curves."""
        return {k: float(v) for k, v in metrics.items() if not k.endswith("/loss")}

    def summary_fields(self, datamodule: Any, best_val: dict[str, Any]) -> dict[str, Any]:
        """What this kind of run adds to `summary.json` (and `best_val`, given, may gain)."""
        return {}

    def card_info(self, test: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
        """What `export/`'s model card records besides K (``extra``: `summary_fields`' output): the task, the
        test scores and, when the summary has them, the mean test gates."""
        return {"task": self.task_name, "metrics": test, **({"gates": extra["gates"]} if "gates" in extra else {})}

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

    # ----------------------------------------------------------------------------- predictions
    def predictions_path(self, datamodule: Any, given: str | None, run_folder: Path) -> Path:
        """Where `predict` writes (``given``: `--predictions`); UsageError for a target it cannot write."""
        raise NotImplementedError

    def check_predictions(self, datamodule: Any, target: Path) -> list[Path]:
        """Before predicting: the files `write_predictions` will write to ``target`` (the CLI checks that each can
        be written); UsageError if a column the predictions add is already one of the input's."""
        raise NotImplementedError

    def write_predictions(self, outputs: list[list[Any]], datamodule: Any, target: Path) -> list[Path]:
        """Write every rank's `predict_step` outputs (one list per predict loader) in input order."""
        raise NotImplementedError


# The method's help lists the presets from the one table (jsonargparse shows it as `--model.method`'s help).
PELTModule.__doc__ = PELTModule.__doc__.format(presets=", ".join(PRESETS))
