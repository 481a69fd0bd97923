"""The dev choices' table (dev_choices.sh): per run, the dev curve of val/mean and each task's dev score at the
best evaluation. Dev scores only: the runs' test scores are in their summary.json and are not read here.

    python results/minilm_k100_multitask/dev_choices.py > results/minilm_k100_multitask/dev_choices.md
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

DEV = Path(__file__).resolve().parent / "dev"
TASKS = {"sst2": "SST-2 acc", "cola": "CoLA Matthews", "stsb": "STS-B Spearman", "rte": "RTE acc"}
MAIN = {"sst2": "accuracy", "cola": "matthews", "stsb": "spearman", "rte": "accuracy"}
GROUPS = {"gates": ("gates_bank", "gates_embedding"), "sampler": ("sampler_proportional", "sampler_temperature")}


def logs(run: Path) -> list[Path]:
    """The run's metrics.csv files in order: version_1 onwards are what a resumed run logged after its last.ckpt."""
    return sorted(run.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))


def evaluations(run: Path) -> list[dict[str, float]]:
    rows = [r for log in logs(run) for r in csv.DictReader(log.open())]
    return [{k: float(v) for k, v in r.items() if v and (k.startswith("val/") or k == "epoch")}
            for r in rows if r.get("val/mean")]


def main() -> None:
    print("# Dev choices of multi-task UniPELT (APL), all-MiniLM-L6-v2, seed 0 (dev_choices.sh)\n")
    print("Dev scores x100 (300 dev rows per task); `best` is the evaluation with the highest val/mean, the one a run "
          "keeps.\n")
    for group, names in GROUPS.items():
        done = [n for n in names if (DEV / n / "summary.json").is_file()]
        if not done:
            continue
        print(f"## {group}\n")
        print("| run | val/mean at each evaluation | best val/mean | " + " | ".join(TASKS.values())
              + " | fit time |")
        print("|---|---|---|" + "---|" * len(TASKS) + "---|")
        for name in done:
            evals = evaluations(DEV / name)
            best = max(evals, key=lambda e: e["val/mean"])
            summary = json.loads((DEV / name / "summary.json").read_text())
            curve = ", ".join(f"{100 * e['val/mean']:.1f}" for e in evals)
            cells = " | ".join(f"{100 * best[f'val/{t}/{MAIN[t]}']:.1f}" for t in TASKS)
            resumed = " (after its resume)" if len(logs(DEV / name)) > 1 else ""
            print(f"| {name} | {curve} | **{100 * best['val/mean']:.1f}** | {cells} | "
                  f"{summary['fit_time_s'] / 60:.0f} min{resumed} |")
        print()


if __name__ == "__main__":
    main()
