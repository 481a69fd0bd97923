"""Writing `predict`'s outputs: one file (or GLUE's leaderboard files) in the input's order, from every rank.

`PredictionWriter` collects each rank's `predict_step` outputs, gathers them on rank 0 (under DDP each
rank predicts a share of the rows) and has the module write them: a classifier writes your file's
rows with their predictions or GLUE's leaderboard files, a decoder writes each row with its generation.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from datamodules.tasks import TaskInfo
from lightning_modules.errors import UsageError
from unipelt.atomic import atomic_write

FILE_FORMATS = (".csv", ".tsv", ".jsonl", ".json")  # what your file's predictions can be written as
GENERATION = "generation"  # the column a decoder's predictions add to each row


def added_columns(task: TaskInfo) -> list[str]:
    """The columns a classifier's predictions add to your file's: `prediction`, and `prob_<label>` per label."""
    return ["prediction"] + ([] if task.is_regression else [f"prob_{label}" for label in task.label_names])


def check_new_columns(columns: Any, added: list[str], source: str) -> None:
    """UsageError, before predicting, when an input column has the name of one the predictions add: an input
    column is never replaced."""
    if clash := [name for name in added if name in set(columns)]:
        raise UsageError(f"{source} already has the column(s) {clash}, which predict writes; rename them in the "
                         "file (an input column is never replaced)")


class PredictionWriter(pl.Callback):
    """Every rank's `predict_step` outputs, gathered on rank 0 and written there by the module to ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.written: list[Path] = []
        self._outputs: list[list[Any]] = []

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._outputs = [[] for _ in trainer.num_predict_batches]

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._outputs[dataloader_idx].append(outputs)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        outputs = gather_on_rank_zero(self._outputs, trainer.world_size)
        self._outputs = []
        if trainer.is_global_zero:
            self.written = pl_module.write_predictions(outputs, trainer.datamodule, self.target)
            for path in self.written:
                print(f"predictions: {path}", flush=True)


def gather_on_rank_zero(per_loader: list[list[Any]], world_size: int) -> list[list[Any]]:
    """Each loader's batch outputs from every rank, on rank 0 (other ranks get theirs back)."""
    if world_size == 1:
        return per_loader
    dist = torch.distributed
    ranks: list[Any] | None = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(per_loader, ranks, dst=0)
    if ranks is None:
        return per_loader
    return [[batch for rank in ranks for batch in rank[i]] for i in range(len(per_loader))]


# ----------------------------------------------------------------------------- a classifier's predictions
def _rows_in_order(batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Concatenate batch outputs and put the rows back in input order (evaluation runs longest first)."""
    merged = {k: torch.cat([b[k] for b in batches]) for k in batches[0]} if batches else {}
    if not merged:
        return {}
    order = torch.argsort(merged["idx"])
    return {k: v[order] for k, v in merged.items()}


def prediction_values(rows: dict[str, torch.Tensor], task: TaskInfo, label_ids: bool = False) -> list[Any]:
    """Label names (or ids, as some GLUE leaderboard files want), or regression scores."""
    if not rows:
        return []
    if task.is_regression:
        return [float(v) for v in rows["prediction"].tolist()]
    if label_ids:
        return [int(v) for v in rows["prediction"].tolist()]
    return [task.label_names[int(v)] for v in rows["prediction"].tolist()]


def write_predictions(outputs: list[list[dict[str, Any]]], dm: Any, task: TaskInfo, target: Path) -> list[Path]:
    """``outputs``: one list of batch outputs per predict loader (in `dm.predict_splits`' order)."""
    splits = dm.predict_splits  # {split: output name}, in the loaders' order
    per_loader = [_rows_in_order(batches) for batches in outputs]
    if dm.predict_file is not None:
        return [write_file_predictions(dm.predict_table().columns, per_loader[0], task, target)]
    return [
        write_glue_submission(rows, task, target / f"{name}.tsv", ax=split.endswith(":ax"))
        for (split, name), rows in zip(splits.items(), per_loader, strict=True)
    ]


def write_file_predictions(columns: dict[str, list[Any]], rows: dict[str, torch.Tensor], task: TaskInfo,
                           path: Path) -> Path:  # fmt: skip
    """The input columns, then `prediction` and one `prob_<label>` per label (classification)."""
    n = len(next(iter(columns.values()), []))
    if rows and len(rows["idx"]) != n:
        raise RuntimeError(f"predicted {len(rows['idx'])} rows of {n}")
    check_new_columns(columns, added_columns(task), str(path))
    out: dict[str, list[Any]] = {k: list(v) for k, v in columns.items()}
    out["prediction"] = prediction_values(rows, task)
    if not task.is_regression and rows:
        for j, label in enumerate(task.label_names):
            out[f"prob_{label}"] = [round(float(p), 6) for p in rows["probs"][:, j].tolist()]
    names = list(out)
    suffix = path.suffix.lower()
    with atomic_write(path, newline="") as f:
        if suffix in (".jsonl", ".json"):
            for i in range(n):
                f.write(json.dumps({k: out[k][i] for k in names}, ensure_ascii=False) + "\n")
        else:
            writer = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",", lineterminator="\n")
            writer.writerow(names)
            for i in range(n):
                writer.writerow(["" if out[k][i] is None else out[k][i] for k in names])
    return path


def write_glue_submission(rows: dict[str, torch.Tensor], task: TaskInfo, path: Path, ax: bool = False) -> Path:
    """`index<TAB>prediction` per test row, labels as GLUE's scorer reads them (ids for CoLA, SST-2,
    MRPC, QQP; names for MNLI, QNLI, RTE and AX; scores for STS-B)."""
    values = prediction_values(rows, task, label_ids=task.submission_label_ids and not ax)
    index = rows["idx"].tolist() if rows else []
    with atomic_write(path, newline="") as f:
        f.write("index\tprediction\n")
        for i, v in zip(index, values, strict=True):
            f.write(f"{i}\t{v:.3f}\n" if isinstance(v, float) else f"{i}\t{v}\n")
    return path


# ----------------------------------------------------------------------------- a decoder's generations
def write_generations(rows: list[dict[str, Any]], outputs: list[list[tuple[int, str]]], path: Path) -> Path:
    """Every input row with its `generation` (``outputs``: batches of (row number, text)), as JSON Lines
    in the input file's order."""
    generations = dict(pair for batch in outputs for pair in batch)
    if missing := [i for i in range(len(rows)) if i not in generations]:
        raise RuntimeError(f"generated {len(generations)} rows of {len(rows)} (row {missing[0]} missing)")
    check_new_columns({key for row in rows for key in row}, [GENERATION], str(path))
    with atomic_write(path) as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({**row, GENERATION: generations[i]}, ensure_ascii=False) + "\n")
    return path
