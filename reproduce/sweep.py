"""Learning-rate sweeps in powers of 3 around a base rate, grown at the edges until the best rate is inside.

The results grids' `sweep_rates.py` scripts name their arms and base rates; this holds what they share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

from reproduce.selection import choose, dev_scores, runs_of


def arm_name(power: int) -> str:
    """x1 for the base rate, x3 / x9 above it, d3 / d9 below it."""
    return "x1" if power == 0 else (f"x{3 ** power}" if power > 0 else f"d{3 ** -power}")


def edge_arms(sweep: Path, tasks: Iterable[str], methods: Iterable[str],
              base_rate: Callable[[str, str], float]) -> dict[tuple[int, str], list[str]]:
    """`(power, task) -> methods` whose best dev rate (seed-0 runs under `sweep`) is the largest or the smallest
    swept: each needs an arm one step further out. Empty when every best rate has a swept rate on both sides."""
    scores = dev_scores(sorted(p for p in sweep.glob("*") if p.is_dir()))
    todo: dict[tuple[int, str], list[str]] = {}
    for task in tasks:
        mine = runs_of(scores, {task})
        chosen = choose(mine)
        for method in methods:
            if method not in chosen:
                continue
            swept = sorted(lr for m, lr in mine if m == method)
            best = chosen[method][0]
            power = round(math.log(best / base_rate(task, method), 3))
            if best == swept[-1]:
                todo.setdefault((power + 1, task), []).append(method)
            elif best == swept[0]:
                todo.setdefault((power - 1, task), []).append(method)
    return todo
