"""The end of a `fit`: `export/`, `summary.json`, the printed summary and the gate heatmap, for every kind of run.

`RunSummary` is a callback: it times the epochs, notes the best checkpoint when `fit` ends and, once
the best checkpoint has been tested (or right away when the run has no test set), writes from rank 0
only, with no collective call, so other ranks may already have left.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from lightning_modules.checkpointing import load_checkpoint_file
from unipelt import save_pretrained
from unipelt.atomic import write_json
from unipelt.io import portable_name

SUMMARY_FILE = "summary.json"
NO_TEST_FILE_NOTE = "(no test file: the test scores are the validation split's)"


class RunSummary(pl.Callback):
    """Writes `<default_root_dir>/summary.json` and `export/` when a `fit` (and its test) ends.

    Args:
        seed: the training seed (`seed_everything`), recorded beside the split seed.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.epoch_times: list[float] = []
        self._epoch_start = 0.0
        self._fit_start = self._test_start = 0.0
        self._fit: dict[str, Any] | None = None  # what `fit` left, until its test ends

    # ----------------------------------------------------------------------------- timing
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch()  # validation inside fit ends the epoch's training part

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch()

    def _end_epoch(self) -> None:
        if self._epoch_start:
            self.epoch_times.append(time.perf_counter() - self._epoch_start)
            self._epoch_start = 0.0

    # ----------------------------------------------------------------------------- fit, then its test
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start, self._fit, self.epoch_times = time.perf_counter(), None, []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        ckpt = trainer.checkpoint_callback
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        group = optimizer.param_groups[0] if optimizer is not None else {}
        self._fit = {
            "best": ckpt.best_model_path if ckpt else "",
            # Read now: the test after fit attaches fresh callbacks from configure_callbacks, without these scores.
            "best_score": float(ckpt.best_model_score) if ckpt and ckpt.best_model_score is not None else None,
            "fit_time_s": time.perf_counter() - self._fit_start,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "learning_rate": float(group.get("initial_lr", group.get("lr", pl_module.learning_rate))),
            "epochs": trainer.current_epoch,
            "global_steps": trainer.global_step,
        }
        if not pl_module.tests_after_fit(trainer.datamodule):
            if trainer.is_global_zero and self._fit["best"]:  # export the selected weights, as a test would load
                pl_module.load_trainable(load_checkpoint_file(self._fit["best"]))
            self._finish(trainer, pl_module, {}, None)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._test_start = time.perf_counter()

    def on_test_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self._fit is not None:  # the test of fit's best checkpoint (not a `cli.py test` of its own)
            test = pl_module.test_scores(trainer.callback_metrics)
            self._finish(trainer, pl_module, test, time.perf_counter() - self._test_start)

    def _finish(self, trainer: pl.Trainer, module: Any, test: dict[str, float], test_time: float | None) -> None:
        fit, self._fit = self._fit, None
        if fit is None or not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        dm = trainer.datamodule
        best_val = {"name": module.main_metric, "value": fit["best_score"]}
        extra = module.summary_fields(dm, best_val)
        export = None
        if module.hparams.method != "finetune":  # fine-tuning: the checkpoint is the model
            export = save_pretrained(module.model, root / "export",
                                     base_model_name_or_path=portable_name(module.hparams.model_name_or_path),
                                     k_shot=dm.hparams.k_shot, **module.card_info(test, extra))
        summary = {
            "task": module.task_name,
            "k_shot": dm.hparams.k_shot,
            "method": module.hparams.method,
            "data_seed": dm.hparams.seed,
            "seed": self.seed,
            "model_name_or_path": portable_name(module.hparams.model_name_or_path),
            "learning_rate": fit["learning_rate"],
            "optimizer": fit["optimizer"],
            "best_val": best_val,
            "test": test,
            "best_checkpoint": shown_path(fit["best"]) if fit["best"] else fit["best"],
            "exported_weights": shown_path(export) if export else None,
            **module.parameter_counts(),
            "train_examples": len(dm.datasets["train"]) if "train" in getattr(dm, "datasets", {}) else None,
            "epochs": fit["epochs"],
            "global_steps": fit["global_steps"],
            "fit_time_s": fit["fit_time_s"],
            "train_time_per_epoch_s": sum(self.epoch_times) / max(1, len(self.epoch_times)),
            "test_time_s": test_time,
            **extra,
        }
        write_json(root / SUMMARY_FILE, summary)
        print_summary(summary)
        if summary.get("gates"):
            from lightning_modules.gate_plot import plot_gate_heatmap

            title = f"{summary['task']}, {data_size(summary)}, {summary['method']}: mean gate on the test set"
            png = plot_gate_heatmap(summary["gates"], root / "gates.png", title)
            print(f"gates      : {shown_path(png)}" if png else "gates      : (no heatmap: pip install matplotlib)",
                  flush=True)


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as a user types it where the run started: relative to the working directory when it lies
    under it (Lightning makes checkpoint paths absolute), else as it is (a folder the user placed elsewhere)."""
    try:
        return Path(os.path.realpath(path)).relative_to(os.path.realpath(Path.cwd())).as_posix()
    except ValueError:
        return str(path)


def data_size(summary: dict[str, Any]) -> str:
    """``K=100``, or for the whole training set its size: ``all 300 training examples``."""
    if summary["k_shot"]:
        return f"K={summary['k_shot']}"
    n = summary.get("train_examples")
    return f"all {n:,} training examples" if n is not None else "all training examples"


def print_summary(summary: dict[str, Any]) -> None:
    best = summary["best_val"]
    value = best["value"] if best["value"] is None else round(best["value"], 4)
    perplexity = f" (perplexity {best['perplexity']:.4g})" if best.get("perplexity") is not None else ""
    test_time = "no test set" if summary["test_time_s"] is None else f"test {summary['test_time_s']:.1f}s"
    lines = [
        "",
        f"== UniPELT run: {summary['task']}, {data_size(summary)}, method={summary['method']} "
        f"(split seed {summary['data_seed']}, training seed {summary['seed']}) ==",
        f"best dev   : {best['name']} = {value}{perplexity}",
        *(f"test       : {k} = {v:.4f}" for k, v in sorted(summary["test"].items())),
        *([NO_TEST_FILE_NOTE] if summary.get("test_split", "test") != "test" else []),
        f"checkpoint : {summary['best_checkpoint'] or '(none)'}",
        f"weights    : {summary['exported_weights'] or '(fine-tuning: the checkpoint is the model)'}",
        f"trainable  : {summary['trainable_params']:,} parameters, {summary['trainable_pct']:.2f}% of the "
        f"backbone's {summary['backbone_params']:,}",
        f"optimizer  : {summary['optimizer']}, learning rate {summary['learning_rate']:g}",
        f"time       : fit {summary['fit_time_s']:.1f}s over {summary['epochs']} epoch"
        f"{'' if summary['epochs'] == 1 else 's'}, {test_time}",
    ]
    print("\n".join(lines), flush=True)
