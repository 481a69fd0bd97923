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


def plot_gate_heatmap(gates: dict[str, float], path: Path, title: str) -> Path | None:
    """Write the heatmap; None when matplotlib is not installed (the caller says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers, subs, grid = gate_grid(gates)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(subs), 1.2 + 0.45 * len(layers)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(subs)), subs, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k")
    fig.colorbar(image, ax=ax, label="mean gate")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
