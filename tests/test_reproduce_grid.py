"""The grid runner: every run once, failures recorded, resumable, no run taken twice.

Most tests drive a fake CLI (a few lines that write summary.json like `cli.py fit` does) so they
take seconds; `test_real_cli_grid` runs the real `cli.py` on a tiny random BERT and fixture data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lightning_modules import locks
from reproduce.grid import (
    ArgumentsChanged,
    GridOptions,
    Run,
    changed_runs,
    cpu_threads_per_run,
    parse_ints,
    plan,
    run_grid,
    status,
)

ROOT = Path(__file__).resolve().parents[1]

FAKE_CLI = r"""
import json, os, sys, time
args = sys.argv[2:]
opt = {args[i]: args[i + 1] for i in range(0, len(args) - 1) if args[i].startswith("--")}
task = os.path.basename(opt["--config"]).split("_")[0]
method, seed, out = opt["--model.method"], int(opt["--data.seed"]), opt["--trainer.default_root_dir"]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(f"{task}/{method}/{seed}\n")
if os.environ.get("FAKE_PIDS"):
    with open(os.environ["FAKE_PIDS"], "a") as f:
        f.write(f"{os.getpid()}\n")
print("training", task, method, seed, flush=True)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
if f"{task}:{method}" in os.environ.get("FAKE_FAIL", "").split(","):
    print("RuntimeError: boom", file=sys.stderr)
    sys.exit(3)
score = 0.5 + 0.01 * seed + 0.1 * (method == "unipelt_ap") + 0.05 * (task == "rte")
os.makedirs(out + "/lightning_logs/version_0", exist_ok=True)
open(out + "/lightning_logs/version_0/config.yaml", "w").write(f"model:\n  method: {method}\n")
gates = {"layer0.adapter": 0.4 + 0.1 * seed, "layer1.adapter": 0.6,
         "layer0.prefix": 0.3, "layer1.prefix": 0.7}
summary = {"task": task, "k_shot": 100, "method": method, "data_seed": seed, "seed": seed,
           "model_name_or_path": "fake", "best_val": {"name": "val/accuracy", "value": score},
           "test": {"test/accuracy": score, "test/f1": score, "test/spearman": score},
           "trainable_params": 10 if method != "finetune" else 1000, "total_params": 1000,
           "epochs": 3, "fit_time_s": 1.0, "train_time_per_epoch_s": 0.5 if method != "finetune" else 1.0,
           "test_time_s": 0.2, "test_examples": 20, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "omp": os.environ.get("OMP_NUM_THREADS"),
           "gates": gates if method.startswith("unipelt") else {}}
