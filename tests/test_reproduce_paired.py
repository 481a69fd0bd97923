"""Table 2 as a paired comparison, against a hand computation on fixture metrics files.

Hand figures (points): RTE gains of UniPELT (APL) over Adapter (the best single on dev) are
1, 2, 4 at seeds 0-2; MRPC gains over LoRA are 0, -1, -2. t(0.975, 2) = 4.302652729911275.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import reproduce
from reproduce.paired import t_interval, verdict
from reproduce.report import build

T_975_2 = 4.302652729911275  # Student t quantile, 2 degrees of freedom (statistical tables)

# task -> method -> (dev score of every seed, test scores of seeds 0, 1, 2); fractions as the CLI logs them
SCORES = {
    "rte": {
        "adapter": (0.60, [0.50, 0.52, 0.54]),
        "prefix": (0.55, [0.70, 0.70, 0.70]),  # best on test, worse on dev: must not be chosen
        "lora": (0.58, [0.90, 0.90, 0.90]),
        "unipelt_apl": (0.50, [0.51, 0.54, 0.58]),
        "unipelt_apl_nogate": (0.50, [0.51, 0.50, 0.50]),
    },
    "mrpc": {
        "adapter": (0.70, [0.80, 0.80, 0.80]),
        "prefix": (0.70, [0.60, 0.60, 0.60]),
        "lora": (0.75, [0.81, 0.82, 0.83]),
        "unipelt_apl": (0.10, [0.81, 0.81, 0.81]),
    },
}
KEYS = {"rte": ("val/accuracy", "test/accuracy"), "mrpc": ("val/f1", "test/f1")}


def write(root: Path, task: str, method: str, seed: int, dev: float, test: float) -> None:
    d = root / task / "k100" / method / f"seed{seed}"
    d.mkdir(parents=True)
    val_key, test_key = KEYS[task]
    rec = {
        "status": "done",
        "run": {"task": task, "k": "100", "method": method, "seed": seed},
        "model_name_or_path": "/some/machine/site-packages/tiny_pkg/model",
        "best_val": {"name": val_key, "value": dev},
        "test": {test_key: test},
        "trainable_params": 10,
        "total_params": 100,
    }
    (d / "metrics.json").write_text(json.dumps(rec))


@pytest.fixture
def grid(tmp_path):
    for task, methods in SCORES.items():
        for method, (dev, tests) in methods.items():
            for seed, test in enumerate(tests):
                write(tmp_path, task, method, seed, dev, test)
    return tmp_path


def rows(root):
    return {(r["comparison"], r["task"]): r for r in build(root).table2}


def test_gain_per_task_and_average_equal_the_hand_computation(grid):
    r = rows(grid)
    best = "UniPELT (APL) vs best of A, P, L"
    rte, mrpc, avg = r[(best, "rte")], r[(best, "mrpc")], r[(best, "Avg")]
    assert rte["versus"] == "adapter" and mrpc["versus"] == "lora"  # chosen on dev, not on test
    assert rte["gain_mean"] == pytest.approx(7 / 3) and rte["n_seeds"] == 3
    half = T_975_2 * math.sqrt(7 / 3) / math.sqrt(3)  # sd of (1, 2, 4) is sqrt(7/3)
    assert (rte["ci_low"], rte["ci_high"]) == (pytest.approx(7 / 3 - half), pytest.approx(7 / 3 + half))
    half = T_975_2 * 1 / math.sqrt(3)  # (0, -1, -2): mean -1, sd 1
    assert mrpc["gain_mean"] == pytest.approx(-1) and mrpc["ci_low"] == pytest.approx(-1 - half)
    # average over tasks per seed: 0.5, 0.5, 1 -> mean 2/3, sd sqrt(1/12)
    half = T_975_2 * math.sqrt(1 / 12) / math.sqrt(3)
    assert avg["gain_mean"] == pytest.approx(2 / 3) and avg["ci_high"] == pytest.approx(2 / 3 + half)
    # the paper's gains: RTE 55.45 - max(52.78, 55.96, 55.02); MRPC 81.71 - max(81.40, 81.22, 81.66)
    assert rte["paper_gain"] == pytest.approx(-0.51) and mrpc["paper_gain"] == pytest.approx(0.05)
    assert avg["paper_gain"] == pytest.approx((-0.51 + 0.05) / 2)


def test_nogate_comparison_where_its_runs_exist(grid):
    r = rows(grid)
    gate = "UniPELT (APL) vs UniPELT (APL)-NoGate"
    rte = r[(gate, "rte")]  # gains 0, 4, 8
    assert rte["gain_mean"] == pytest.approx(4) and rte["ci_low"] == pytest.approx(4 - T_975_2 * 4 / math.sqrt(3))
    assert r[(gate, "mrpc")]["gain_mean"] is None and r[(gate, "mrpc")]["note"] == "no UniPELT (APL)-NoGate runs"
    assert r[(gate, "Avg")]["gain_mean"] is None and r[(gate, "Avg")]["note"] == "no gain on MRPC"
    assert not any(c.startswith("UniPELT (AP) ") for c, _ in r)  # no UniPELT (AP) runs: no rows


def test_test_scores_never_choose_the_best_single(grid):
    """Raising a rival's test scores changes no choice; raising its dev score does."""
    before = rows(grid)[("UniPELT (APL) vs best of A, P, L", "rte")]
    for seed in range(3):
        path = grid / "rte" / "k100" / "lora" / f"seed{seed}" / "metrics.json"
        rec = json.loads(path.read_text())
        rec["test"]["test/accuracy"] = 0.99
        path.write_text(json.dumps(rec))
    assert rows(grid)[("UniPELT (APL) vs best of A, P, L", "rte")] == before
    for seed in range(3):
        path = grid / "rte" / "k100" / "lora" / f"seed{seed}" / "metrics.json"
        rec = json.loads(path.read_text())
        rec["best_val"]["value"] = 0.61
        path.write_text(json.dumps(rec))
    assert rows(grid)[("UniPELT (APL) vs best of A, P, L", "rte")]["versus"] == "lora"


