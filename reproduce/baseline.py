"""Majority-class baseline: the paper metric of always predicting the train set's majority label.

It shows where a model has not left the majority class (a real risk at K=100). The report takes
any ``task -> score`` mapping or callable; ``from_glue_dir`` reads the labels with ``datamodules``'
own GLUE reader (train majority over the full train set, scored on the GLUE dev split that is
the paper's test set).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from datamodules import DataConfigError, TaskInfo, get_task
from datamodules.sources import eval_split, load_raw_split, split_files


def majority_score(task: TaskInfo | str, train_labels: Sequence, test_labels: Sequence) -> float | None:
    """Paper metric (percent) of predicting the train majority; None where undefined (regression).

    Labels are class ids as ``datamodules`` reads them; for an F1 task the positive class is id 1
    (``equivalent``, ``duplicate``), as in GLUE.
    """
    info = get_task(task) if isinstance(task, str) else task
    if info.is_regression:
        return None  # a constant prediction has no correlation
    if info.main_metric == "matthews":
        return 0.0  # Matthews correlation of a constant prediction (GLUE's convention)
    majority = Counter(train_labels).most_common(1)[0][0]
    test = list(test_labels)
    if info.main_metric == "f1":
        if majority != 1:
            return 0.0
        p = test.count(1) / len(test)  # precision; recall is 1
        return 100.0 * 2 * p / (1 + p)
    return 100.0 * test.count(majority) / len(test)


def from_glue_dir(data_dir: Path, tasks: list[str]) -> dict[str, float | None]:
    """Majority baselines of the tasks whose train and test files are present under ``data_dir``.

    A task without its files is left out; a file that is there but malformed is an error
    (``DataConfigError`` naming the file and line), never a silently missing row.
    """
    out = {}
    for name in tasks:
        info = get_task(name)
        splits = ("train", eval_split(info, info.test_splits[0]))
        try:
            for split in splits:
                split_files(info, split, data_dir)
        except DataConfigError:  # this task's files are not there
            continue
        train, test = (load_raw_split(info, split, data_dir)["label"] for split in splits)
        out[info.name] = majority_score(info, train, test)
    return out
