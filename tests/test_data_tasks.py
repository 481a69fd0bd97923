"""The task table: names, aliases, labels and the paper's metric priority."""

from __future__ import annotations

import dataclasses

import pytest

from datamodules import GLUE_TASKS, DataConfigError, TaskInfo, get_task


@pytest.mark.parametrize(
    ("alias", "name"),
    [("SST-2", "sst2"), ("sst2", "sst2"), ("Sst-2", "sst2"), ("STS-B", "stsb"), ("sts_b", "stsb"),
     ("CoLA", "cola"), ("MNLI", "mnli"), ("qqp", "qqp"), ("QNLI", "qnli"), ("rte", "rte"), ("MRPC", "mrpc")],
)  # fmt: skip
def test_aliases(alias: str, name: str) -> None:
    assert get_task(alias).name == name


def test_unknown_task_is_one_line_listing_the_tasks() -> None:
    with pytest.raises(ValueError) as err:
        get_task("wnli")
    assert isinstance(err.value, DataConfigError)
    message = str(err.value)
    assert "\n" not in message and "wnli" in message
    assert all(name in message for name in GLUE_TASKS)


def test_table_matches_paper_and_hub() -> None:
    assert list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
    main = {t.name: t.main_metric for t in GLUE_TASKS.values()}
    assert main == {"cola": "matthews", "sst2": "accuracy", "mrpc": "f1", "stsb": "spearman", "qqp": "f1",
                    "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy"}  # fmt: skip
    stsb = get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.label_names == ()
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_task("rte").label_names == get_task("qnli").label_names == ("entailment", "not_entailment")
    assert get_task("mnli").test_splits == ("test_matched", "test_mismatched")
    for task in GLUE_TASKS.values():
        assert isinstance(task, TaskInfo)
        assert set(task.metrics) <= {"accuracy", "f1", "matthews", "pearson", "spearman"}
        assert task.num_labels == (1 if task.is_regression else len(task.label_names))
        assert task.name != "mnli" or len(task.test_splits) == 2
        assert task.name == "mnli" or task.test_splits == ("test",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_task("rte").num_labels = 3  # type: ignore[misc]
