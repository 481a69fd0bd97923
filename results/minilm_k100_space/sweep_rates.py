"""The learning-rate sweep of the design-space grid (grid.sh, issue 28): arms around a base rate per method.

    python results/minilm_k100_space/sweep_rates.py apl     # learning_rates_apl.json: APL at the head grid's rates
    python results/minilm_k100_space/sweep_rates.py arms    # sweep_x1.json, sweep_d3.json, sweep_x3.json
    python results/minilm_k100_space/sweep_rates.py edges   # one line per edge arm still to run
    python results/minilm_k100_space/sweep_rates.py final   # selected_rates.json -> learning_rates.json
    python results/minilm_k100_space/sweep_rates.py reuse   # the sweep's seed-0 runs at the chosen rates -> grid/

Base rates come from the head grid's choices (results/minilm_k100_head/learning_rates.json) of the
closest method there: DoRA takes LoRA's, the parallel adapter the adapter's, the new unions UniPELT
(APL)'s; IA3, which has none, starts at 3e-3 (PEFT's IA3 examples train at 3e-3 to 1e-2). Arms: x1/3,
x1, x3; `edges` adds an arm one step further wherever the best dev score sits at a swept edge, until none
does. Dev scores only (seed 0), never test. UniPELT (APL) itself keeps the head grid's rate (it runs
again here only so that its checkpoints exist for `slim`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from reproduce import sweep

HERE = Path(__file__).resolve().parent
HEAD_RATES = HERE.parent / "minilm_k100_head" / "learning_rates.json"
SWEEP = HERE / "sweep"
BASE = {"ia3": None, "dora": "lora", "parallel_adapter": "adapter", "unipelt_apl_dora": "unipelt_apl",
        "unipelt_apli": "unipelt_apl", "unipelt_all": "unipelt_apl"}
IA3_RATE = 3e-3
METHODS = tuple(BASE)
TASKS = ("sst2", "stsb")


def base_rate(task: str, method: str) -> float:
    if BASE[method] is None:
        return IA3_RATE
    head = json.loads(HEAD_RATES.read_text())
    return float(head[f"{task}:{BASE[method]}"].split()[-1])


def arms() -> None:
    sweep.print_arms(HERE, TASKS, METHODS, base_rate)


def edges() -> None:
    """Print `<arm> <task> <methods>` for each edge arm not yet run."""
    sweep.print_edges(HERE, TASKS, METHODS, base_rate)


def apl() -> None:
    """UniPELT (APL)'s rates of the head grid, for the runs that slim reads (they need no sweep)."""
    head = json.loads(HEAD_RATES.read_text())
    args = {f"{task}:unipelt_apl": head[f"{task}:unipelt_apl"] for task in TASKS}
    (HERE / "learning_rates_apl.json").write_text(json.dumps(args, indent=1) + "\n")


def final() -> None:
    """`unipelt select`'s choice (selected_rates.json: SST-2's as plain keys, STS-B's as stsb:) as
    learning_rates.json with one `<task>:<method>` key per task, plus UniPELT (APL) at the head grid's rate."""
    selected = json.loads((HERE / "selected_rates.json").read_text())
    head = json.loads(HEAD_RATES.read_text())
    args = {}
    for task in TASKS:
        for method in METHODS:
            key = f"stsb:{method}" if task == "stsb" else method
            if key in selected:
                args[f"{task}:{method}"] = selected[key]
        args[f"{task}:unipelt_apl"] = head[f"{task}:unipelt_apl"]
    (HERE / "learning_rates.json").write_text(json.dumps(args, indent=1) + "\n")


def reuse() -> None:
    """Copy each sweep run at its task's chosen rate into grid/ as seed 0 (not trained twice)."""
    rates = json.loads((HERE / "learning_rates.json").read_text())
    for src in sorted(SWEEP.glob("*/*/k100/*/seed0/metrics.json")):
        record = json.loads(src.read_text())
        wanted = rates.get(f"{record['task']}:{record['method']}", "")
        if record.get("status") == "done" and wanted and math.isclose(float(wanted.split()[-1]),
                                                                     record["learning_rate"], rel_tol=1e-6):
            dst = HERE / "grid" / record["task"] / "k100" / record["method"] / "seed0"
            if not (dst / "metrics.json").exists():
                shutil.copytree(src.parent, dst, dirs_exist_ok=True)  # checkpoints too: slim needs them
                print(f"reused {src.parent.relative_to(HERE)} as {dst.relative_to(HERE)}")


if __name__ == "__main__":
    {"apl": apl, "arms": arms, "edges": edges, "final": final, "reuse": reuse}[sys.argv[1]]()
