"""Learning-rate sweeps in powers of 3 around a base rate, grown at the edges until the best rate is inside.

The results grids' `sweep_rates.py` scripts name their arms and base rates; this holds what they share.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from reproduce.selection import choose, dev_scores, runs_of


def arm_name(power: int) -> str:
    """x1 for the base rate, x3 / x9 above it, d3 / d9 below it."""
    return "x1" if power == 0 else (f"x{3 ** power}" if power > 0 else f"d{3 ** -power}")


def write_arm(folder: Path, power: int, pairs: Iterable[tuple[str, str]],
              base_rate: Callable[[str, str], float]) -> Path:
    """``folder/sweep_<arm>.json``: `<task>:<method>` -> its learning rate x 3**power, merged with what the file
    already holds (edge arms grow per task)."""
    path = folder / f"sweep_{arm_name(power)}.json"
    args = json.loads(path.read_text()) if path.exists() else {}
    for task, method in pairs:
        args[f"{task}:{method}"] = f"--model.learning_rate {base_rate(task, method) * 3.0 ** power:.4g}"
    path.write_text(json.dumps(dict(sorted(args.items())), indent=1) + "\n")
    return path


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


def print_arms(folder: Path, tasks: Iterable[str], methods: Iterable[str],
               base_rate: Callable[[str, str], float]) -> None:
    """Write the first arms (x1/3, x1, x3 of every task and method) and print their files."""
    pairs = [(t, m) for t in tasks for m in methods]
    for power in (-1, 0, 1):
        print(write_arm(folder, power, pairs, base_rate).relative_to(folder.parents[1]))


def print_edges(folder: Path, tasks: Iterable[str], methods: Iterable[str],
                base_rate: Callable[[str, str], float]) -> None:
    """Write each edge arm not yet run (`folder/sweep/` holds the runs) and print `<arm> <task> <methods>`."""
    for (power, task), chosen in sorted(edge_arms(folder / "sweep", tasks, methods, base_rate).items()):
        write_arm(folder, power, [(task, m) for m in chosen], base_rate)
        print(arm_name(power), task, ",".join(chosen))
