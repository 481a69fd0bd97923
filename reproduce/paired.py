"""Table 2 as a paired comparison: does UniPELT beat the best single method, seed for seed?

A grid's seed ``s`` is both the few-shot split (``--data.seed s``) and the training seed
(``--seed_everything s``), so UniPELT and a single method at the same seed saw the same 100
examples from the same initial randomness. The gain at seed ``s`` is UniPELT's test score minus
the best single method's; its mean over seeds comes with a two-sided 95 % Student-t interval
(``mean ± t(0.975, n-1) · sd / √n``, sd with ddof=1). With 3-5 seeds a bootstrap over seeds has
too few distinct resamples to be trusted; the t-interval is the honest (wide) choice.

The best single method is chosen per task and K on the *dev* score (``best_val``, the metric the
checkpoint was selected on), averaged over that method's finished seeds; ties go to the method
listed first. Test scores never choose it. (The paper takes the best of its reported scores,
which are on its test set; its gain is shown beside ours as published.)

The task average pairs the same way: at each seed the gains are averaged over the tasks, then
the interval is taken over seeds; only seeds every task has enter it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

from . import paper
from .results import Cell, Key
from .tasks import DESIGN_SPACE, METHODS, PAPER_SINGLES, TABLE2, TASKS, paper_setting

CONFIDENCE = 0.95
# An interval narrower than this (points) is the same gain at every seed: logged scores are float32, ~1e-5 points
# apart for the same count of right answers, while one test row moves a score by 0.04-0.4 points. Such a
# zero-width t interval excludes 0 without saying anything: no verdict is drawn from it.
EQUAL_BELOW = 1e-3


@dataclass(frozen=True)
class Comparison:
    """``method`` against the best of ``others`` (one entry: against that method).

    Labels follow the paper's Table 2: "best of A, P, L" is the best of Adapter, Prefix-tuning, LoRA.
    """

    method: str
    others: tuple[str, ...]
    kind: str  # "best single", "gate" (against its NoGate ablation) or "one" (against one other method)

    @property
    def label(self) -> str:
        if self.kind in ("gate", "one"):
            return f"{METHODS[self.method]} vs {METHODS[self.others[0]]}"
        initials = [METHODS[m][0] for m in self.others]  # the paper's "A, P, L"; full names where they clash
        names = initials if len(set(initials)) == len(initials) else [METHODS[m] for m in self.others]
        return f"{METHODS[self.method]} vs best of " + ", ".join(names)


def comparisons() -> list[Comparison]:
    """The paper's Table 2, then each UniPELT variant against its NoGate ablation (a preset ``<name>_nogate``),
    then the design space's methods against UniPELT (APL) and its single methods against the best of A, P, L.
    A comparison whose runs a grid lacks is left out of its report."""
    out = [Comparison(u, tuple(singles), "best single") for u, singles in TABLE2]
    out += [Comparison(u, (f"{u}_nogate",), "gate") for u, _ in TABLE2 if f"{u}_nogate" in METHODS]
    out += [Comparison(m, ("unipelt_apl",), "one") for m in DESIGN_SPACE]
    singles = [m for m in DESIGN_SPACE if not m.startswith("unipelt")]
    out += [Comparison(m, PAPER_SINGLES, "best single") for m in singles]
    return out


def t_interval(xs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Two-sided Student-t interval of the mean; None for fewer than two values."""
    if len(xs) < 2:
        return None
    mean, sd = statistics.fmean(xs), statistics.stdev(xs)
    half = student_t.ppf(0.5 + confidence / 2, len(xs) - 1) * sd / math.sqrt(len(xs))
    return mean - half, mean + half


def zero_width(low: float, high: float) -> bool:
    """Equal gains at every seed (sd 0, up to float32 rounding): an interval that cannot judge anything."""
    return high - low < EQUAL_BELOW


def best_on_dev(cells: Mapping[Key, Cell], k: str, task: str, candidates: Sequence[str]) -> str | None:
    """The candidate with the best mean dev score; None unless every candidate has one."""
    means = {m: cells[(k, task, m)].dev_mean for m in candidates if (k, task, m) in cells}
    if len(means) < len(candidates) or any(v is None for v in means.values()):
        return None
    return max(candidates, key=lambda m: means[m])  # max keeps the first of equal values


def _why_missing(cells: Mapping[Key, Cell], k: str, task: str, methods: Sequence[str]) -> str:
    """Why a comparison cell is empty: which method has no finished run (or no dev score)."""
    for m in methods:
        c = cells.get((k, task, m))
        if c is None or not c.planned:
            return f"no {METHODS[m]} runs"
        if not c.scores:
            return f"no finished {METHODS[m]} run"
        if c.dev_mean is None:
            return f"no dev score for {METHODS[m]}"
    return "no seed that both finished"


