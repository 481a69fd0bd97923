"""The multi-task grid against the same methods trained per task (results/minilm_k100_head/grid), paired by seed.

    python results/minilm_k100_multitask/report.py --out results/minilm_k100_multitask/report.md

A seed s is the same split (K=100 rows of each task, `--data.seed s`) and training seed in both grids, so the
gain of sharing at seed s is the multi-task run's test score on a task minus the single-task run's on that task
(each task's GLUE dev set, the paper's metric: SST-2 and RTE accuracy, CoLA Matthews, STS-B Spearman; x100).
Its mean over seeds comes with a two-sided 95 % Student-t interval (reproduce/paired.py says why t); the
average over tasks is paired the same way (gains averaged over the tasks at each seed first). Only seeds both
grids finished enter a comparison. "UniPELT (APL) gains more than X" pairs the two gains by seed as well:
(APL multi - APL single) - (X multi - X single). The gate heatmap is each task's mean test gate over the seeds;
a table says how far apart the tasks' gates are (per submodule, and the widest gap in one layer), and, once
steps_control.sh has runs, one more sets STS-B trained alone for 4 x the epochs between the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from the repository, no install
from reproduce.paired import t_interval, zero_width  # noqa: E402
from reproduce.results import load_records  # noqa: E402
from reproduce.tasks import METHODS, TASKS  # noqa: E402

HERE = Path(__file__).resolve().parent
ORDER = ("sst2", "cola", "stsb", "rte")
RUN = "+".join(ORDER)
COMPARED = ("unipelt_apl", "lora", "finetune")
MAJORITY = {"rte": 52.7, "sst2": 50.9, "cola": 0.0}  # the test set's majority class (results/minilm_k100_head)

Scores = dict[str, dict[str, dict[int, float]]]  # method -> task -> seed -> test score x100


def multi_scores(root: Path) -> tuple[Scores, dict[str, dict[str, list[dict[str, float]]]]]:
    """Each multi-task run's test score per task, and its gates per task (for the heatmap)."""
    scores: Scores = {}
    gates: dict[str, dict[str, list[dict[str, float]]]] = {}
    for rec in load_records(root):
        if rec.get("status") != "done" or rec.get("task") != RUN:
            continue
        for task in ORDER:
            entry = rec["tasks"][task]
            value = entry["test"].get(TASKS[task].test_key)
            if value is not None:
                scores.setdefault(rec["method"], {}).setdefault(task, {})[int(rec["seed"])] = 100 * float(value)
            if entry.get("gates"):
                gates.setdefault(rec["method"], {}).setdefault(task, []).append(entry["gates"])
    return scores, gates


def single_scores(root: Path) -> Scores:
    scores: Scores = {}
    for rec in load_records(root):
        if rec.get("status") != "done" or rec.get("task") not in ORDER or rec.get("k_shot") != 100:
            continue
        value = rec["test"].get(TASKS[rec["task"]].test_key)
        if value is not None:
            scores.setdefault(rec["method"], {}).setdefault(rec["task"], {})[int(rec["seed"])] = 100 * float(value)
    return scores


def cell(values: Sequence[float]) -> str:
    """Mean [95 % t interval] (n), or the mean alone below two values. Bold: the interval excludes 0. Equal gains
    at every seed (RTE accuracy moves in steps of 1/277) give a zero-width interval that says nothing: "sd 0"
    (equal up to the float32 rounding of the logged scores: reproduce.paired.zero_width)."""
    if not values:
        return "-"
    interval = t_interval(values)
    mean = statistics.fmean(values)
    if interval is None:
        return f"{mean:+.1f} (n=1)"
    if zero_width(*interval):
        return f"{mean:+.1f} (sd 0, n={len(values)})"
    bold = "**" if interval[0] > 0 or interval[1] < 0 else ""
    return f"{bold}{mean:+.1f} [{interval[0]:+.1f}, {interval[1]:+.1f}]{bold} (n={len(values)})"


