"""The report: numbers equal an independent mean/std of the run files; the paper column is the
packaged paper data; efficiency, majority baseline and gate plots come out right."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

import reproduce
from datamodules import DataConfigError
from reproduce import paper
from reproduce.baseline import from_glue_dir, majority_score
from reproduce.report import build, to_markdown
from reproduce.tasks import METHODS, TASKS

PAPER_CSV = Path(reproduce.__file__).parent / "paper_table1.csv"
SHARED_CSV = Path(__file__).resolve().parents[2] / "shared" / "paper" / "table1_glue_dev.csv"
METHODS_USED = ["finetune", "adapter", "prefix", "lora", "unipelt_ap", "unipelt_apl"]


def write_run(root: Path, task: str, method: str, seed: int, score: float, status: str = "done") -> dict:
    """A metrics.json as the runner writes it (summary + run block), with a known score."""
    key = TASKS[task].test_key
    rec = {
        "status": status,
        "run": {"task": task, "k": "100", "method": method, "seed": seed},
        "task": task,
        "k_shot": 100,
        "method": method,
        "seed": seed,
        "model_name_or_path": "tiny",
        "test": {"test/accuracy": 0.123, key: score},
        "trainable_params": 1000 if method == "finetune" else 10,
        "total_params": 1000,
        "train_time_per_epoch_s": 2.0 if method == "finetune" else 1.0 + seed,
        "test_time_s": 4.0,
        "test_examples": 100 if method == "finetune" else 50,
        "epochs": 3,
        "wall_time_s": 5.0,
        "command": ["x", "--trainer.default_root_dir", "d", "--lr", "1"],
        "gates": {f"layer{i}.{s}": 0.1 * i + 0.2 * seed for i in range(2) for s in ("adapter", "prefix")}
        if method.startswith("unipelt")
        else {},
    }
    if method == "lora":  # as summaries write it now: the share of the pretrained backbone alone
        rec |= {"backbone_params": 900, "trainable_pct": 100 * 10 / 900}
    if status != "done":
        rec = {k: rec[k] for k in ("status", "run", "task", "k_shot", "method", "seed")} | {"error": "boom"}
    d = root / task / "k100" / method / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(rec))
    return rec


@pytest.fixture
def grid(tmp_path):
    """rte, mrpc, stsb x 6 methods x 3 seeds with random scores; one run failed, one missing."""
    rng = random.Random(0)
    root = tmp_path / "grid"
    recs = []
    for task in ("rte", "mrpc", "stsb"):
        for method in METHODS_USED:
            for seed in range(3):
                if (task, method, seed) == ("stsb", "lora", 2):
                    continue  # never ran
                failed = (task, method, seed) == ("mrpc", "prefix", 1)
                recs.append(
                    write_run(root, task, method, seed, rng.uniform(0.3, 0.9), "failed" if failed else "done")
                )
    (root / ".plans").mkdir()
    planned = [
        {"task": t, "k": "100", "method": m, "seed": s}
        for t in ("rte", "mrpc", "stsb")
        for m in METHODS_USED
        for s in range(3)
    ]
    (root / ".plans" / "a.json").write_text(json.dumps({"runs": planned}))
    return root, recs


def test_table1_equals_independent_mean_std(grid):
    root, recs = grid
    rep = build(root)
    rows = {(r["task"], r["method"]): r for r in rep.table1}
    for task in ("rte", "mrpc", "stsb"):
        for method in METHODS_USED:
            scores = [
                100 * json.loads(p.read_text())["test"][TASKS[task].test_key]
                for p in (root / task / "k100" / method).glob("seed*/metrics.json")
                if json.loads(p.read_text())["status"] == "done"
            ]
            r = rows[(task, method)]
            assert r["mean"] == pytest.approx(np.mean(scores)) and r["std"] == pytest.approx(
                np.std(scores, ddof=1)
            )
            assert r["n_seeds"] == len(scores) and r["n_planned"] == 3 and r["complete"] == (len(scores) == 3)
    avg = rows[("Avg", "adapter")]
    assert avg["mean"] == pytest.approx(
        np.mean([rows[(t, "adapter")]["mean"] for t in ("rte", "mrpc", "stsb")])
    )
    assert rows[("Avg", "lora")]["complete"] is False and rows[("Avg", "adapter")]["complete"] is True


def test_paper_column_is_the_packaged_csv(grid):
    root, _ = grid
    with open(PAPER_CSV) as f:
        published = {(r["setting"], r["method"], r["task"]): float(r["score"]) for r in csv.DictReader(f)}
    for r in build(root).table1:
        if r["method"] == "majority":
            continue
        if r["task"] == "Avg":
            want = np.mean([published[("K=100", METHODS[r["method"]], t)] for t in ("RTE", "MRPC", "STS-B")])
        else:
            want = published[("K=100", METHODS[r["method"]], TASKS[r["task"]].paper_name)]
        assert r["paper"] == pytest.approx(want) and r["diff"] == pytest.approx(r["mean"] - want)


def test_packaged_paper_figures_are_consistent():
    t1 = paper.table1()
    if SHARED_CSV.exists():  # the packaged copy is the reference file, byte for byte
        assert PAPER_CSV.read_bytes() == SHARED_CSV.read_bytes()
    names = [t.paper_name for t in TASKS.values()]
    for setting, method, task in t1:
        if task == "Avg":
            assert t1[(setting, method, "Avg")] == pytest.approx(
                np.mean([t1[(setting, method, n)] for n in names]), abs=0.02
            )  # the paper rounds
    for setting in ("K=100", "K=500", "K=1000"):  # Table 2 = mean over tasks of the per-task best
        for label, singles in (
            ("best of {A;P}", ("Adapter", "Prefix-tuning")),
            ("best of {A;P;L}", ("Adapter", "Prefix-tuning", "LoRA")),
        ):
            best = np.mean([max(t1[(setting, m, n)] for m in singles) for n in names])
            assert paper.table2()[(setting, label)] == pytest.approx(best, abs=0.02)  # the paper rounds
    assert set(paper.table4()) <= set(METHODS.values())
    assert {m for _, m, _ in t1} - set(METHODS.values()) == {"Prefix L=50"}


def test_efficiency_relative_to_finetuning(grid):
    root, _ = grid
    eff = {r["method"]: r for r in build(root).efficiency}
    assert eff["finetune"]["train_time_pct"] == pytest.approx(100) and eff["adapter"]["trainable_pct"] == 1.0
    assert eff["lora"]["trainable_pct"] == pytest.approx(100 * 10 / 900)  # the run's own figure, not 10/1000
    # adapter: epochs take (1+0+1+2)/3 = 2 s vs 2 s; inference 4 s/50 vs 4 s/100 examples
    assert (
        eff["adapter"]["train_time_pct"] == pytest.approx(100) and eff["adapter"]["inference_time_pct"] == 200
    )
    assert eff["lora"]["paper_train_time_pct"] == 53


def test_majority_baseline(tmp_path):
    assert majority_score("mrpc", [1, 1, 0], [1, 0, 1, 1]) == pytest.approx(100 * 2 * 0.75 / 1.75)
    assert (
        majority_score("rte", ["a", "a", "b"], ["b", "a"]) == 50
        and majority_score("stsb", [1.0], [2.0]) is None
    )
    rte = tmp_path / "RTE"
    rte.mkdir()
    x, y = "entailment", "not_entailment"
    header = "index\tsentence1\tsentence2\tlabel\n"
    (rte / "train.tsv").write_text(header + "".join(f"{i}\ta\tb\t{lab}\n" for i, lab in enumerate([x, x, y])))
    (rte / "dev.tsv").write_text(header + "".join(f"{i}\ta\tb\t{lab}\n" for i, lab in enumerate([y, x, y, y])))
    assert from_glue_dir(tmp_path, list(TASKS)) == {"rte": 25.0}
    (rte / "dev.tsv").write_text(header + "0\ta\tb\tmaybe\n")  # present but malformed: an error, not a gap
    with pytest.raises(DataConfigError, match="dev.tsv:2"):
        from_glue_dir(tmp_path, ["rte"])


def test_report_command_writes_markdown_csv_and_gates(grid, tmp_path):
    root, _ = grid
    out = tmp_path / "rep" / "report.md"
    assert reproduce.main(["report", str(root), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## Table 1" in text and "UniPELT (APL)" in text and "*2/3*" in text and "## Failed runs" in text
    with open(out.with_name("report_table1.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == set(METHODS_USED)
    pytest.importorskip("matplotlib")
    assert reproduce.main(["report", str(root), "--out", str(out), "--gates"]) == 0
    assert {p.name for p in out.parent.glob("*.png")} == {
        "gates_k100_unipelt_ap.png",
        "gates_k100_unipelt_apl.png",
    }


def test_a_results_folder_reports_its_grid_and_a_run_held_twice_is_refused(grid, tmp_path, capsys):
    import shutil

    root, _ = grid
    results = tmp_path / "results"
    shutil.copytree(root, results / "grid")
    shutil.copytree(root, results / "sweep" / "x3")  # the same runs again: a sweep beside its grid
    assert reproduce.main(["report", str(results)]) == 0  # reads results/grid, writes results/report.md
    assert reproduce.main(["report", str(root), "--out", str(tmp_path / "direct.md")]) == 0
    assert (results / "report.md").read_text() == (tmp_path / "direct.md").read_text()
    capsys.readouterr()
    shutil.move(results / "grid", results / "main")  # no grid/ any more: both copies would be read
    assert reproduce.main(["report", str(results), "--out", str(tmp_path / "y.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "twice" in err and "main/" in err and "sweep/x3/" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "y.md").exists()


def test_markdown_has_baseline_row(grid):
    root, _ = grid
    text = to_markdown(build(root, {"rte": 52.7, "mrpc": 81.2, "stsb": None}))
    row = next(line for line in text.splitlines() if line.startswith("| Majority class"))
    assert "52.7" in row and "81.2" in row and "– (a constant prediction has no correlation)" in row


def test_setup_lists_shared_arguments_once_and_the_rate_each_run_used():
    from reproduce.report import _setup

    def rec(method: str, task: str, lrs: list[str], epochs: int, **extra: str) -> dict:
        cmd = ["cli.py", "fit", "--trainer.default_root_dir", "x", "--data.data_dir", "g"]
        for lr in lrs:  # a method-wide rate, then a per-task override: the last one is what ran
            cmd += ["--model.learning_rate", lr]
        for k, v in extra.items():
            cmd += [k, v]
        return {"status": "done", "method": method, "task": task, "command": cmd, "epochs": epochs,
                "model_name_or_path": "m", "learning_rate": float(lrs[-1])}

    lines = _setup([
        rec("lora", "rte", ["5e-4"], 20),
        rec("lora", "mrpc", ["5e-4"], 22),
        rec("lora", "stsb", ["5e-4", "1.5e-3"], 30),
        rec("adapter", "rte", ["3e-4"], 24, **{"--model.adapter_size": "16"}),
    ])
    assert "- Arguments of every run: `--data.data_dir g`." in lines
    assert "- Adapter: learning rate 0.0003; `--model.adapter_size 16`; epochs run 24-24 (mean 24.0)" in lines
    assert "- LoRA: learning rate 0.0005 (MRPC, RTE), 0.0015 (STS-B); epochs run 20-30 (mean 24.0)" in lines


def test_setup_states_the_saved_configs_settings_and_which_differ():
    from reproduce.report import _setup

    def rec(batch_size: int) -> dict:
        config = f"trainer:\n  precision: null\nmodel:\n  weight_decay: 0.0\ndata:\n  batch_size: {batch_size}\n"
        return {"status": "done", "method": "lora", "task": "rte", "config": config}

    same = next(line for line in _setup([rec(16), rec(16)]) if line.startswith("- Settings"))
    assert same == "- Settings from the runs' saved configs: batch_size 16, weight_decay 0.0, precision None."
    mixed = next(line for line in _setup([rec(16), rec(32)]) if line.startswith("- Settings"))
    assert "batch_size varies (16, 32)" in mixed
