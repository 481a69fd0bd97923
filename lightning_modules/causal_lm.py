"""CausalLMModule: a decoder LLM with UniPELT, instruction-tuned; dev loss and perplexity; generations.

The counterpart of `UniPELTLightningModule` for `AutoModelForCausalLM` backbones and
`datamodules.instruct.InstructionDataModule`: the loss is Hugging Face's (labels -100 outside
the responses), dev loss is averaged over response tokens (not over batches) and perplexity is
its exponential; `predict` generates (greedy by default) and writes JSON Lines: each input row
with its `generation`, in the input file's order. Checkpoints hold the trainable tensors only,
as for encoders, with the same identity checks (method, backbone).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM

from datamodules.hub import DECODER_HINT, load_tokenizer
from datamodules.instruct import read_rows
from lightning_modules.base import CheckpointMismatchError, PELTModule, check_options, load_backbone
from lightning_modules.errors import ModelConfigError
from lightning_modules.predictions import GENERATION, check_new_columns, write_generations
from unipelt.io import identity

TASK = "instruct"  # what checkpoints record as their task
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_PACKAGES = ("gguf", "accelerate")  # what transformers needs to read a GGUF file: setup.cfg's extra `gguf`


def check_gguf_packages(gguf_file: str | None) -> None:
    """A GGUF file needs packages unipelt does not require: say which, and the extra that installs them."""
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if gguf_file and missing:
        raise ModelConfigError(
            f"--model.gguf_file {gguf_file!r}: reading a GGUF file needs {' and '.join(missing)}, not installed; "
            f"pip install -e \".[gguf]\" in the clone of unipelt (or pip install {' '.join(missing)})"
        )


class CausalLMModule(PELTModule):
    """A frozen decoder LLM with gated UniPELT submodules, trained on instruction data.

    Args:
        model_name_or_path: hub name or local folder of the pretrained decoder.
        gguf_file: a GGUF file inside that folder (dequantised by transformers; needs `gguf`).
        dtype: the backbone's weights' dtype (``float32``, ``bfloat16``); new submodules take it too.
        max_new_tokens: tokens generated per prompt by `predict`.
        do_sample: sample instead of greedy decoding (then `generation_kwargs` may set temperature...).
        generation_kwargs: any other `generate()` keyword arguments.
        predict_output: where `predict` writes its JSON Lines (default `<run folder>/generations.jsonl`;
            `--predictions` wins).
        early_stopping_patience: validation rounds without a lower dev loss before stopping; None: never.
        **kwargs: the method and training options of `PELTModule` (method, pelt_overrides, learning_rate, ...).
    """

    monitor_mode = "min"  # dev loss

    def __init__(
        self,
        model_name_or_path: str = "Qwen/Qwen2.5-0.5B",
        gguf_file: str | None = None,
        dtype: str = "float32",
        max_new_tokens: int = 64,
        do_sample: bool = False,
        generation_kwargs: dict[str, Any] | None = None,
        predict_output: str | None = None,
        early_stopping_patience: int | None = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_options(
            dtype=(dtype, dtype in DTYPES, f"one of {', '.join(DTYPES)}"),
            max_new_tokens=(max_new_tokens, isinstance(max_new_tokens, int) and max_new_tokens >= 1, ">= 1"),
        )
        self.configure_method(dict(self.hparams.pelt_overrides or {}))
        check_gguf_packages(gguf_file)
        self.model = self.adapt(load_backbone(AutoModelForCausalLM, model_name_or_path, "causal LM", hint=DECODER_HINT,
                                              gguf_file=gguf_file, dtype=DTYPES[dtype]))
        self.main_metric = "val/loss"  # lower is better: monitor_mode "min"
        self.val_loss = MeanMetric()  # weighted by response tokens: a token-level mean over the split
        self.test_loss = MeanMetric()
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            trainer = self.attached_trainer
            dm = getattr(trainer, "datamodule", None) if trainer is not None else None
            self._tokenizer = getattr(dm, "tokenizer", None) or load_tokenizer(
                self.hparams.model_name_or_path, DECODER_HINT, gguf_file=self.hparams.gguf_file)
        return self._tokenizer

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
        """(row number in the input file, generation) per prompt."""
        texts = self.generate(batch["input_ids"], batch["attention_mask"])
        return list(zip(batch["row"].tolist(), texts, strict=True))

    def predictions_path(self, datamodule: Any, given: str | None, run_folder: Path) -> Path:
        return Path(given or self.hparams.predict_output or run_folder / "generations.jsonl")

    def check_predictions(self, datamodule: Any, target: Path) -> list[Path]:
        """One JSON Lines file: each row with its `generation`, which no row may already have."""
        path = datamodule.hparams.predict_file
        if path is not None:
            rows = read_rows(path, "--data.predict_file")
            check_new_columns({key for row in rows for key in row}, [GENERATION], f"--data.predict_file {path!r}")
        return [target]

    def write_predictions(self, outputs: list[list[Any]], datamodule: Any, target: Path) -> list[Path]:
        return [write_generations(datamodule.predict_rows, outputs[0], target)]

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint_identity(self) -> dict[str, Any]:
        """unipelt.io's identity (method, PELT config, backbone) and the task, ``instruct``."""
        return {**identity(self.model, str(self.hparams.model_name_or_path)), "task": TASK}

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Raise CheckpointMismatchError naming what differs (method, backbone, task) if `checkpoint` is not ours."""
        saved = self.saved_identity(checkpoint)
        if saved.get("task") != TASK:
            raise CheckpointMismatchError(f"task differs: the checkpoint was trained on {saved.get('task')!r}, "
                                          f"not on instruction data")
        self.check_complete(checkpoint)

    # ----------------------------------------------------------------------------- the end of a run
    @property
    def task_name(self) -> str:
        return TASK

    def tests_after_fit(self, datamodule: Any) -> bool:
        """Only with a test set (a test file, or a hub dataset's test split): dev loss is the model selection."""
        h = datamodule.hparams
        return bool(h.test_file or (h.dataset and h.test_split))

    def test_scores(self, metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {k: float(v) for k, v in metrics.items()}  # the loss is the score (and perplexity its exponential)

    def summary_fields(self, datamodule: Any, best_val: dict[str, Any]) -> dict[str, Any]:
        value = best_val["value"]
        return {"best_val": {**best_val, "perplexity": None if value is None else math.exp(value)}}
