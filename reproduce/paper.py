"""The paper's published figures (Tables 1-4), packaged as CSV so no run reads ../shared."""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

_HERE = Path(__file__).parent


def _rows(name: str) -> list[dict[str, str]]:
    with open(_HERE / name, newline="") as f:
        return list(csv.DictReader(f))


@cache
def table1() -> dict[tuple[str, str, str], float]:
    """(setting, paper method name, paper task name or "Avg") -> score in percent."""
    return {(r["setting"], r["method"], r["task"]): float(r["score"]) for r in _rows("paper_table1.csv")}


@cache
def table2() -> dict[tuple[str, str], float]:
    """(setting, comparison) -> the paper's 8-task average (Table 2)."""
    return {(r["setting"], r["comparison"]): float(r["score"]) for r in _rows("paper_table2.csv")}


@cache
def table4() -> dict[str, dict[str, float]]:
    """Paper method name -> trainable params and times relative to fine-tuning (Table 4)."""
    return {
        r["method"]: {k: float(v) for k, v in r.items() if k != "method"} for r in _rows("paper_table4.csv")
    }


def score(setting: str, method: str, task: str) -> float | None:
    """The paper's Table 1/3 score, or None where the paper has no such cell."""
    return table1().get((setting, method, task))