def test_one_seed_has_no_interval_and_says_so(tmp_path):
    for method, (dev, tests) in SCORES["rte"].items():
        write(tmp_path, "rte", method, 0, dev, tests[0])
    r = rows(tmp_path)[("UniPELT (APL) vs best of A, P, L", "Avg")]
    assert r["gain_mean"] == pytest.approx(1) and r["ci_low"] is None and r["note"] == "one seed: no interval"
    assert "single seed, too few to judge" in verdict(r, "tiny")
    assert t_interval([1.0]) is None


def test_verdict_sentence():
    row = {"comparison": "X vs best of A, P", "k": "100", "n_seeds": 5, "gain_mean": 2.0, "note": None}
    holds = verdict(row | {"ci_low": 0.5, "ci_high": 3.5, "paper_gain": 2.2}, "bert")
    assert holds == (
        "X vs best of A, P (K=100) on bert: +2.0 points, 95 % CI [+0.5, +3.5] over 5 seeds; "
        "the claim holds; the paper's gain is +2.20."
    )
    worse = {"gain_mean": -2.0, "ci_low": -3.0, "ci_high": -1.0, "paper_gain": None}
    assert "does not hold" in verdict(row | worse, "b")
    assert "not established" in verdict(row | {"ci_low": -1.0, "ci_high": 5.0, "paper_gain": None}, "b")
    same = verdict(row | {"gain_mean": -1.8, "ci_low": -1.80506, "ci_high": -1.80505, "paper_gain": None}, "b")
    assert same.endswith("[-1.8, -1.8] over 5 seeds; the same gain at every seed (sd 0): a t interval cannot judge it.")


def test_markdown_and_csv_carry_the_paired_table(grid, tmp_path):
    out = tmp_path / "rep" / "report.md"
    assert reproduce.main(["report", str(grid), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## Table 2: UniPELT against the best single method, paired by seed" in text
    assert "- UniPELT (APL) vs best of A, P, L (K=100) on tiny_pkg/model: +0.7 points, 95 % CI [-0.1, +1.4]" in text
    assert "/some/machine" not in text
    csv_text = out.with_name("report_table2.csv").read_text().splitlines()
    assert csv_text[0].startswith("k,comparison,method,versus,task,n_seeds,seeds,gain_mean,ci_low,ci_high")


def test_the_design_space_unions_are_compared_with_the_single_methods_they_gate():
    from reproduce.paired import comparisons

    labels = {c.method: c.label for c in comparisons() if c.kind == "best single"}
    assert labels["unipelt_apl"] == "UniPELT (APL) vs best of A, P, L"  # the paper's label, unchanged
    assert labels["unipelt_apli"] == "UniPELT (APLI) vs best of A, P, L, I"
    assert labels["unipelt_apl_dora"] == "UniPELT (APL, DoRA) vs best of A, P, D"
    # initials that clash (Parallel adapter, Prefix-tuning) give the full names
    assert labels["unipelt_all"] == "UniPELT (all) vs best of Adapter, Parallel adapter, Prefix-tuning, LoRA, IA3"


def test_the_design_space_is_paired_with_unipelt_apl_and_its_singles_with_the_best_of_a_p_l(tmp_path):
    """Issue 28's rows: a new method against UniPELT (APL) seed for seed, gain = new - APL, judged without the
    paper's claim; a new single method against the best of A, P, L chosen on dev."""
    for seed, (apl, ia3, adapter, prefix, lora) in enumerate(
        [(0.60, 0.62, 0.50, 0.70, 0.55), (0.61, 0.64, 0.52, 0.70, 0.50), (0.59, 0.625, 0.54, 0.70, 0.52)]
    ):
        for method, dev, test in [("unipelt_apl", 0.7, apl), ("ia3", 0.6, ia3), ("adapter", 0.5, adapter),
                                  ("prefix", 0.55, prefix), ("lora", 0.8, lora)]:
            write(tmp_path, "rte", method, seed, dev, test)
    table = rows(tmp_path)
    versus_apl = table[("IA3 vs UniPELT (APL)", "rte")]
    assert versus_apl["versus"] == "unipelt_apl" and versus_apl["seeds"] == "0 1 2"
    assert versus_apl["gain_mean"] == pytest.approx((2 + 3 + 3.5) / 3)
    sentence = verdict(table[("IA3 vs UniPELT (APL)", "Avg")], "tiny")
    assert "IA3 is better" in sentence and "claim" not in sentence
    singles = table[("IA3 vs best of A, P, L", "rte")]
    assert singles["versus"] == "lora"  # best on dev; prefix is best on test and must not be chosen
    assert singles["gain_mean"] == pytest.approx((7 + 14 + 10.5) / 3)
    assert not any(c.startswith(("DoRA", "UniPELT (APLI)")) for c, _ in table)  # no runs: no rows
