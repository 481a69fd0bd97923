"""reproduce/ reads the project's one task table and one method table; the majority baseline
reads GLUE through datamodules' reader and gives the figures it gave with its own reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from reproduce.baseline import from_glue_dir

GLUE = Path("/work/shared/glue")
# The majority-class baselines the former reproduce-only TSV reader gave on the shared GLUE copy
# (train majority over the full train set, scored on GLUE dev); QNLI there has no train split.
PINNED = {
    "sst2": 50.91743119266055,
    "mrpc": 81.2227074235808,
    "cola": 0.0,
    "rte": 52.707581227436826,
    "stsb": None,
}


@pytest.mark.skipif(not (GLUE / "RTE" / "train.tsv").exists(), reason="GLUE data not present")
def test_majority_baseline_on_glue_is_unchanged():
    got = from_glue_dir(GLUE, list(PINNED) + ["qnli"])
    assert got.keys() == PINNED.keys()
    for task, value in PINNED.items():
        assert got[task] == (None if value is None else pytest.approx(value, abs=1e-9)), task


def test_report_tasks_are_the_datamodule_table_in_the_papers_order():
    from datamodules import GLUE_TASKS
    from reproduce import paper
    from reproduce.tasks import TASKS

    assert set(TASKS) == set(GLUE_TASKS)
    paper_columns = ["SST-2", "MRPC", "CoLA", "RTE", "QNLI", "STS-B", "MNLI", "QQP"]
    assert [t.paper_name for t in TASKS.values()][:8] == paper_columns
    assert {task for _, _, task in paper.table1()} - {"Avg"} == {t.paper_name for t in TASKS.values()}
    # The paper's metrics (Table 1 caption) are the datamodule's main metrics on the first test split.
    keys = {t.name: t.test_key for t in TASKS.values()}
    assert keys == {
        "sst2": "test/accuracy",
        "mrpc": "test/f1",
        "cola": "test/matthews",
        "rte": "test/accuracy",
        "qnli": "test/accuracy",
        "stsb": "test/spearman",
        "mnli": "test_matched/accuracy",
        "qqp": "test/f1",
    }
    assert TASKS["mnli"].metric_label == "matched acc" and TASKS["stsb"].metric_label == "Spearman"


def test_report_methods_are_the_presets():
    from reproduce import paper
    from reproduce.tasks import METHODS, TABLE2
    from unipelt import PRESETS

    assert METHODS == {name: preset.label for name, preset in PRESETS.items()}
    assert set(paper.table4()) <= set(METHODS.values())
    assert {m for _, m, _ in paper.table1()} - set(METHODS.values()) == {"Prefix L=50"}
    assert all(u in PRESETS and set(singles) <= set(PRESETS) for u, singles in TABLE2)


def test_majority_score_reads_the_task_table():
    from reproduce.baseline import majority_score

    assert majority_score("mrpc", [1, 1, 0], [1, 0, 1, 1]) == pytest.approx(100 * 2 * 0.75 / 1.75)
    assert majority_score("qqp", [0, 0, 1], [1, 1]) == 0.0  # majority is the negative class: F1 0
    assert majority_score("rte", [0, 0, 1], [1, 0]) == 50 and majority_score("stsb", [1.0], [2.0]) is None
    assert majority_score("cola", [1, 1], [0, 1]) == 0.0
