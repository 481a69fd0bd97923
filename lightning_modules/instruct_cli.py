"""`cli.py fit|validate|test|predict` for instruction tuning a decoder: CausalLMModule + InstructionDataModule.

cli.py sends a command here when `is_instruct_run(argv)`: a `--config` file or an option names a
setting only instruction runs have (`data.prompt_field`, `model.max_new_tokens`, ...), or the
`--ckpt_path` checkpoint was written by an instruction run. Everything else (error handling,
loggers, atomic checkpoints, `--ckpt_path last`, the input checks) is cli.py's UniPELTCLI.

With `--ckpt_path`, the checkpoint states the model (backbone, GGUF file, method and its
overrides) and, unless the command line names them, how rows were rendered (fields, chat
template, max_seq_length): `python cli.py predict --ckpt_path best.ckpt --data.predict_file
prompts.jsonl` needs no config. The other settings (max_new_tokens, ...) come from the command line.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pytorch_lightning.cli import LightningArgumentParser

from cli import _SPECIAL_CKPT, SUMMARY_FILE, UniPELTCLI, UsageError, write_json_atomic
from datamodules.instruct import InstructionDataModule
from lightning_modules.causal_lm import TASK, CausalLMModule
from lightning_modules.checkpointing import CHECKPOINT_KEY, load_checkpoint_file
from unipelt import pelt_state_dict

# Settings only instruction runs have: naming one selects this CLI.
# Options only instruction runs have (`--data.predict_file` is shared with classification: a predict
# from a checkpoint is routed by the checkpoint's task).
MARKERS = {"data": ("prompt_field", "response_field", "messages_field", "use_chat_template", "bucket_batches"),
           "model": ("max_new_tokens", "gguf_file", "generation_kwargs", "predict_output")}
IDENTITY = ("model_name_or_path", "gguf_file", "dtype", "method", "pelt_overrides")
# How training rendered its rows: a predict from its checkpoint renders prompts the same way unless told otherwise.
DATA_RENDERING = ("prompt_field", "response_field", "messages_field", "use_chat_template", "max_seq_length")


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _ckpt_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
    return None


def is_instruct_run(argv: list[str]) -> bool:
    """Whether a `fit/validate/test/predict` command line is an instruction-tuning run (see the module doc)."""
    for section, keys in MARKERS.items():
        if any(a.split("=", 1)[0] in {f"--{section}.{k}" for k in keys} for a in argv):
            return True
    for path in _config_files(argv):
        try:
            config = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # the regular CLI reports an unreadable config
        if isinstance(config, dict) and any(
            isinstance(config.get(s), dict) and any(k in config[s] for k in keys) for s, keys in MARKERS.items()
        ):
            return True
    ckpt = _ckpt_arg(argv)
    if ckpt and ckpt not in _SPECIAL_CKPT and Path(ckpt).is_file():
        try:
            return load_checkpoint_file(ckpt, mmap=True)[CHECKPOINT_KEY].get("task") == TASK
        except Exception:  # the regular CLI reports a bad checkpoint in one line
            return False
    return False


class InstructCLI(UniPELTCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args")
        self._argv = [str(a) for a in given] if isinstance(given, list) else sys.argv[1:]
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.link_arguments("model.gguf_file", "data.gguf_file")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="Allow `fit` into a default_root_dir that already holds a summary.json.")

    def _parse_ckpt_path(self) -> None:
        """The checkpoint states the model: its identity settings replace the config's (see the module doc)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is None or str(ckpt_path) in _SPECIAL_CKPT:
            return
        checkpoint = load_checkpoint_file(ckpt_path, mmap=True)
        saved = checkpoint.get("hyper_parameters", {})
        config = self.config[subcommand]
        for key in IDENTITY:
            if key in saved:
                config.model[key] = saved[key]
        saved_data = checkpoint.get("datamodule_hyper_parameters", {})
        given = {a.split("=", 1)[0] for a in self._argv}
        for key in DATA_RENDERING:
            if key in saved_data and f"--data.{key}" not in given:
                config.data[key] = saved_data[key]
        config.data.model_name_or_path = config.model.model_name_or_path
        config.data.gguf_file = config.model.gguf_file

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "predict":
            config.trainer.logger = False  # predicting leaves no version_N folder
        if config.trainer.default_root_dir is None:
            size = "full" if config.data.k_shot is None else f"k{config.data.k_shot}"
            config.trainer.default_root_dir = str(
                Path("runs") / f"instruct_{size}" / config.model.method
                / f"split{config.data.seed}_seed{config.seed_everything}")
        if self.subcommand == "fit":
            summary = Path(config.trainer.default_root_dir) / SUMMARY_FILE
            if summary.exists() and not config.overwrite:
                raise UsageError(
                    f"--trainer.default_root_dir {str(summary.parent)!r} already holds a finished run "
                    f"({SUMMARY_FILE}); pass --overwrite true or choose another folder"
                )

    def before_predict(self) -> None:
        self._check_inputs()
        target = self.config.predict.get("predictions")  # cli.py's --predictions: the JSON Lines file
        if target is not None:
            self.model.hparams.predict_output = target

    def predict(self, **kwargs: Any) -> None:
        self.trainer.predict(**{**kwargs, "return_predictions": False})
        print(f"generations: {self.model.predictions_path}", flush=True)

    def after_fit(self) -> None:
        trainer, model, dm = self.trainer, self.model, self.datamodule
        fit_time = time.perf_counter() - self._fit_start
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt else ""
        best_loss = float(ckpt.best_model_score) if ckpt and ckpt.best_model_score is not None else None
        if trainer.interrupted:
            return
        test: dict[str, float] = {}
        if dm.hparams.test_file or (dm.hparams.dataset and dm.hparams.test_split):
            results = trainer.test(model, datamodule=dm, ckpt_path=best or None, verbose=False)
            test = {k: float(v) for r in results for k, v in r.items()}
        if trainer.is_global_zero:
            self._write_instruct_summary(best, best_loss, test, fit_time)

    def _write_instruct_summary(self, best: str, best_loss: float | None, test: dict[str, float],
                                fit_time: float) -> None:
        trainer, model, dm = self.trainer, self.model, self.datamodule
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        export = None
        if model.hparams.method != "finetune":
            export = log_dir / "pelt_weights.pt"
            torch.save(pelt_state_dict(model.model), export)
        summary: dict[str, Any] = {
            "task": TASK,
            "k_shot": dm.hparams.k_shot,
            "method": model.hparams.method,
            "data_seed": dm.hparams.seed,
            "seed": self.config.fit.seed_everything,
            "model_name_or_path": str(model.hparams.model_name_or_path),
            "learning_rate": model.learning_rate,
            "best_val": {"name": "val/loss", "value": best_loss,
                         "perplexity": None if best_loss is None else math.exp(best_loss)},
            "test": test,
            "best_checkpoint": best,
            "exported_weights": str(export) if export else None,
            **model.parameter_counts(),
            "epochs": trainer.current_epoch,
            "global_steps": trainer.global_step,
            "fit_time_s": fit_time,
        }
        write_json_atomic(Path(trainer.default_root_dir) / SUMMARY_FILE, summary)
        print(f"\n== UniPELT instruction run: {model.hparams.method} on {model.hparams.model_name_or_path} ==\n"
              f"best dev   : loss {best_loss} (perplexity {summary['best_val']['perplexity']})\n"
              f"checkpoint : {best or '(none)'}\n"
              f"trainable  : {summary['trainable_params']:,} of {summary['total_params']:,} parameters", flush=True)


def build_instruct_cli(args: list[str] | None, run: bool = True) -> InstructCLI:
    return InstructCLI(CausalLMModule, InstructionDataModule, args=args, run=run,
                       save_config_kwargs={"overwrite": True}, seed_everything_default=0)
