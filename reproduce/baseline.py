"""Majority-class baseline: the paper metric of always predicting the train set's majority label.

It shows where a model has not left the majority class (a real risk at K=100). The report takes
any ``task -> score`` mapping or callable, so a datamodule can supply it; ``from_glue_dir`` reads
the labels straight from the GLUE TSV files (train majority over the full train set, scored on
GLUE dev, which is the paper's test set).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

# task -> (folder, train file, test file, header?, label column name or index)
_GLUE = {
    "cola": ("CoLA", "train.tsv", "dev.tsv", False, 1),
    "sst2": ("SST-2", "train.tsv", "dev.tsv", True, "label"),
    "mrpc": ("MRPC", "train.tsv", "dev.tsv", True, "Quality"),
    "stsb": ("STS-B", "train.tsv", "dev.tsv", True, "score"),
    "qqp": ("QQP", "train.tsv", "dev.tsv", True, "is_duplicate"),
    "mnli": ("MNLI", "train.tsv", "dev_matched.tsv", True, "gold_label"),
    "qnli": ("QNLI", "train.tsv", "dev.tsv", True, "label"),
    "rte": ("RTE", "train.tsv", "dev.tsv", True, "label"),
}


def majority_score(task: str, train_labels: list, test_labels: list) -> float | None:
    """Paper metric (percent) of predicting the train majority; None where undefined (STS-B)."""
    if task == "stsb":
        return None  # a constant prediction has no correlation
    if task == "cola":
        return 0.0  # Matthews correlation of a constant prediction
    majority = Counter(map(str, train_labels)).most_common(1)[0][0]
    test = [str(y) for y in test_labels]
    if task in ("mrpc", "qqp"):  # F1 of the positive class "1"
        if majority != "1":
            return 0.0
        p = test.count("1") / len(test)  # precision; recall is 1
        return 100.0 * 2 * p / (1 + p)
    return 100.0 * test.count(majority) / len(test)


def _labels(path: Path, header: bool, col: str | int) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if header:
            names = next(rows)
            col = names.index(col)
        return [r[col] for r in rows if len(r) > col]


def from_glue_dir(data_dir: Path, tasks: list[str]) -> dict[str, float | None]:
    """Majority baselines of the tasks whose GLUE files are present under ``data_dir``."""
    out = {}
    for task in tasks:
        folder, train, test, header, col = _GLUE[task]
        d = Path(data_dir) / folder
        if (d / train).exists() and (d / test).exists():
            out[task] = majority_score(task, _labels(d / train, header, col), _labels(d / test, header, col))
    return out
