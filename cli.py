"""`python cli.py fit|validate|test --config configs/rte_k100.yaml`: UniPELT on GLUE through LightningCLI.

`fit` trains, keeps the best checkpoint by the task's main dev metric, then tests that checkpoint,
prints a summary and writes it to `<trainer.default_root_dir>/summary.json`. The console script
`unipelt` is this file; `unipelt reproduce` and `unipelt report` run the paper's grid (reproduce/).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from datamodules import DataConfigError, GLUEDataModule
from lightning_modules import CheckpointMismatchError, EpochTimer, UniPELTLightningModule
from unipelt import PELTError, pelt_state_dict

SUMMARY_FILE = "summary.json"


class UsageError(ValueError):
    """A bad command-line value, reported in one line with exit code 2."""


# Errors that are the user's input, not our bug: one line on stderr, exit code 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    PELTError,
    DataConfigError,
    CheckpointMismatchError,
)


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

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
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
        if self.config[self.subcommand].trainer.logger in (None, True):
            trainer.loggers = _loggers(trainer.default_root_dir)
        trainer.callbacks.append(EpochTimer())
        return trainer

    def after_fit(self) -> None:
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        fit_time = time.perf_counter() - self._fit_start
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if trainer.interrupted:
            return
        test_start = time.perf_counter()
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        test_time = time.perf_counter() - test_start
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call: every rank
        self._write_summary(results, best, fit_time, test_time, log_dir)

    def before_fit(self) -> None:
        self._fit_start = time.perf_counter()

    @rank_zero_only
    def _write_summary(
        self, results: list[dict[str, float]], best: str, fit_time: float, test_time: float, log_dir: Path
    ) -> None:
        trainer, model, dm = self.trainer, self.model, self.datamodule
        timer = next(c for c in trainer.callbacks if isinstance(c, EpochTimer))
        ckpt = trainer.checkpoint_callback
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
            "best_val": {
                "name": model.main_metric,
                "value": float(ckpt.best_model_score) if ckpt and ckpt.best_model_score is not None else None,
            },
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
    if argv and argv[0] in ("reproduce", "report"):
        from reproduce import main as reproduce_main

        sys.exit(reproduce_main(argv))
    try:
        build_cli(None if args is None else argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
