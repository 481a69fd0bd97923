"""Both kinds of run under DDP: 2 CPU processes (gloo) through the real `cli.py`, for a tiny BERT and a tiny Llama.

`fit` (then the test of its best checkpoint and the summary), `test --ckpt_path` and `predict` (one
file, the rows in input order) each give what one process gives. Odd-sized splits on purpose: the
default distributed sampler would pad one rank's share and count a row twice.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from decoder_fixtures import prompt_rows, write_jsonl

from cli import main
from lightning_modules.run import SUMMARY_FILE, build_cli
from tests.fixtures import WORDS, write_rte, write_tiny_model
from tests.test_cli import common_args
from tests.test_instruct_cli import write_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def logged_test_metrics(run: Path, version: int) -> dict[str, float]:
    """The test metrics a `test` subcommand logged (rank 0's CSV logger)."""
    rows = list(csv.DictReader((run / "lightning_logs" / f"version_{version}" / "metrics.csv").open()))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("test") and v}


def in_process_metrics(cli) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test")}


@pytest.mark.slow
def test_classifier_fit_test_predict_on_two_processes(tmp_path):
    model = write_tiny_model(tmp_path / "tiny-bert")
    glue = write_rte(tmp_path / "glue", n_train=60, n_dev=21)
    out = tmp_path / "ddp"
    args = common_args(model, glue, out)
    run_cli(["fit", *args, *DDP, "--trainer.max_epochs", "1", "--model.learning_rate", "0.01"], tmp_path)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    ckpts = sorted(p.name for p in out.rglob("*.ckpt"))
    assert len([c for c in ckpts if c.startswith("best")]) == 1, ckpts
    assert summary["test_examples"] == 21  # every test example counted once across the two ranks
    best = summary["best_checkpoint"]
    one = build_cli(["test", *args, "--ckpt_path", best])  # one process
    scores = {k: v for k, v in in_process_metrics(one).items() if not k.endswith("/loss")}
    assert scores == pytest.approx(summary["test"], abs=1e-6)

    run_cli(["test", *args, *DDP, "--ckpt_path", best], tmp_path)
    assert logged_test_metrics(out, 1) == pytest.approx(in_process_metrics(one), abs=1e-6)

    rows = [{"id": f"p{i}", "sentence1": " ".join(WORDS[i % 7: i % 7 + 3]), "sentence2": WORDS[i] + " not" * (i % 2)}
            for i in range(11)]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    predict = ["predict", "--ckpt_path", best, "--data.predict_file", str(tmp_path / "pairs.csv"),
               "--data.eval_batch_size", "4", *QUIET]
    run_cli([*predict, *DDP, "--predictions", str(tmp_path / "ddp.csv")], tmp_path)
    main([*predict, "--predictions", str(tmp_path / "one.csv")])
    got, expected = (list(csv.DictReader((tmp_path / name).open())) for name in ("ddp.csv", "one.csv"))
    assert [r["id"] for r in got] == [r["id"] for r in rows]  # one file, the input's order
    assert [r["prediction"] for r in got] == [r["prediction"] for r in expected]
    probs = [[float(v) for k, v in r.items() if k.startswith("prob_")] for r in (*got, *expected)]
    torch.testing.assert_close(torch.tensor(probs[:11]), torch.tensor(probs[11:]), rtol=0, atol=2e-6)


@pytest.mark.slow
def test_instruction_fit_test_predict_on_two_processes(tmp_path):
    """The instruction path used to train, then crash in its summary (a broadcast on rank 0 alone).
    Without a test set, as then: the summary and export/ come at the end of fit."""
    llama = write_tiny_llama(tmp_path / "tiny-llama")
    write_jsonl(tmp_path / "train.jsonl", prompt_rows(40))
    write_jsonl(tmp_path / "test.jsonl", prompt_rows(7, seed=1))
    out = tmp_path / "ddp"
    args = ["--config", str(ROOT / "configs" / "instruct_example.yaml"), "--model.model_name_or_path", str(llama),
            "--data.train_file", str(tmp_path / "train.jsonl"), "--data.k_shot", "24", "--data.dev_size", "7",
            "--data.batch_size", "4", "--data.eval_batch_size", "2", "--data.max_seq_length", "64",
            "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(out), *QUIET]  # fmt: skip
    run_cli(["fit", *args, *DDP, "--trainer.max_epochs", "2"], tmp_path)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["test"] == {} and summary["best_val"]["value"] > 0
    assert summary["exported_weights"] == str(out / "export") and (out / "export" / "unipelt_config.json").is_file()
    best = summary["best_checkpoint"]
    test = [*args, "--data.test_file", str(tmp_path / "test.jsonl"), "--ckpt_path", best]
    one = in_process_metrics(build_cli(["test", *test]))
    assert set(one) == {"test/loss", "test/perplexity"}
    run_cli(["test", *test, *DDP], tmp_path)
    assert logged_test_metrics(out, 1) == pytest.approx(one, rel=1e-6, abs=1e-6)

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(5, seed=2, high=6))
    predict = ["predict", "--ckpt_path", best, "--data.predict_file", str(prompts), "--model.max_new_tokens", "4",
               "--data.eval_batch_size", "1", "--data.cache_dir", str(tmp_path / "cache"), *QUIET]  # no padding at all
    run_cli([*predict, *DDP, "--predictions", str(tmp_path / "ddp.jsonl")], tmp_path)
    main([*predict, "--predictions", str(tmp_path / "one.jsonl")])
    got = [json.loads(line) for line in (tmp_path / "ddp.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "generation"} for r in got] == prompt_rows(5, seed=2, high=6)
    assert (tmp_path / "ddp.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
