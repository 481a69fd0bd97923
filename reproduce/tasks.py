"""Task and method tables the grid and the report share.

The report scores each task with the paper's metric (Table 1 caption), which is not always the
datamodule's checkpoint-selection metric, so this mapping lives here rather than in
``datamodules``.
"""

from __future__ import annotations

from dataclasses import dataclass

from unipelt import PRESETS


@dataclass(frozen=True)
class ReportTask:
    """How the paper scores one task: its column name and the summary key of that metric."""

    name: str  # CLI / config name, e.g. "stsb"
    paper_name: str  # column name in the paper's tables, e.g. "STS-B"
    test_key: str  # key in summary.json "test"
    metric_label: str


# In the paper's column order (Table 1).
TASKS: dict[str, ReportTask] = {
    t.name: t
    for t in (
        ReportTask("sst2", "SST-2", "test/accuracy", "acc"),
        ReportTask("mrpc", "MRPC", "test/f1", "F1"),
        ReportTask("cola", "CoLA", "test/matthews", "Matthews"),
        ReportTask("rte", "RTE", "test/accuracy", "acc"),
        ReportTask("qnli", "QNLI", "test/accuracy", "acc"),
        ReportTask("stsb", "STS-B", "test/spearman", "Spearman"),
        ReportTask("mnli", "MNLI", "test_matched/accuracy", "matched acc"),
        ReportTask("qqp", "QQP", "test/f1", "F1"),
    )
}

# Preset name -> the paper's row name, in the paper's row order (read from unipelt's one table).
METHODS: dict[str, str] = {name: preset.label for name, preset in PRESETS.items()}
PAPER_TO_METHOD = {v: k for k, v in METHODS.items()}

# Table 2: each UniPELT variant against the best of the single methods it combines.
TABLE2 = (
    ("unipelt_ap", ("adapter", "prefix")),
    ("unipelt_apl", ("adapter", "prefix", "lora")),
)


def k_tag(k: str | int | None) -> str:
    """Folder / config tag of a data size: ``k100`` for K=100, ``full`` for the whole train set."""
    if k is None or str(k) == "full":
        return "full"
    return f"k{int(k)}"


def paper_setting(k: str | int | None) -> str:
    """The paper CSV's ``setting`` value of a data size (``K=100`` or ``full``)."""
    tag = k_tag(k)
    return "full" if tag == "full" else f"K={tag[1:]}"