def _paper_gain(setting: str, comp: Comparison, task: str | None, tasks: Sequence[str]) -> float | None:
    """The paper's gain on one task, or its average (the published Table 2 when all 8 tasks are there)."""

    def per_task(t: str) -> float | None:
        name = TASKS[t].paper_name
        u = paper.score(setting, METHODS[comp.method], name)
        others = [paper.score(setting, METHODS[m], name) for m in comp.others]
        return None if u is None or None in others else u - max(others)

    if task is not None:
        return per_task(task)
    if comp.kind == "best single" and len(tasks) == len(TASKS):
        label = "best of {" + ";".join(METHODS[m][0] for m in comp.others) + "}"
        u, b = paper.table2().get((setting, METHODS[comp.method])), paper.table2().get((setting, label))
        if u is not None and b is not None:
            return u - b
    gains = [per_task(t) for t in tasks]
    return None if not gains or None in gains else statistics.fmean(gains)


def _row(k, comp, task, versus, gains: Mapping[int, float], paper_gain, note: str | None) -> dict:
    values = list(gains.values())
    ci = t_interval(values)
    return {
        "k": k,
        "comparison": comp.label,
        "method": comp.method,
        "versus": versus,  # the method compared against (for the average: per task, "/"-joined)
        "task": task,
        "n_seeds": len(values),
        "seeds": " ".join(map(str, gains)),
        "gain_mean": statistics.fmean(values) if values else None,
        "ci_low": ci[0] if ci else None,
        "ci_high": ci[1] if ci else None,
        "paper_gain": paper_gain,
        "note": note,
        "claim": comp.kind != "one" and comp.method.startswith("unipelt"),  # the paper's claim, or its kind
    }


def paired_rows(
    cells: Mapping[Key, Cell], ks: Sequence[str], tasks_of: Callable[[str], Sequence[str]]
) -> list[dict]:
    """One row per (K, comparison, task) and one per (K, comparison) average; see the module doc."""
    rows = []
    for k in ks:
        tasks, setting = tasks_of(k), paper_setting(k)
        for comp in comparisons():
            if not any((k, t, comp.method) in cells for t in tasks) or not any(
                (k, t, m) in cells for t in tasks for m in comp.others
            ):
                continue
            per_task: dict[str, dict[int, float]] = {}
            versus = {}
            for task in tasks:
                other = best_on_dev(cells, k, task, comp.others)
                u = cells.get((k, task, comp.method))
                gains: dict[int, float] = {}
                if other is not None and u is not None:
                    o = cells[(k, task, other)].scores
                    gains = {s: u.scores[s] - o[s] for s in sorted(u.scores) if s in o}
                note = None if gains else _why_missing(cells, k, task, [comp.method, *comp.others])
                if len(gains) == 1:
                    note = "one seed: no interval"
                rows.append(_row(k, comp, task, other, gains, _paper_gain(setting, comp, task, tasks), note))
                if gains:
                    per_task[task], versus[task] = gains, other
            missing = [t for t in tasks if t not in per_task]
            common = sorted(set.intersection(*(set(g) for g in per_task.values()))) if per_task else []
            avg = {} if missing else {s: statistics.fmean(per_task[t][s] for t in tasks) for s in common}
            if missing:
                note = "no gain on " + ", ".join(TASKS[t].paper_name for t in missing)
            elif not avg:
                note = "no seed that every task has"
            else:
                note = "one seed: no interval" if len(avg) == 1 else None
            joined = "/".join(versus.get(t) or "-" for t in tasks)
            rows.append(_row(k, comp, "Avg", joined, avg, _paper_gain(setting, comp, None, tasks), note))
    return rows


def verdict(row: dict, backbone: str) -> str:
    """One sentence: does the paper's claim (a positive gain) hold on this backbone, per the interval?"""
    what = row["comparison"]
    if row["gain_mean"] is None:
        return f"{what} (K={row['k']}): no verdict on {backbone}, {row['note']}."
    paper_part = "" if row["paper_gain"] is None else f"; the paper's gain is {row['paper_gain']:+.2f}"
    n = row["n_seeds"]
    if row["ci_low"] is None:
        return (
            f"{what} (K={row['k']}): {row['gain_mean']:+.1f} points over the tasks on {backbone} from a "
            f"single seed, too few to judge{' the claim' if row.get('claim', True) else ''}{paper_part}."
        )
    interval = f"{row['gain_mean']:+.1f} points, 95 % CI [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}] over {n} seeds"
    name = METHODS.get(row.get("method", ""), "the first")
    if zero_width(row["ci_low"], row["ci_high"]):
        judged = "the same gain at every seed (sd 0): a t interval cannot judge it"
    elif not row.get("claim", True):  # no claim to judge: a new method against another
        judged = (f"{name} is better" if row["ci_low"] > 0 else f"{name} is worse" if row["ci_high"] < 0
                  else "no difference established: the interval includes 0")
    elif row["ci_low"] > 0:
        judged = "the claim holds"
    elif row["ci_high"] < 0:
        judged = "the claim does not hold: UniPELT is worse"
    else:
        judged = "the claim is not established: the interval includes 0"
    return f"{what} (K={row['k']}) on {backbone}: {interval}; {judged}{paper_part}."
