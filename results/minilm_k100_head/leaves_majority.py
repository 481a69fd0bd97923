"""Which tasks does some method leave the majority class on? Decided on dev, never on test.

    python results/minilm_k100_head/leaves_majority.py results/minilm_k100_head/grid rte,mrpc

For each task, the seed-0 runs' best dev score (the checkpoint-selection metric) is compared with the
score of the best constant prediction on the same 1000-row dev split (seed 0). Prints
each task where some method beats that by MARGIN points or more (grid.sh then runs its other seeds), and
writes `leaves_majority.md` beside the grid with the figures behind the choice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from datamodules import get_task
from datamodules.sources import load_raw_split
from datamodules.splits import few_shot_split
from reproduce.baseline import majority_score

GLUE = Path(__file__).resolve().parents[2].parent / "shared" / "glue"
MARGIN = 2.0  # points: more than a handful of dev rows (1000) moved off the majority label
K, SEED, DEV = 100, 0, 1000


def majority_on_dev(task: str) -> float | None:
    """The best constant prediction's score on the seed-0 dev split. (The K rows' majority label can be
    the dev split's minority: RTE's K=100 rows are 58 % label 1, its dev rows 51.4 % label 0.)"""
    info = get_task(task)
    _, dev = few_shot_split(load_raw_split(info, "train", GLUE), K, SEED, DEV)
    scores = [majority_score(info, [label], dev["label"]) for label in sorted(set(dev["label"]))]
    scores = [s for s in scores if s is not None]
    return max(scores) if scores else None


def main(grid: Path, tasks: list[str]) -> None:
    lines = ["| task | best constant on dev | best dev per method (seed 0) | leaves it |", "|---|---|---|---|"]
    for task in tasks:
        base = majority_on_dev(task)
        scores = {}
        for path in sorted((grid / task / f"k{K}").glob(f"*/seed{SEED}/metrics.json")):
            record = json.loads(path.read_text())
            if record.get("status") == "done" and (record.get("best_val") or {}).get("value") is not None:
                scores[record["method"]] = 100 * record["best_val"]["value"]
        # Scores are shares of 1000 rows: compare at 0.1 point, so float rounding cannot decide.
        leaves = base is not None and any(round(s, 1) >= round(base + MARGIN, 1) for s in scores.values())
        figures = ", ".join(f"{m} {s:.1f}" for m, s in scores.items()) or "(no finished run)"
        lines.append(f"| {task} | {base:.1f} | {figures} | {'yes' if leaves else 'no'} |")
        if leaves:
            print(task)
    (grid.parent / "leaves_majority.md").write_text(
        f"# Leaving the majority class (dev, seed 0; margin {MARGIN:g} points)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
