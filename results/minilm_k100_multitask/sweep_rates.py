"""The learning-rate sweep of the multi-task grid (grid.sh), the head grid's rule on one multi-task run per rate.

    python results/minilm_k100_multitask/sweep_rates.py arms    # sweep_d3.json, sweep_x1.json, sweep_x3.json
    python results/minilm_k100_multitask/sweep_rates.py edges   # one line per edge arm still to run
    python results/minilm_k100_multitask/sweep_rates.py reuse   # the sweep's seed-0 runs at the chosen rates -> grid/

A multi-task run has one learning rate for its four tasks. The arms multiply each method's single-task rate of
SST-2 (results/minilm_k100_head/learning_rates.json; it also served CoLA and RTE, 3 of the 4 tasks) by 1/3, 1
and 3; STS-B's own single-task rate lies inside that range for UniPELT (APL) and LoRA (x3 and x1/3), 10 times
lower for fine-tuning, which the edge arms reach if its dev score asks for it. `edges` reads the finished sweep
runs (seed 0; `val/mean`, the mean over the four tasks of their dev main metric, never a test score) and, for
each method whose best rate is the largest or the smallest swept, writes an arm one step further (x9 or /9, ...)
and prints `<arm> <methods>`; nothing once every best rate has a swept rate on both sides. A sweep run at the
rate finally chosen has the grid's command exactly: `reuse` copies it as the grid's seed 0 (the runner compares
the recorded arguments and refuses a copy that differs).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's reproduce/, not an installed one
from reproduce.selection import choose, dev_scores  # noqa: E402

HERE = Path(__file__).resolve().parent
SINGLE = HERE.parent / "minilm_k100_head" / "learning_rates.json"
SWEEP = HERE / "sweep"
METHODS = ("finetune", "lora", "unipelt_apl")


def arm_name(power: int) -> str:
    return "x1" if power == 0 else (f"x{3 ** power}" if power > 0 else f"d{3 ** -power}")


def single_rate(method: str) -> float:
    return float(json.loads(SINGLE.read_text())[f"sst2:{method}"].split()[-1])


def write_arm(power: int, methods: list[str]) -> Path:
    """The arm's method-args JSON (plain method keys), merged with what it already holds."""
    path = HERE / f"sweep_{arm_name(power)}.json"
    args = json.loads(path.read_text()) if path.exists() else {}
    for method in methods:
        args[method] = f"--model.learning_rate {single_rate(method) * 3.0 ** power:.4g}"
    path.write_text(json.dumps(dict(sorted(args.items())), indent=1) + "\n")
    return path


def arms() -> None:
    for power in (-1, 0, 1):
        print(write_arm(power, list(METHODS)).relative_to(HERE.parents[1]))


def edges() -> None:
    """Print `<arm> <methods>` for each edge arm not yet run."""
    scores = dev_scores(sorted(p for p in SWEEP.glob("*") if p.is_dir()))
    chosen = choose(scores)
    todo: dict[int, list[str]] = {}
    for method in METHODS:
        if method not in chosen:
            continue
        swept = sorted(lr for m, lr in scores if m == method)
        best = chosen[method][0]
        power = round(math.log(best / single_rate(method), 3))
        if best == swept[-1]:
            todo.setdefault(power + 1, []).append(method)
        elif best == swept[0]:
            todo.setdefault(power - 1, []).append(method)
    for power, methods in sorted(todo.items()):
        write_arm(power, methods)
        print(arm_name(power), ",".join(methods))


def reuse() -> None:
    """Copy each sweep run at its method's chosen rate into grid/ as seed 0 (not trained twice)."""
    rates = json.loads((HERE / "learning_rates.json").read_text())
    for src in sorted(SWEEP.glob("*/*/k100/*/seed0/metrics.json")):
        record = json.loads(src.read_text())
        wanted = rates.get(record["method"], "")
        if record.get("status") == "done" and wanted and math.isclose(float(wanted.split()[-1]),
                                                                     record["learning_rate"], rel_tol=1e-6):
            dst = HERE / "grid" / src.relative_to(src.parents[4]).parent / "metrics.json"
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dst)
                print(f"reused {src.parent.relative_to(HERE)} as {dst.parent.relative_to(HERE)}")


if __name__ == "__main__":
    {"arms": arms, "edges": edges, "reuse": reuse}[sys.argv[1]]()
