"""Gate heatmaps: mean learned gate value per layer x submodule on the test set, one panel per task.

matplotlib is an optional dependency: only ``unipelt report --gates`` needs it.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path

from .results import run_id
from .tasks import METHODS, TASKS, k_tag

_KEY = re.compile(r"^layers?[._]?(\d+)\.(.+)$")


def mean_gates(records: list[dict]) -> dict[tuple[str, str], dict[str, dict[tuple[int, str], float]]]:
    """(k, method) -> task -> (layer, submodule) -> gate value averaged over seeds."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        if r.get("status") != "done" or not r.get("gates"):
            continue
        k, task, method, _ = run_id(r)
        for key, value in r["gates"].items():
            m = _KEY.match(key)
            if m:
                acc[(k, method)][task][(int(m.group(1)), m.group(2))].append(float(value))
    return {
        km: {t: {ls: statistics.fmean(v) for ls, v in cells.items()} for t, cells in tasks.items()}
        for km, tasks in acc.items()
    }


def plot_gates(records: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per (K, gated method), with a panel per task; returns the written paths.

    Raises ImportError without matplotlib (an optional dependency)."""
    import matplotlib  # ImportError: the caller says what it skipped

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (k, method), by_task in sorted(mean_gates(records).items()):
        tasks = [t for t in TASKS if t in by_task]
        fig, axes = plt.subplots(1, len(tasks), figsize=(2.2 + 1.6 * len(tasks), 4.5), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            gates = by_task[task]
            layers = sorted({layer for layer, _ in gates})
            subs = sorted({s for _, s in gates})
            grid = [[gates.get((layer, s), float("nan")) for s in subs] for layer in layers]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(subs)), subs, rotation=45, ha="right")
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
            ax.set_title(TASKS[task].paper_name)
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if v < 0.5 else "black",
                    )
        axes[0][0].set_ylabel("layer")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean gate")
        fig.suptitle(f"{METHODS[method]} gates, {k_tag(k)}")
        path = Path(out_dir) / f"gates_{k_tag(k)}_{method}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