def gains(multi: Scores, single: Scores, method: str) -> dict[str, dict[int, float]]:
    """task (and "average") -> seed -> multi - single, on the seeds both have (the average: seeds every task has)."""
    out = {}
    for task in ORDER:
        a, b = multi.get(method, {}).get(task, {}), single.get(method, {}).get(task, {})
        out[task] = {s: a[s] - b[s] for s in sorted(set(a) & set(b))}
    common = set.intersection(*(set(out[t]) for t in ORDER)) if all(out[t] for t in ORDER) else set()
    out["average"] = {s: statistics.fmean(out[t][s] for t in ORDER) for s in sorted(common)}
    return out


def mean_sd(values: dict[int, float]) -> str:
    if not values:
        return "-"
    sd = f" +- {statistics.stdev(values.values()):.1f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values.values()):.1f}{sd}"


def report(multi: Scores, single: Scores) -> str:
    names = [TASKS[t].paper_name for t in ORDER]
    lines = ["# Multi-task vs per-task training, all-MiniLM-L6-v2, K=100 of each task", "",
             "Generated by `python results/minilm_k100_multitask/report.py`; test = each task's GLUE dev set, x100.",
             "", "## Test scores (mean +- sd over seeds)", "",
             "| method | training | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(ORDER)]
    for method in COMPARED:
        for label, scores in (("per task", single), ("multi-task", multi)):
            row = [mean_sd(scores.get(method, {}).get(t, {})) for t in ORDER]
            lines.append(f"| {METHODS[method]} | {label} | " + " | ".join(row) + " |")
    lines.append("| majority class | | " + " | ".join(str(MAJORITY.get(t, "-")) for t in ORDER) + " |")
    lines += ["", "## Gain of sharing: multi-task minus per-task, paired by seed (mean [95 % t interval])", "",
              "| method | " + " | ".join(names) + " | average |", "|---|" + "---|" * (len(ORDER) + 1)]
    per_method = {m: gains(multi, single, m) for m in COMPARED}
    for method, g in per_method.items():
        lines.append(f"| {METHODS[method]} | " + " | ".join(cell(list(g[t].values())) for t in (*ORDER, "average"))
                     + " |")
    lines += ["", "## Does the gated union gain more from sharing? (APL's gain minus the other's, paired by seed)", "",
              "| against | " + " | ".join(names) + " | average |", "|---|" + "---|" * (len(ORDER) + 1)]
    apl = per_method["unipelt_apl"]
    for other in COMPARED[1:]:
        theirs = per_method[other]
        diffs = [[apl[t][s] - theirs[t][s] for s in sorted(set(apl[t]) & set(theirs[t]))] for t in (*ORDER, "average")]
        lines.append(f"| {METHODS[other]} | " + " | ".join(cell(d) for d in diffs) + " |")
    lines += ["", "## RTE against the majority class (52.7)", "",
              "| method | training | seeds above 52.7 | mean | mean - 52.7 [95 % t interval] |",
              "|---|---|---|---|---|"]
    for method in COMPARED:
        for label, scores in (("per task", single), ("multi-task", multi)):
            rte = scores.get(method, {}).get("rte", {})
            above = sum(v > MAJORITY["rte"] for v in rte.values())
            off = cell([v - MAJORITY["rte"] for v in rte.values()])
            lines.append(f"| {METHODS[method]} | {label} | {above}/{len(rte)} | {mean_sd(rte)} | {off} |")
    return "\n".join(lines) + "\n"


def control_section(multi: Scores, single: Scores, control: Scores) -> list[str]:
    """steps_control.sh: STS-B alone for the multi-task run's steps (80-160 epochs), against both grids' runs."""
    runs = control.get("unipelt_apl", {}).get("stsb", {})
    if not runs:
        return []
    capped = single.get("unipelt_apl", {}).get("stsb", {})
    shared = multi.get("unipelt_apl", {}).get("stsb", {})

    def paired(a: dict[int, float], b: dict[int, float]) -> str:
        return cell([a[s] - b[s] for s in sorted(set(a) & set(b))])

    return ["", "## The steps control: UniPELT (APL) on STS-B alone, 80-160 epochs (`steps_control.sh`)", "",
            "| STS-B Spearman | mean +- sd | seeds |", "|---|---|---|",
            f"| per task, 20-40 epochs (the head grid) | {mean_sd(capped)} | {len(capped)} |",
            f"| per task, 80-160 epochs (the control) | {mean_sd(runs)} | {len(runs)} |",
            f"| multi-task | {mean_sd(shared)} | {len(shared)} |", "",
            "| paired by seed | mean [95 % t interval] |", "|---|---|",
            f"| control - per task (what the extra steps give) | {paired(runs, capped)} |",
            f"| multi-task - control (what the other tasks' rows give) | {paired(shared, runs)} |"]


def mean_gates(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.fmean(run[k] for run in runs if k in run) for k in sorted({k for run in runs for k in run})}


def gate_section(method: str, by_task: dict[str, dict[str, float]]) -> list[str]:
    """Per submodule, each task's mean gate over layers, and the widest gap between two tasks in any one layer:
    how far the per-task gates (a task bias on shared weights, or a bank per task) have moved apart."""
    tasks = [t for t in ORDER if t in by_task]
    subs = sorted({key.split(".", 1)[1] for t in tasks for key in by_task[t]})
    lines = ["", f"## How far apart are the tasks' gates? ({METHODS[method]}, mean test gate over the seeds)", "",
             "| submodule | " + " | ".join(TASKS[t].paper_name for t in tasks)
             + " | widest gap between two tasks, in one layer |", "|---|" + "---|" * (len(tasks) + 1)]
    for sub in subs:
        keys = sorted({k for t in tasks for k in by_task[t] if k.split(".", 1)[1] == sub})
        means = [statistics.fmean(by_task[t][k] for k in keys if k in by_task[t]) for t in tasks]
        gaps = {k: max(by_task[t][k] for t in tasks) - min(by_task[t][k] for t in tasks) for k in keys
                if all(k in by_task[t] for t in tasks)}
        widest = max(gaps, key=gaps.get) if gaps else None
        gap = f"{gaps[widest]:.2f} ({widest.split('.', 1)[0]})" if widest else "-"
        lines.append(f"| {sub} | " + " | ".join(f"{m:.2f}" for m in means) + f" | {gap} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--multi", type=Path, default=HERE / "grid", help="the multi-task grid folder")
    p.add_argument("--single", type=Path, default=HERE.parent / "minilm_k100_head" / "grid",
                   help="the per-task grid folder")
    p.add_argument("--control", type=Path, default=HERE / "steps_control", help="steps_control.sh's folder")
    p.add_argument("--out", type=Path, default=HERE / "report.md")
    args = p.parse_args(argv)
    multi, gates = multi_scores(args.multi)
    averaged = {m: {t: mean_gates(runs) for t, runs in by_task.items()} for m, by_task in gates.items()}
    single = single_scores(args.single)
    text = report(multi, single)
    if args.control.is_dir():
        text += "".join(line + "\n" for line in control_section(multi, single, single_scores(args.control)))
    text += "".join(line + "\n" for m in COMPARED if m in averaged for line in gate_section(m, averaged[m]))
    args.out.write_text(text)
    print(f"wrote {args.out}")
    for method, by_task in averaged.items():
        from lightning_modules.gate_plot import plot_gate_heatmap

        panels = {TASKS[t].paper_name: by_task[t] for t in ORDER if t in by_task}
        png = plot_gate_heatmap(panels, args.out.parent / f"gates_{method}.png",
                                f"{METHODS[method]}, multi-task, K=100: mean test gate per task over the seeds")
        print(f"wrote {png}" if png else "no heatmap: pip install matplotlib")
    return 0


if __name__ == "__main__":
    sys.exit(main())
