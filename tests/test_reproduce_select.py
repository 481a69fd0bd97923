"""`unipelt select`: learning rates chosen on dev scores only, compared on the same runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import main
from reproduce.grid import _load_method_args
from reproduce.selection import choose, dev_scores


def write_run(root: Path, task: str, method: str, seed: int, lr: float, dev: float, test: float,
              status: str = "done") -> None:
    folder = root / task / "k100" / method / f"seed{seed}"
    folder.mkdir(parents=True)
    record = {"status": status, "run": {"task": task, "k": "100", "method": method, "seed": seed},
              "task": task, "method": method, "learning_rate": lr,
              "best_val": {"name": "val/accuracy", "value": dev}, "test": {"test/accuracy": test}}
    (folder / "metrics.json").write_text(json.dumps(record))


@pytest.fixture
def sweep(tmp_path: Path) -> list[Path]:
    low, high = tmp_path / "lr_x1", tmp_path / "lr_x3"
    for task, (d_low, d_high) in {"rte": (0.50, 0.60), "sst2": (0.80, 0.76)}.items():
        # lora: high wins on dev on average (0.68 vs 0.65) although low has the better *test* scores.
        write_run(low, task, "lora", 0, 5e-4, d_low, test=0.99)
        write_run(high, task, "lora", 0, 1.5e-3, d_high, test=0.10)
        # adapter: low wins on dev.
        write_run(low, task, "adapter", 0, 1e-4, d_high, test=0.10)
        write_run(high, task, "adapter", 0, 3e-4, d_low, test=0.99)
    write_run(high, "mrpc", "lora", 0, 1.5e-3, 0.01, test=0.5)  # only one rate has it: not compared
    write_run(low, "mrpc", "adapter", 0, 1e-4, 0.99, test=0.5, status="failed")  # failed: ignored
    return [low, high]


def test_choice_uses_dev_scores_on_common_runs(sweep: list[Path]) -> None:
    scores = dev_scores(sweep)
    assert set(scores) == {("lora", 5e-4), ("lora", 1.5e-3), ("adapter", 1e-4), ("adapter", 3e-4)}
    assert len(scores[("lora", 1.5e-3)]) == 3 and len(scores[("adapter", 1e-4)]) == 2
    chosen = choose(scores)
    assert chosen["lora"] == (1.5e-3, pytest.approx((0.60 + 0.76) / 2))
    assert chosen["adapter"] == (1e-4, pytest.approx((0.60 + 0.76) / 2))


def test_command_writes_method_args_the_grid_reads(sweep: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "chosen" / "lr.json"
    with pytest.raises(SystemExit) as exit_:
        main(["select", *map(str, sweep), "--out", str(out), "--inherit", "unipelt_ap,unipelt_apl=lora"])
    assert exit_.value.code == 0
    assert _load_method_args(out) == {
        "adapter": ["--model.learning_rate", "0.0001"],
        "lora": ["--model.learning_rate", "0.0015"],
        "unipelt_ap": ["--model.learning_rate", "0.0015"],
        "unipelt_apl": ["--model.learning_rate", "0.0015"],
    }
    table = out.with_suffix(".md").read_text()
    assert "| method | learning rate | SST-2 | MRPC | RTE | compared | chosen |" in table
    assert "| LoRA | 0.0015 | 76.0 | 1.0 | 60.0 | 68.0 | **yes** |" in table
    assert "| LoRA | 0.0005 | 80.0 |  | 50.0 | 65.0 |  |" in table
    assert "lora: learning rate 0.0015" in capsys.readouterr().out


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a folder"):
        main(["select", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="no finished runs"):
        main(["select", str(tmp_path), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--inherit 'lorra=lora'"):
        main(["select", str(tmp_path), "--out", str(tmp_path / "x.json"), "--inherit", "lorra=lora"])


def test_per_task_choice_for_a_task_of_its_own(sweep: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "lr.json"
    with pytest.raises(SystemExit) as exit_:
        main(["select", *map(str, sweep), "--out", str(out), "--per-task", "sst2"])
    assert exit_.value.code == 0
    # Without SST-2, RTE decides the shared rates (lora: 0.60 > 0.50; adapter: 0.60 > 0.50);
    # SST-2 alone prefers the opposite rates (lora 0.80 > 0.76; adapter 0.80 > 0.76).
    assert _load_method_args(out) == {
        "adapter": ["--model.learning_rate", "0.0001"],
        "lora": ["--model.learning_rate", "0.0015"],
        "sst2:adapter": ["--model.learning_rate", "0.0003"],
        "sst2:lora": ["--model.learning_rate", "0.0005"],
    }
    assert "## SST-2 alone" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="--per-task 'sts' is not a task"):
        main(["select", *map(str, sweep), "--out", str(out), "--per-task", "sts"])
