"""The report's view of the project's one task table (``datamodules``) and one method table
(``unipelt.PRESETS``): nothing here restates a field, label or metric.

What stays here is presentation the tables cannot give: the paper's column order and the
comparisons of its Table 2.
"""

from __future__ import annotations

from dataclasses import dataclass

from datamodules import GLUE_TASKS, TaskInfo
from unipelt import PRESETS

# The paper's column order (Table 1); every other task of the table follows in its own order.
PAPER_ORDER = ("sst2", "mrpc", "cola", "rte", "qnli", "stsb", "mnli", "qqp")

_METRIC_LABELS = {"accuracy": "acc", "f1": "F1", "matthews": "Matthews", "spearman": "Spearman", "pearson": "Pearson"}


@dataclass(frozen=True)
class ReportTask:
    """How the report shows one task of ``datamodules``' table, and where its score sits in a summary."""

    info: TaskInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def paper_name(self) -> str:
        """The paper's column name: GLUE's own spelling, which is also the task's GLUE folder."""
        return self.info.glue_dir

    @property
    def test_split(self) -> str:
        """The test set the paper reports (MNLI: matched)."""
        return self.info.test_splits[0]

    @property
    def test_key(self) -> str:
        """Key of the paper's metric in summary.json's ``test`` block, e.g. ``test_matched/accuracy``."""
        return f"{self.test_split}/{self.info.main_metric}"

    @property
    def metric_label(self) -> str:
        label = _METRIC_LABELS.get(self.info.main_metric, self.info.main_metric)
        qualifier = self.test_split.removeprefix("test").strip("_")
        return f"{qualifier} {label}" if qualifier else label


TASKS: dict[str, ReportTask] = {
    name: ReportTask(GLUE_TASKS[name])
    for name in [*(t for t in PAPER_ORDER if t in GLUE_TASKS), *(t for t in GLUE_TASKS if t not in PAPER_ORDER)]
}

# Preset name -> the paper's row name, in the presets' order (the paper's row order).
METHODS: dict[str, str] = {name: preset.label for name, preset in PRESETS.items()}
PAPER_TO_METHOD = {v: k for k, v in METHODS.items()}

# Table 2: each UniPELT variant against the best of the single methods it combines.
TABLE2 = (
    ("unipelt_ap", ("adapter", "prefix")),
    ("unipelt_apl", ("adapter", "prefix", "lora")),
    # issue 28's unions (no paper row): each against the best of the single methods it gates
    ("unipelt_apl_dora", ("adapter", "prefix", "dora")),
    ("unipelt_apli", ("adapter", "prefix", "lora", "ia3")),
    ("unipelt_all", ("adapter", "parallel_adapter", "prefix", "lora", "ia3")),
)
# Issue 28's design space, beside Table 2: each new method against UniPELT (APL), the method it would
# replace, and each new single method against the best of the paper's three (it is one more single method).
DESIGN_SPACE = ("ia3", "dora", "parallel_adapter", "unipelt_apl_dora", "unipelt_apli", "unipelt_all")
PAPER_SINGLES = ("adapter", "prefix", "lora")


def k_tag(k: str | int | None) -> str:
    """Folder / config tag of a data size: ``k100`` for K=100, ``full`` for the whole train set."""
    if k is None or str(k) == "full":
        return "full"
    return f"k{int(k)}"


def paper_setting(k: str | int | None) -> str:
    """The paper CSV's ``setting`` value of a data size (``K=100`` or ``full``)."""
    tag = k_tag(k)
    return "full" if tag == "full" else f"K={tag[1:]}"
