"""The end of a `fit`: a heatmap of the learned gates (layer x submodule) on the test set, if matplotlib is there."""

from __future__ import annotations

import re
from pathlib import Path

_KEY = re.compile(r"^layers?[._]?(\d+)\.(.+)$")


def gate_grid(gates: dict[str, float]) -> tuple[list[int], list[str], list[list[float]]]:
    """{"layer3.adapter": 0.6, ...} -> layers, submodules, values[layer][submodule] (NaN where absent)."""
    cells = {(int(m.group(1)), m.group(2)): v for k, v in gates.items() if (m := _KEY.match(k))}
    layers = sorted({layer for layer, _ in cells})
    subs = sorted({s for _, s in cells})
    return layers, subs, [[cells.get((layer, s), float("nan")) for s in subs] for layer in layers]


def plot_gate_heatmap(gates: dict[str, float] | dict[str, dict[str, float]], path: Path, title: str) -> Path | None:
    """Write the heatmap (a multi-task run's ``{task: gates}``: one panel per task); None when matplotlib is not
    installed (the caller says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = gates if all(isinstance(v, dict) for v in gates.values()) else {"": gates}
    grids = {name: gate_grid(values) for name, values in panels.items()}
    subs_n = max(len(subs) for _, subs, _ in grids.values())
    layers_n = max(len(layers) for layers, _, _ in grids.values())
    fig, axes = plt.subplots(1, len(grids), figsize=(0.4 + (1.2 + 1.1 * subs_n) * len(grids), 1.2 + 0.45 * layers_n),
                             squeeze=False)
    for ax, (name, (layers, subs, grid)) in zip(axes[0], grids.items(), strict=True):
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(subs)), subs, rotation=30, ha="right")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_title(name or title, fontsize=9)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if value < 0.6 else "k")
    axes[0][0].set_ylabel("layer")
    if len(grids) > 1:
        fig.suptitle(title, fontsize=9, y=1.04)
    fig.colorbar(image, ax=axes[0].tolist(), label="mean gate")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
