"""results/minilm_k100_multitask/report.py on made-up grids: gains paired by seed (only seeds both grids have),
95 % t intervals, the union's gain against another method's, and one heatmap panel per task."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
from scipy import stats

ORDER = ("sst2", "cola", "stsb", "rte")
KEYS = {"sst2": "test/accuracy", "cola": "test/matthews", "stsb": "test/spearman", "rte": "test/accuracy"}


def load_report():
    path = Path(__file__).resolve().parents[1] / "results" / "minilm_k100_multitask" / "report.py"
    spec = importlib.util.spec_from_file_location("multitask_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def single(root: Path, method: str, task: str, seed: int, score: float) -> None:
    run = root / task / "k100" / method / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"status": "done", "task": task, "k_shot": 100, "method": method,
                                                  "seed": seed, "test": {KEYS[task]: score}}))


def multi(root: Path, method: str, seed: int, scores: dict[str, float], status: str = "done") -> None:
    run = root / "+".join(ORDER) / "k100" / method / f"seed{seed}"
    run.mkdir(parents=True)
    tasks = {t: {"test": {KEYS[t]: scores[t]}, "gates": {"layer0.adapter": 0.1 * (i + 1) + seed / 100}}
             for i, t in enumerate(ORDER)}
    (run / "metrics.json").write_text(json.dumps({"status": status, "task": "+".join(ORDER), "method": method,
                                                  "seed": seed, "tasks": tasks}))


def row(text: str, *first: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith("| " + " | ".join(first) + " |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_gains_are_paired_by_seed_with_t_intervals(tmp_path, monkeypatch):
    report = load_report()
    singles, multis = tmp_path / "single", tmp_path / "multi"
    rte_single = {0: 0.50, 1: 0.48, 2: 0.53, 3: 0.51}
    rte_multi = {0: 0.55, 1: 0.50, 2: 0.60}  # seed 3 unfinished: seeds 0-2 are paired
    for seed, score in rte_single.items():
        for task in ORDER:
            single(singles, "unipelt_apl", task, seed, score if task == "rte" else 0.6)
            single(singles, "lora", task, seed, score if task == "rte" else 0.6)
    for seed, score in rte_multi.items():
        multi(multis, "unipelt_apl", seed, {t: score if t == "rte" else 0.6 + seed / 100 for t in ORDER})
        multi(multis, "lora", seed, {t: 0.6 for t in ORDER})
    multi(multis, "unipelt_apl", 3, {t: 0.9 for t in ORDER}, status="failed")
    plots = []
    monkeypatch.setattr("lightning_modules.gate_plot.plot_gate_heatmap",
                        lambda panels, path, title: plots.append((panels, path)) or path)
    control = tmp_path / "control"  # STS-B alone with more epochs: seeds 0-1 done
    for seed, score in ((0, 0.62), (1, 0.64)):
        single(control, "unipelt_apl", "stsb", seed, score)
    assert report.main(["--multi", str(multis), "--single", str(singles), "--control", str(control),
                        "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()

    def expected(values: list[float]) -> str:
        """Mean [95 % t interval] (n), bold when the interval excludes 0 (scipy's t, not the report's)."""
        mean = statistics.fmean(values)
        low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
        bold = "**" if low > 0 or high < 0 else ""
        return f"{bold}{mean:+.1f} [{low:+.1f}, {high:+.1f}]{bold} (n={len(values)})"

    rte = [100 * (rte_multi[s] - rte_single[s]) for s in range(3)]
    others = [100 * (0.6 + s / 100) - 100 * 0.6 for s in range(3)]  # SST-2, CoLA, STS-B: +0, +1, +2
    apl = row(text.split("## Gain of sharing")[1], "UniPELT (APL)")
    average = [(r + 3 * o) / 4 for r, o in zip(rte, others, strict=True)]
    assert apl[1:] == [expected(others)] * 3 + [expected(rte), expected(average)]
    union = row(text.split("## Does the gated union")[1], "LoRA")  # APL's gain minus LoRA's, by seed
    lora_rte = [100 * 0.6 - 100 * rte_single[s] for s in range(3)]
    assert union[4] == expected([a - b for a, b in zip(rte, lora_rte, strict=True)])
    assert row(text.split("## RTE against")[1], "UniPELT (APL)", "multi-task")[2] == "2/3"  # 55 and 60 above 52.7
    off_chance = [100 * rte_multi[s] - 52.7 for s in range(3)]
    assert row(text.split("## RTE against")[1], "UniPELT (APL)", "multi-task")[4] == expected(off_chance)
    assert row(text.split("## RTE against")[1], "UniPELT (APL)", "per task")[2] == "1/4"  # 53 only
    (panels, path), = [p for p in plots if p[1].name == "gates_unipelt_apl.png"]
    assert list(panels) == ["SST-2", "CoLA", "STS-B", "RTE"]
    assert panels["RTE"]["layer0.adapter"] == pytest.approx(0.4 + statistics.fmean([0, 0.01, 0.02]))
    steps = text.split("## The steps control")[1]
    assert row(steps, "control - per task (what the extra steps give)")[1] == expected([2.0, 4.0])  # vs 60, 60
    assert row(steps, "multi-task - control (what the other tasks' rows give)")[1] == expected([60 - 62.0, 61 - 64.0])
    gates = row(text.split("## How far apart")[1], "adapter")  # seeds 0-2 done: each task's gate + 0.01 on average
    assert gates[1:] == ["0.11", "0.21", "0.31", "0.41", "0.30 (layer0)"]


def test_equal_gains_at_every_seed_are_not_an_established_difference():
    """Two seeds with the same gain have sd 0: a zero-width t interval, which must not be bolded as established."""
    cell = load_report().cell
    assert cell([-1.8, -1.8]) == "-1.8 (sd 0, n=2)"
    assert cell([-1.8050551414489746, -1.8050521612167358]) == "-1.8 (sd 0, n=2)"  # float32 scores, same counts
    assert cell([-1.8, -1.0, -1.4]).startswith("**-1.4 [")  # a spread that still excludes 0 stays bold
    assert cell([2.0]) == "+2.0 (n=1)" and cell([]) == "-"
