"""``unipelt select``: pick each method's learning rate on the dev split of a sweep, never on test.

A sweep is any set of grid folders (``unipelt reproduce``) whose runs differ in learning rate,
e.g. one folder per rate multiplier. For each method, the chosen rate is the one with the best
mean *dev* score (the checkpoint-selection metric, ``best_val`` in metrics.json) over the tasks
and seeds the sweep covers; a rate missing a (task, seed) that another rate has is not eligible,
so rates are compared on the same runs. The result is written as ``--method-args`` JSON for the
final grid, plus a markdown table of every dev score behind the choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Container, Iterable, Sequence
from pathlib import Path

from .results import load_records, run_id
from .tasks import METHODS, TASKS

# (method, learning rate) -> {(task, seed): dev score}
DevScores = dict[tuple[str, float], dict[tuple[str, int], float]]


def dev_scores(roots: Iterable[Path]) -> DevScores:
    """Every finished run's best dev score, keyed by method and learning rate."""
    scores: DevScores = defaultdict(dict)
    for root in roots:
        for rec in load_records(root):
            value = (rec.get("best_val") or {}).get("value")
            if rec.get("status") != "done" or value is None or rec.get("learning_rate") is None:
                continue
            _, task, method, seed = run_id(rec)
            scores[(method, float(rec["learning_rate"]))][(task, seed)] = float(value)
    return dict(scores)


def compared_means(scores: DevScores, method: str) -> dict[float, float]:
    """learning rate -> mean dev score over the (task, seed) runs that every rate of ``method`` has."""
    rates = {lr: runs for (m, lr), runs in scores.items() if m == method}
    common = set.intersection(*(set(runs) for runs in rates.values())) if rates else set()
    return {lr: statistics.fmean(runs[r] for r in common) for lr, runs in rates.items()} if common else {}


def choose(scores: DevScores) -> dict[str, tuple[float, float]]:
    """method -> (learning rate, mean dev score) with the best mean over the runs every rate has."""
    chosen = {}
    for method in sorted({m for m, _ in scores}):
        means = compared_means(scores, method)
        if means:
            best = max(sorted(means), key=lambda lr: means[lr])  # ties: the smaller rate
            chosen[method] = (best, means[best])
    return chosen


def runs_of(scores: DevScores, tasks: Container[str], keep: bool = True) -> DevScores:
    """The sweep restricted to the runs of ``tasks`` (``keep=False``: to every other task's runs)."""
    out = {key: {r: v for r, v in runs.items() if (r[0] in tasks) == keep} for key, runs in scores.items()}
    return {key: runs for key, runs in out.items() if runs}


def method_args(chosen: dict[str, tuple[float, float]], inherit: dict[str, str], task: str | None = None
                ) -> dict[str, str]:
    """``--method-args`` JSON: each method's rate; ``inherit`` maps a method to the one it copies.
    With ``task``, the keys are ``task:method`` (the grid applies them after the plain ones)."""
    args = {m: f"--model.learning_rate {lr:g}" for m, (lr, _) in chosen.items()}
    for method, source in inherit.items():
        if method not in chosen and source in chosen:
            args[method] = args[source]
    prefix = f"{task}:" if task else ""
    return {prefix + m: args[m] for m in METHODS if m in args}


def to_markdown(scores: DevScores, chosen: dict[str, tuple[float, float]]) -> str:
    """Dev scores (x100, mean over seeds) per method, rate and task; "compared" is what the choice used."""
    present = {task for runs in scores.values() for task, _ in runs}
    tasks = [t for t in TASKS if t in present] + sorted(present - set(TASKS))  # then multi-task runs (sst2+rte)
    head = "| method | learning rate | " + " | ".join(TASKS[t].paper_name if t in TASKS else t for t in tasks) \
        + " | compared | chosen |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for method, lr in sorted(scores, key=lambda ml: (list(METHODS).index(ml[0]), ml[1])):
        runs = scores[(method, lr)]
        cells = []
        for t in tasks:
            values = [v for (task, _), v in runs.items() if task == t]
            cells.append(f"{100 * statistics.fmean(values):.1f}" if values else "")
        compared = compared_means(scores, method).get(lr)
        mark = "**yes**" if chosen.get(method, (None,))[0] == lr else ""
        mean = "" if compared is None else f"{100 * compared:.1f}"
        lines.append(f"| {METHODS[method]} | {lr:g} | " + " | ".join(cells) + f" | {mean} | {mark} |")
    return "\n".join(lines) + "\n"


def _parse_inherit(specs: Sequence[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        targets, sep, source = spec.partition("=")
        names = [*filter(None, targets.split(",")), source]
        bad = [n for n in names if n not in METHODS]
        if not sep or bad:
            raise SystemExit(f"--inherit {spec!r}: expected a,b=source with methods from {', '.join(METHODS)}")
        out.update({t: source for t in targets.split(",") if t})
    return out


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="unipelt select", description=__doc__.split("\n\n")[0])
    p.add_argument("roots", type=Path, nargs="+", help="grid folders of the sweep")
    p.add_argument("--out", type=Path, required=True, help="method-args JSON to write (markdown table beside it)")
    p.add_argument("--inherit", action="append", default=[], metavar="A,B=SOURCE",
                   help="methods that take SOURCE's chosen rate, e.g. unipelt_ap,unipelt_apl_nogate=unipelt_apl")
    p.add_argument("--per-task", default="", metavar="T1,T2",
                   help="tasks chosen on their own dev scores alone (keys task:method), e.g. stsb for the regression")
    args = p.parse_args(list(argv))
    missing = [str(r) for r in args.roots if not r.is_dir()]
    if missing:
        raise SystemExit(f"not a folder: {', '.join(missing)}")
    inherit = _parse_inherit(args.inherit)
    scores = dev_scores(args.roots)
    if not scores:
        raise SystemExit(f"no finished runs with a dev score under {', '.join(map(str, args.roots))}")
    per_task = [t for t in args.per_task.split(",") if t]
    bad = [t for t in per_task if t not in TASKS]
    if bad:
        raise SystemExit(f"--per-task {bad[0]!r} is not a task; choose from {', '.join(TASKS)}")
    groups = [(None, runs_of(scores, per_task, keep=False))] + [(t, runs_of(scores, {t})) for t in per_task]
    result, sections = {}, []
    for task, group in groups:
        if not group:
            raise SystemExit(f"no finished runs with a dev score for {task or 'the shared tasks'}")
        chosen = choose(group)
        result.update(method_args(chosen, inherit, task))
        title = f"## {TASKS[task].paper_name} alone" if task else "## " + (
            "Every other task" if per_task else "All tasks")
        sections.append(f"{title}\n\n{to_markdown(group, chosen)}")
        for method, (lr, mean) in chosen.items():
            print(f"{task + ':' if task else ''}{method}: learning rate {lr:g} (mean dev {100 * mean:.1f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = args.out.with_suffix(".md")
    table.write_text("# Learning rates chosen on dev scores\n\n" + "\n".join(sections))
    print(f"wrote {args.out} and {table}")
    return 0
