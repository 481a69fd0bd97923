"""`python cli.py fit|validate|test --config configs/rte_k100.yaml`: UniPELT on GLUE through LightningCLI.

`fit` trains, keeps the best checkpoint by the task's main dev metric, then tests that checkpoint,
prints a summary and writes it to `<trainer.default_root_dir>/summary.json`. The console script
`unipelt` is this file; `unipelt reproduce`, `unipelt select` and `unipelt report` run the paper's grid (reproduce/).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from datamodules import DataConfigError, GLUEDataModule
from lightning_modules import (
    AtomicCheckpointIO,
    CheckpointFileError,
    CheckpointMismatchError,
    EpochTimer,
    ModelConfigError,
    UniPELTLightningModule,
    load_checkpoint_file,
)
from unipelt import PELTError, pelt_state_dict

SUMMARY_FILE = "summary.json"


class UsageError(ValueError):
    """A bad command-line value, reported in one line with exit code 2."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf: one line on stderr, exit code 1; the last good checkpoint stays."""


# Errors that are the user's input, not our bug: one line on stderr, exit code 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    PELTError,
    DataConfigError,
    ModelConfigError,
    CheckpointFileError,
    CheckpointMismatchError,
)
DIVERGED_EXIT_CODE = 1
# `ckpt_path` values Lightning resolves itself; anything else is a file.
_SPECIAL_CKPT = ("last", "best", "hpc", "registry")
_DATA_OPTIONS = frozenset(inspect.signature(GLUEDataModule.__init__).parameters) - {"self"}


def user_message(err: BaseException) -> str:
    """One line; the datamodule says `k_shot=0: ...`, which the command line knows as `--data.k_shot`."""
    text = " ".join(str(err).split()) or type(err).__name__
    match = re.match(r"(\w+)=", text)
    if isinstance(err, DataConfigError) and match and match.group(1) in _DATA_OPTIONS:
        text = "--data." + text
    return text


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _loggers(root: str) -> list[Any]:
    """CSV always (plain files, easy to aggregate); TensorBoard beside it when it is installed."""
    csv = CSVLogger(root, name="lightning_logs")
    loggers: list[Any] = [csv]
    try:
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(root, name="lightning_logs", version=csv.version, sub_dir="tensorboard"))
    except ImportError:
        pass
    return loggers


def default_run_dir(config: Any) -> Path:
    """One folder per distinct run, so that a method or seed switched on the command line never
    lands in another run's folder: runs/<task>_<k>/<method>/split<data seed>_seed<training seed>."""
    size = "full" if config.data.k_shot is None else f"k{config.data.k_shot}"
    task = str(config.data.task).lower().replace("-", "")
    return (
        Path("runs") / f"{task}_{size}" / config.model.method / f"split{config.data.seed}_seed{config.seed_everything}"
    )


class UniPELTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # State each thing once: the backbone also gives the tokenizer, the task also sets labels/metrics.
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.link_arguments("data.task", "model.task")
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Allow `fit` into a default_root_dir that already holds a finished run's summary.json.",
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning would load the checkpoint's hyperparameters over the command line here (a pickle
        traceback for a bad file; a checkpoint of another method or backbone silently taking over).
        Here the configuration states the run: the file is only checked (readable, written by unipelt),
        and `before_<subcommand>` says which of method, backbone and task differs, if any."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and str(ckpt_path) not in _SPECIAL_CKPT:
            load_checkpoint_file(ckpt_path, mmap=True)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(default_run_dir(config))
        if self.subcommand == "fit":
            summary = Path(config.trainer.default_root_dir) / SUMMARY_FILE
            if summary.exists() and not config.overwrite:
                raise UsageError(
                    f"--trainer.default_root_dir {str(summary.parent)!r} already holds a finished run "
                    f"({SUMMARY_FILE}); pass --overwrite true or choose another folder"
                )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.logger in (None, True):
            trainer.loggers = _loggers(trainer.default_root_dir)
        trainer.callbacks.append(EpochTimer())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    # ------------------------------------------------------------------ checks before anything is written
    def _check_inputs(self) -> None:
        """Everything that can be wrong with the input, checked before Lightning writes a log folder or a
        checkpoint: the tokenizer, max_seq_length against the backbone, the data files (parsed by
        prepare_data on the first process of a node) and a --ckpt_path (readable, ours, the same run)."""
        model, dm = self.model, self.datamodule
        path = model.hparams.model_name_or_path
        try:
            tokenizer = dm.tokenizer
        except Exception as err:  # transformers raises OSError, ValueError, TypeError... for a bad folder
            raise ModelConfigError(
                f"--model.model_name_or_path {str(path)!r}: no usable tokenizer ({_first_line(err)})"
            ) from None
        # transformers 5 makes an empty tokenizer (special tokens only) for a folder without tokenizer files.
        probe = tokenizer("the of and a to in is", add_special_tokens=False)["input_ids"]
        if tokenizer.unk_token_id is not None and all(i == tokenizer.unk_token_id for i in probe):
            raise ModelConfigError(
                f"--model.model_name_or_path {str(path)!r}: no usable tokenizer (its vocabulary is empty: "
                "tokenizer files missing?)"
            )
        embeddings = model.model.get_input_embeddings().num_embeddings
        if len(tokenizer) > embeddings:
            raise ModelConfigError(
                f"--model.model_name_or_path {str(path)!r}: the tokenizer has {len(tokenizer)} tokens but the "
                f"model embeds only {embeddings} (tokenizer files of another model?)"
            )
        if dm.hparams.max_seq_length > model.max_input_length:
            raise UsageError(
                f"--data.max_seq_length {dm.hparams.max_seq_length} is over the {model.max_input_length} "
                f"positions of --model.model_name_or_path {str(path)!r}"
            )
        if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP: the other ranks wait for it inside the trainer
            dm.prepare_data()
        self._check_ckpt_path()

    def _check_ckpt_path(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path is None:
            return
        if ckpt_path == "last":
            # Resolved here: Lightning looks in the trainer's own checkpoint folders before the model's
            # callbacks (which write to <default_root_dir>/checkpoints) are attached, and finds nothing.
            folder = Path(self.trainer.default_root_dir) / "checkpoints"
            found = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
            if not found:
                if self.subcommand != "fit":
                    raise UsageError(f"--ckpt_path last: no last*.ckpt in {str(folder)!r}")
                print(f"--ckpt_path last: no checkpoint in {str(folder)!r} yet; training from the start", flush=True)
                self.config_init[self.subcommand]["ckpt_path"] = None
                return
            ckpt_path = str(found[-1])
            self.config_init[self.subcommand]["ckpt_path"] = ckpt_path
        elif ckpt_path in _SPECIAL_CKPT:
            return
        checkpoint = load_checkpoint_file(ckpt_path, mmap=True)
        try:
            self.model.check_checkpoint(checkpoint)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(f"--ckpt_path {str(ckpt_path)!r}: {err}") from None

    def before_validate(self) -> None:
        self._check_inputs()

    def before_test(self) -> None:
        self._check_inputs()

    def fit(self, **kwargs: Any) -> None:
        try:
            self.trainer.fit(**kwargs)
        except FloatingPointError as err:
            kept = [
                str(p)
                for c in self.trainer.checkpoint_callbacks
                for p in (getattr(c, "last_model_path", ""), c.best_model_path)
                if p and Path(p).exists()
            ]
            where = f"; the last good checkpoints are kept: {', '.join(dict.fromkeys(kept))}" if kept else ""
            raise TrainingDiverged(f"training stopped: {err}{where}") from None

    def after_fit(self) -> None:
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        fit_time = time.perf_counter() - self._fit_start
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt else ""
        # Read before `test`: it attaches fresh callbacks from configure_callbacks, without fit's scores.
        best_score = float(ckpt.best_model_score) if ckpt and ckpt.best_model_score is not None else None
        if trainer.interrupted:
            return
        test_start = time.perf_counter()
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        test_time = time.perf_counter() - test_start
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call: every rank
        self._write_summary(results, best, best_score, fit_time, test_time, log_dir)

    def before_fit(self) -> None:
        self._check_inputs()
        self._fit_start = time.perf_counter()

    @rank_zero_only
    def _write_summary(
        self,
        results: list[dict[str, float]],
        best: str,
        best_score: float | None,
        fit_time: float,
        test_time: float,
        log_dir: Path,
    ) -> None:
        trainer, model, dm = self.trainer, self.model, self.datamodule
        timer = next(c for c in trainer.callbacks if isinstance(c, EpochTimer))
        test = {k: float(v) for r in results for k, v in r.items() if not k.endswith("/loss")}
        export = None
        if model.hparams.method != "finetune":
            export = log_dir / "pelt_weights.pt"
            torch.save(pelt_state_dict(model.model), export)
        summary = {
            "task": model.task_info.name,
            "k_shot": dm.hparams.k_shot,
            "method": model.hparams.method,
            "data_seed": dm.hparams.seed,
            "seed": self.config.fit.seed_everything,
            "model_name_or_path": str(model.hparams.model_name_or_path),
            "learning_rate": model.learning_rate,
            "best_val": {"name": model.main_metric, "value": best_score},
            "test": test,
            "best_checkpoint": best,
            "exported_weights": str(export) if export else None,
            **model.parameter_counts(),
            "epochs": trainer.current_epoch,
            "global_steps": trainer.global_step,
            "fit_time_s": fit_time,
            "train_time_per_epoch_s": sum(timer.epoch_times) / max(1, len(timer.epoch_times)),
            "test_time_s": test_time,
            "test_examples": model.last_test_examples,
            "gates": model.last_test_gates,
        }
        write_json_atomic(Path(trainer.default_root_dir) / SUMMARY_FILE, summary)
        print_summary(summary)


def print_summary(summary: dict[str, Any]) -> None:
    best = summary["best_val"]
    lines = [
        "",
        f"== UniPELT run: {summary['task']} K={summary['k_shot'] or 'full'} method={summary['method']} "
        f"(split seed {summary['data_seed']}, training seed {summary['seed']}) ==",
        f"best dev   : {best['name']} = {best['value'] if best['value'] is None else round(best['value'], 4)}",
        *(f"test       : {k} = {v:.4f}" for k, v in sorted(summary["test"].items())),
        f"checkpoint : {summary['best_checkpoint'] or '(none)'}",
        f"weights    : {summary['exported_weights'] or '(fine-tuning: the checkpoint is the model)'}",
        f"trainable  : {summary['trainable_params']:,} of {summary['total_params']:,} parameters "
        f"({100 * summary['trainable_params'] / summary['total_params']:.2f}%)",
        f"time       : fit {summary['fit_time_s']:.1f}s over {summary['epochs']} epochs, "
        f"test {summary['test_time_s']:.1f}s",
    ]
    print("\n".join(lines), flush=True)


def build_cli(args: list[str] | None, run: bool = True) -> UniPELTCLI:
    """The CLI object (tests and the grid runner reach trainer, model and datamodule through it)."""
    return UniPELTCLI(
        UniPELTLightningModule,
        GLUEDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in ("reproduce", "select", "report"):
        from reproduce import main as reproduce_main

        sys.exit(reproduce_main(argv))
    from lightning_modules.instruct_cli import build_instruct_cli, is_instruct_run  # decoders, instruction data

    build = build_instruct_cli if is_instruct_run(argv) else build_cli
    try:
        build(None if args is None else argv)
    except USER_ERRORS as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT_CODE)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


if __name__ == "__main__":
    # Run the `cli` module, not `__main__`: lightning_modules.instruct_cli subclasses this file's CLI and
    # raises its errors, which must be the classes main() catches.
    from cli import main as cli_main

    cli_main()
