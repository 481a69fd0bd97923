"""The learning-rate sweep of the head grid (grid.sh): arms around the old grid's rates, and edge arms.

    python results/minilm_k100_head/sweep_rates.py arms    # sweep_x1.json, sweep_d3.json, sweep_x3.json
    python results/minilm_k100_head/sweep_rates.py edges   # one line per edge arm still to run
    python results/minilm_k100_head/sweep_rates.py final   # selected_rates.json -> learning_rates.json
    python results/minilm_k100_head/sweep_rates.py reuse   # the sweep's seed-0 runs at the chosen rates -> grid/

Arms multiply each method's rate chosen for the old grid (results/minilm_k100/learning_rates.json; SST-2's
for the classification tasks, STS-B's own) by 1/3, 1 and 3. `edges` reads the finished sweep runs
(seed 0; dev scores only, never test) and, for each task and method whose best rate is the largest or the
smallest swept, writes an arm one step further (x9 or /9, then x27 ...) and prints
`<arm> <task> <methods>` for grid.sh to run; nothing when every best rate has a swept rate on both sides.
Every key is `<task>:<method>`, so each run's command holds one learning rate and a sweep run at the rate
finally chosen has the grid's command exactly: `reuse` copies it as the grid's seed 0 (the runner compares
the recorded arguments and refuses a copy that differs).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from reproduce import sweep

HERE = Path(__file__).resolve().parent
OLD = HERE.parent / "minilm_k100" / "learning_rates.json"
SWEEP = HERE / "sweep"
METHODS = ("finetune", "adapter", "prefix", "lora", "unipelt_apl")  # unipelt_ap takes unipelt_apl's rate
TASKS = ("sst2", "stsb")  # swept on their dev splits; CoLA, RTE and MRPC take SST-2's rates (as the old grid)
GRID_TASKS = {"sst2": "sst2", "cola": "sst2", "rte": "sst2", "mrpc": "sst2", "stsb": "stsb"}  # -> rates of


def old_rate(task: str, method: str) -> float:
    old = json.loads(OLD.read_text())
    return float(old[("stsb:" if task == "stsb" else "") + method].split()[-1])


def arms() -> None:
    sweep.print_arms(HERE, TASKS, METHODS, old_rate)


def edges() -> None:
    """Print `<arm> <task> <methods>` for each edge arm not yet run."""
    sweep.print_edges(HERE, TASKS, METHODS, old_rate)


def final() -> None:
    """`unipelt select`'s choice (selected_rates.json: SST-2's as plain keys, STS-B's as stsb:) as
    learning_rates.json with one `<task>:<method>` key per grid task."""
    selected = json.loads((HERE / "selected_rates.json").read_text())
    args = {}
    for task, source in GRID_TASKS.items():
        for method in (*METHODS, "unipelt_ap"):
            key = f"stsb:{method}" if source == "stsb" else method
            if key in selected:
                args[f"{task}:{method}"] = selected[key]
    (HERE / "learning_rates.json").write_text(json.dumps(args, indent=1) + "\n")


def reuse() -> None:
    """Copy each sweep run at its task's chosen rate into grid/ as seed 0 (not trained twice)."""
    rates = json.loads((HERE / "learning_rates.json").read_text())
    for src in sorted(SWEEP.glob("*/*/k100/*/seed0/metrics.json")):
        record = json.loads(src.read_text())
        wanted = rates.get(f"{record['task']}:{record['method']}", "")
        if record.get("status") == "done" and wanted and math.isclose(float(wanted.split()[-1]),
                                                                     record["learning_rate"], rel_tol=1e-6):
            dst = HERE / "grid" / record["task"] / "k100" / record["method"] / "seed0" / "metrics.json"
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dst)
                print(f"reused {src.parent.relative_to(HERE)} as {dst.parent.relative_to(HERE)}")


if __name__ == "__main__":
    {"arms": arms, "edges": edges, "final": final, "reuse": reuse}[sys.argv[1]]()