json.dump(summary, open(out + "/summary.json", "w"))
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake CLI, its invocation log, and GridOptions pointing at both."""
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    log = tmp_path / "invocations.log"
    log.touch()
    monkeypatch.setenv("FAKE_LOG", str(log))
    opts = GridOptions(
        out=tmp_path / "grid", cli=[sys.executable, str(script)], configs_dir=tmp_path / "configs"
    )
    return opts, log


GRID = plan(["rte", "mrpc"], ["100"], ["lora", "unipelt_ap"], [0, 1])


def invocations(log: Path) -> list[str]:
    return log.read_text().split()


def test_parse_seeds_and_plan_shape():
    assert parse_ints("0-4") == [0, 1, 2, 3, 4] and parse_ints("0,2-3") == [0, 2, 3]
    assert len(GRID) == 8 and len(set(GRID)) == 8
    assert Run("mrpc", "full", "lora", 3).rel_dir == Path("mrpc/full/lora/seed3")


def test_grid_records_failure_and_goes_on(fake, monkeypatch):
    opts, log = fake
    monkeypatch.setenv("FAKE_FAIL", "mrpc:lora")
    res = run_grid(GRID, opts)
    assert (res.done, res.failed) == (6, 2)
    assert sorted(invocations(log)) == sorted(f"{r.task}/{r.method}/{r.seed}" for r in GRID)
    ok = json.loads((opts.out / "rte/k100/unipelt_ap/seed1/metrics.json").read_text())
    assert ok["status"] == "done" and ok["test"]["test/accuracy"] == pytest.approx(0.66)
    assert ok["command"][-2:] == ["--trainer.default_root_dir", str(opts.out / "rte/k100/unipelt_ap/seed1")]
    assert ["--model.method", "unipelt_ap"] == ok["command"][5:7] and "method: unipelt_ap" in ok["config"]
    bad = json.loads((opts.out / "mrpc/k100/lora/seed0/metrics.json").read_text())
    assert bad["status"] == "failed" and bad["returncode"] == 3
    assert any("RuntimeError: boom" in line for line in bad["log_tail"])
    assert not list((opts.out / ".locks").iterdir())  # every claim released


def test_resume_skips_finished_and_restarts_unfinished(fake, monkeypatch):
    opts, log = fake
    monkeypatch.setenv("FAKE_FAIL", "mrpc:lora")
    run_grid(GRID, opts)
    # An interrupted run: a folder with partial outputs and no metrics.json.
    cut = opts.out / "rte/k100/lora/seed1"
    (cut / "metrics.json").unlink()
    (cut / "partial.ckpt").write_text("half")
    log.write_text("")
    res = run_grid(GRID, opts)
    assert invocations(log) == ["rte/lora/1"]  # failed runs are not retried by default
    assert not (cut / "partial.ckpt").exists() and status(cut) == "done"
    assert (res.done, res.failed) == (6, 2)
    log.write_text("")
    monkeypatch.setenv("FAKE_FAIL", "")
    opts.retry_failed = True
    res = run_grid(GRID, opts)
    assert sorted(invocations(log)) == ["mrpc/lora/0", "mrpc/lora/1"] and (res.done, res.failed) == (8, 0)


def test_finished_runs_with_other_arguments_are_refused_or_rerun(fake):
    opts, log = fake
    opts.method_args = {"lora": ["--model.learning_rate", "1e-3"]}
    opts.data_dir, opts.model = "/here/glue", "/here/model"
    run_grid(GRID, opts)
    log.write_text("")
    # Moving the grid (other config/data/model paths) is not a change: it resumes as it is.
    opts.configs_dir, opts.data_dir, opts.model = opts.configs_dir / "moved", "/elsewhere/glue", "/elsewhere/model"
    assert run_grid(GRID, opts).done == 8 and invocations(log) == []
    # Another learning rate for lora is: refused, nothing run or deleted ...
    opts.method_args = {"lora": ["--model.learning_rate", "3e-3"]}
    changed = r"4 finished run\(s\) .* had `--model.learning_rate 1e-3` where this asks for " \
        r"`--model.learning_rate 3e-3`"
    with pytest.raises(ArgumentsChanged, match=changed):
        run_grid(GRID, opts)
    assert invocations(log) == [] and all(status(opts.out / r.rel_dir) == "done" for r in GRID)
    # ... unless asked: exactly the changed runs run again, with the new arguments.
    opts.rerun_changed = True
    assert run_grid(GRID, opts).done == 8
    assert sorted(invocations(log)) == ["mrpc/lora/0", "mrpc/lora/1", "rte/lora/0", "rte/lora/1"]
    assert changed_runs(GRID, opts) == []


def test_interrupted_grid_resumes_without_redoing(fake, tmp_path):
    opts, log = fake
    cmd = [
        sys.executable,
        "-c",
        "import sys; from reproduce import main; sys.exit(main(sys.argv[1:]))",
        "reproduce",
        "--tasks",
        "rte,mrpc",
        "--k",
        "100",
        "--methods",
        "lora,unipelt_ap",
        "--seeds",
        "0-1",
        "--out",
        str(opts.out),
        "--cli",
        f"{sys.executable} {tmp_path / 'fake_cli.py'}",
    ]
    pids = tmp_path / "pids.log"
    env = dict(os.environ, FAKE_SLEEP="0.7", FAKE_PIDS=str(pids))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 60
    while len(list(opts.out.rglob("metrics.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    # No run outlives the grid that started it (it would go on writing into a folder being resumed).
    alive = [pid for pid in map(int, pids.read_text().split()) if locks._pid_alive(pid)]
    assert alive == [], f"run processes still alive after the grid exited: {alive}"
    finished = {p.parent for p in opts.out.rglob("metrics.json")}
    assert 2 <= len(finished) < 8
    started = invocations(log)
    log.write_text("")
    env["FAKE_SLEEP"], env["FAKE_PIDS"] = "0", ""
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ETA" in done.stdout or "8/8" in done.stdout
    rerun = invocations(log)
    assert len(rerun) == 8 - len(finished)  # the interrupted run restarts, finished ones do not
    assert set(rerun) | {"/".join([p.parts[-4], p.parts[-2], p.parts[-1][4:]]) for p in finished} >= set(
        started
    )
    assert all(status(opts.out / r.rel_dir) == "done" for r in GRID)


def test_two_grids_at_once_never_take_the_same_run(fake, tmp_path):
    opts, log = fake
    cmd = [
        sys.executable,
        "-c",
        "import sys; from reproduce import main; sys.exit(main(sys.argv[1:]))",
        "reproduce",
        "--tasks",
        "rte,mrpc",
        "--methods",
        "lora,unipelt_ap",
        "--seeds",
        "0-1",
        "--workers",
        "2",
        "--out",
        str(opts.out),
        "--cli",
        f"{sys.executable} {tmp_path / 'fake_cli.py'}",
    ]
    env = dict(os.environ, FAKE_SLEEP="0.3")
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    runs = invocations(log)
    assert sorted(runs) == sorted(set(runs)) and len(runs) == 8
    assert all(status(opts.out / r.rel_dir) == "done" for r in GRID)


def test_devices_pin_one_gpu_per_worker(fake):
    opts, _ = fake
    opts.devices, opts.workers = ["0", "1"], 2
    run_grid(GRID[:4], opts)
    recs = [json.loads((opts.out / r.rel_dir / "metrics.json").read_text()) for r in GRID[:4]]
    assert {r["cuda"] for r in recs} <= {"0", "1"} and all(r["cuda"] == r["device"] for r in recs)


def test_parallel_cpu_runs_share_the_cores(fake, monkeypatch):
    opts, _ = fake
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    opts.workers = 2
    run_grid(GRID[:2], opts)
    assert {json.loads((opts.out / r.rel_dir / "metrics.json").read_text())["omp"] for r in GRID[:2]} == {"4"}
    assert cpu_threads_per_run(1, []) is None and cpu_threads_per_run(3, ["0", "1", "2"]) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    assert cpu_threads_per_run(2, []) is None


def test_lock_is_exclusive_and_stale_locks_are_reclaimed(tmp_path):
    path = tmp_path / "run.lock"
    wins = []
    threads = [threading.Thread(target=lambda: wins.append(locks.claim(path))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    assert not locks.claim(path)  # held by a live process (this one)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(f"{locks._HOST} {dead.pid}\n")
    assert locks.is_stale(path) and locks.claim(path)
    assert path.read_text().split()[1] == str(os.getpid())


@pytest.mark.slow
def test_real_cli_grid_fails_resumes_and_reports(tmp_path):
    """2 tasks x 2 methods x 2 seeds through the real cli.py on a tiny random BERT and fixture data."""
    pytest.importorskip("cli")
    from reproduce.report import build
    from reproduce.results import paper_score
    from tests.fixtures import write_rte, write_stsb, write_tiny_model

    model = write_tiny_model(tmp_path / "tiny-bert")
    data = write_stsb(write_rte(tmp_path / "glue"))
    opts = GridOptions(
        out=tmp_path / "grid",
        data_dir=str(data),
        model=str(model),
        workers=2,
        prune_checkpoints=True,
        extra_args=[
            "--data.k_shot",
            "16",
            "--data.dev_size",
            "24",
            "--data.batch_size",
            "8",
            "--trainer.max_epochs",
            "1",
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
        ],
        method_args={"stsb:lora": ["--model.learning_rate", "not-a-number"]},  # a run the CLI refuses
    )
    grid = plan(["rte", "stsb"], ["100"], ["lora", "unipelt_ap"], [0, 1])
    res = run_grid(grid, opts)
    assert (res.done, res.failed) == (6, 2)
    bad = json.loads((opts.out / "stsb/k100/lora/seed0/metrics.json").read_text())
    assert bad["status"] == "failed" and bad["returncode"] == 2 and bad["log_tail"]
    ok = json.loads((opts.out / "rte/k100/unipelt_ap/seed1/metrics.json").read_text())
    assert (
        ok["status"] == "done" and ok["seed"] == 1 and ok["data_seed"] == 1 and ok["method"] == "unipelt_ap"
    )
    assert set(ok["gates"]) == {"layer0.adapter", "layer1.adapter", "layer0.prefix", "layer1.prefix"}
    assert "test/accuracy" in ok["test"] and not list(opts.out.rglob("*.ckpt"))

    # Interrupt one finished run (its metrics.json gone, partial files left): only it runs again.
    cut = opts.out / "rte/k100/lora/seed1"
    before = {
        r: (opts.out / r.rel_dir / "metrics.json").stat().st_mtime_ns
        for r in grid
        if opts.out / r.rel_dir != cut
    }
    (cut / "metrics.json").unlink()
    res = run_grid(grid, opts)
    assert (res.done, res.failed) == (6, 2) and status(cut) == "done"
    assert all((opts.out / r.rel_dir / "metrics.json").stat().st_mtime_ns == t for r, t in before.items())

    # The report's cells are the mean/std of the run files.
    rows = {(r["task"], r["method"]): r for r in build(opts.out).table1}
    for task, method in (("rte", "lora"), ("rte", "unipelt_ap"), ("stsb", "unipelt_ap")):
        recs = [
            json.loads((opts.out / task / "k100" / method / f"seed{s}/metrics.json").read_text())
            for s in (0, 1)
        ]
        scores = [paper_score(r) for r in recs]
        assert rows[(task, method)]["mean"] == pytest.approx(sum(scores) / 2)
        assert rows[(task, method)]["std"] == pytest.approx(abs(scores[0] - scores[1]) / 2**0.5)
    assert rows[("stsb", "lora")]["n_seeds"] == 0 and not rows[("stsb", "lora")]["complete"]


def test_method_args_keys_are_checked_and_uncovered_methods_are_named(tmp_path, capsys):
    from reproduce.grid import main

    base = ["--tasks", "rte,stsb", "--k", "100", "--methods", "lora,adapter", "--seeds", "0",
            "--out", str(tmp_path / "grid"), "--dry-run", "--method-args"]
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"lroa": ["--model.learning_rate", "1e-3"], "stsb:lora": []}))
    with pytest.raises(SystemExit, match=r"unknown key\(s\) lroa; keys are <method> or <task>:<method>"):
        main([*base, str(typo)])
    with pytest.raises(SystemExit, match="cannot read it as JSON"):
        main([*base, str(tmp_path / "absent.json")])

    partial = tmp_path / "partial.json"
    rates = {"lora": ["--model.learning_rate", "1e-3"], "stsb:adapter": "--model.learning_rate 3e-3"}
    partial.write_text(json.dumps(rates))
    assert main([*base, str(partial)]) == 0
    out, err = capsys.readouterr()
    # adapter has a rate on STS-B only: its RTE run would fall back to the config's default.
    assert "gives no arguments for adapter: those runs use the config's defaults" in err
    commands = out.strip().splitlines()
    assert len(commands) == 4 and sum("--model.learning_rate 3e-3" in c for c in commands) == 1


def test_a_multi_task_run_is_its_tasks_joined_by_plus(tmp_path):
    from reproduce.grid import command, main, parse_names
    from reproduce.tasks import TASKS

    assert parse_names("sst2+rte,rte", TASKS, "task") == ["sst2+rte", "rte"]
    with pytest.raises(SystemExit, match="unknown task: sst2\\+foo"):
        parse_names("sst2+foo", TASKS, "task")
    with pytest.raises(SystemExit, match="unknown method: lora\\+adapter"):
        parse_names("lora+adapter", ["lora", "adapter"], "method")
    opts = GridOptions(out=tmp_path, configs_dir=tmp_path / "configs")
    cmd = command(Run("sst2+cola+rte", "100", "lora", 2), opts, tmp_path / "run")
    assert cmd[cmd.index("--config") + 1] == str(tmp_path / "configs" / "multitask_k100.yaml")
    assert cmd[cmd.index("--data.tasks") + 1] == "[sst2, cola, rte]" and cmd[cmd.index("--data.seed") + 1] == "2"
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"sst2+rte:lora": "--model.learning_rate 1e-3"}))
    assert main(["--tasks", "sst2+rte", "--methods", "lora", "--seeds", "0", "--out", str(tmp_path / "g"),
                 "--method-args", str(rates), "--dry-run"]) == 0
