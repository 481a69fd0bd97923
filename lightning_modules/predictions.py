"""Writing `predict`'s outputs: your file's rows with their predictions, or GLUE's leaderboard files."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from datamodules.tasks import TaskInfo


def _per_loader(outputs: Any, n: int) -> list[list[dict[str, Any]]]:
    """Lightning returns a list of batch outputs for one loader, a list of such lists for several."""
    if n == 1:
        return [list(outputs or [])]
    return [list(o or []) for o in outputs]


def _gather(batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
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


@contextmanager
def _atomic(path: Path) -> Iterator[IO[str]]:
    """Write beside the target and rename: a reader never sees half a file, a failure leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_predictions(outputs: Any, dm: Any, task: TaskInfo, target: Path) -> list[Path]:
    splits = dm.predict_splits  # {split: output name}, in the loaders' order
    per_loader = [_gather(b) for b in _per_loader(outputs, len(splits))]
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
    out: dict[str, list[Any]] = {k: list(v) for k, v in columns.items()}
    out["prediction"] = prediction_values(rows, task)
    if not task.is_regression and rows:
        for j, label in enumerate(task.label_names):
            out[f"prob_{label}"] = [round(float(p), 6) for p in rows["probs"][:, j].tolist()]
    names = list(out)
    suffix = path.suffix.lower()
    with _atomic(path) as f:
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
    with _atomic(path) as f:
        f.write("index\tprediction\n")
        for i, v in zip(index, values, strict=True):
            f.write(f"{i}\t{v:.3f}\n" if isinstance(v, float) else f"{i}\t{v}\n")
    return path
