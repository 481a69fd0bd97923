"""CausalLMModule: a decoder LLM with UniPELT, instruction-tuned; dev loss and perplexity; generations.

The counterpart of `UniPELTLightningModule` for `AutoModelForCausalLM` backbones and
`datamodules.instruct.InstructionDataModule`: the loss is Hugging Face's (labels -100 outside
the responses), dev loss is averaged over response tokens (not over batches) and perplexity is
its exponential; `predict` generates (greedy by default) and writes JSON Lines: each input row
with its `generation`, in the input file's order. Checkpoints hold the trainable tensors only,
as for encoders, with the same identity checks (method, backbone).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_modules.base import (
    CheckpointMismatchError,
    ModelConfigError,
    PELTModule,
    check_options,
    check_training_options,
    saved_identity,
)
from unipelt import PRESETS, PELTConfig, PELTError, apply_pelt, count_trainable, spec_for
from unipelt.io import identity

TASK = "instruct"  # what checkpoints record as their task
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLMModule(PELTModule):
    """A frozen decoder LLM with gated UniPELT submodules, trained on instruction data.

    Args:
        model_name_or_path: hub name or local folder of the pretrained decoder.
        gguf_file: a GGUF file inside that folder (dequantised by transformers; needs `gguf`).
        dtype: the backbone's weights' dtype (``float32``, ``bfloat16``); new submodules take it too.
        method, pelt_overrides, learning_rate, weight_decay, warmup_ratio, adam_epsilon: as for encoders.
        max_new_tokens: tokens generated per prompt by `predict`.
        do_sample: sample instead of greedy decoding (then `generation_kwargs` may set temperature...).
        generation_kwargs: any other `generate()` keyword arguments.
        predict_output: where `predict` writes its JSON Lines (default `<default_root_dir>/generations.jsonl`).
        early_stopping_patience, checkpoint_every_n_steps: as for encoders (monitoring dev loss).
    """

    monitor_mode = "min"  # dev loss

    def __init__(
        self,
        model_name_or_path: str = "Qwen/Qwen2.5-0.5B",
        gguf_file: str | None = None,
        dtype: str = "float32",
        method: str = "unipelt_apl",
        pelt_overrides: dict[str, Any] | None = None,
        learning_rate: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        adam_epsilon: float = 1e-8,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        generation_kwargs: dict[str, Any] | None = None,
        predict_output: str | None = None,
        early_stopping_patience: int | None = 5,
        checkpoint_every_n_steps: int | None = 500,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_training_options(learning_rate, weight_decay, warmup_ratio, early_stopping_patience,
                               checkpoint_every_n_steps)
        check_options(
            dtype=(dtype, dtype in DTYPES, f"one of {', '.join(DTYPES)}"),
            max_new_tokens=(max_new_tokens, isinstance(max_new_tokens, int) and max_new_tokens >= 1, ">= 1"),
        )
        if method not in PRESETS:
            raise PELTError(f"--model.method {method!r} is not a preset; choose one of {', '.join(PRESETS)}")
        self.pelt_config = PELTConfig.preset(method, **(pelt_overrides or {}))
        self.learning_rate = learning_rate if learning_rate is not None else PRESETS[method].learning_rate
        self.model = self._build_model()
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self.main_metric = "val/loss"  # lower is better: monitor_mode "min"
        self.val_loss = MeanMetric()  # weighted by response tokens: a token-level mean over the split
        self.test_loss = MeanMetric()
        self._tokenizer: Any = None
        self._generations: dict[int, str] = {}

    # ----------------------------------------------------------------------------- model
    def _build_model(self) -> torch.nn.Module:
        h = self.hparams
        try:
            model = AutoModelForCausalLM.from_pretrained(h.model_name_or_path, gguf_file=h.gguf_file,
                                                         dtype=DTYPES[h.dtype])
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ModelConfigError(
                f"--model.model_name_or_path {str(h.model_name_or_path)!r} is not a causal LM folder or hub "
                f"name ({first})"
            ) from None
        return apply_pelt(model, self.pelt_config).train()  # from_pretrained returns eval mode

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            self._tokenizer = getattr(dm, "tokenizer", None) or AutoTokenizer.from_pretrained(
                self.hparams.model_name_or_path, gguf_file=self.hparams.gguf_file)
        return self._tokenizer

    @property
    def max_input_length(self) -> int:
        return spec_for(self.model).max_input_length(self.model.config)

    # ----------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.checked_loss(self.model(**batch).loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metric: MeanMetric, stage: str) -> None:
        loss = self.model(**batch).loss
        tokens = (batch["labels"][:, 1:] != -100).sum()  # the causal shift: the first label is never predicted
        if tokens > 0:
            metric.update(loss.float(), weight=tokens.float())
        self.log(f"{stage}/loss", metric, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_loss, "test")

    def on_validation_epoch_end(self) -> None:
        self.log("val/perplexity", torch.exp(self.val_loss.compute()))

    def on_test_epoch_end(self) -> None:
        self.log("test/perplexity", torch.exp(self.test_loss.compute()))

    # ----------------------------------------------------------------------------- generation
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """Greedy (or sampled) continuations of a left-padded batch, decoded without special tokens."""
        tok, h = self.tokenizer, self.hparams
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=h.max_new_tokens,
            do_sample=h.do_sample, pad_token_id=pad, **(h.generation_kwargs or {}),
        )
        return tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[tuple[int, str]]:
        texts = self.generate(batch["input_ids"], batch["attention_mask"])
        pairs = list(zip(batch["row"].tolist(), texts, strict=True))
        self._generations.update(pairs)
        return pairs

    def on_predict_epoch_start(self) -> None:
        self._generations = {}

    def on_predict_epoch_end(self) -> None:
        """Write every input row with its generation, in the input file's order (one process)."""
        if self.trainer.world_size > 1:
            raise RuntimeError("predict writes its file from one process; run it without DDP")
        rows = self.trainer.datamodule.predict_rows
        path = Path(self.hparams.predict_output or Path(self.trainer.default_root_dir) / "generations.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            for i, row in enumerate(rows):
                f.write(json.dumps({**row, "generation": self._generations[i]}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        self.predictions_path = path

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint_identity(self) -> dict[str, Any]:
        """unipelt.io's identity (method, PELT config, backbone) and the task, ``instruct``."""
        return {**identity(self.model, str(self.hparams.model_name_or_path)), "task": TASK}

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Raise CheckpointMismatchError naming what differs (method, backbone, task) if `checkpoint` is not ours."""
        saved = saved_identity(checkpoint, self.model)
        if saved.get("task") != TASK:
            raise CheckpointMismatchError(f"task differs: the checkpoint was trained on {saved.get('task')!r}, "
                                          f"not on instruction data")
        self.check_complete(checkpoint)

    def parameter_counts(self) -> dict[str, int]:
        return {"trainable_params": count_trainable(self.model),
                "total_params": sum(p.numel() for p in self.model.parameters())}
