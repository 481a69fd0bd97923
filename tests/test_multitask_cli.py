"""Multi-task runs through the real CLI: fit -> summary per task -> test and predict from the checkpoint alone,
one task exported alone, an exact resume, DDP on 2 processes, and bad task lists refused in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from cli import main
from lightning_modules.checkpointing import load_checkpoint_file
from lightning_modules.run import SUMMARY_FILE, build_cli
from tests.fixtures import write_rte, write_stsb, write_tiny_model
from tests.test_ddp import DDP, logged_test_metrics, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT folder, and RTE and STS-B in GLUE's layout (60 training rows, 21 test rows each)."""
    root = tmp_path_factory.mktemp("multitask")
    glue = write_stsb(write_rte(root / "glue", n_train=60, n_dev=21), n_train=60, n_dev=21)
    return write_tiny_model(root / "tiny-bert"), glue


def args(model: Path, data: Path, out: Path, tasks: str = "[rte, stsb]", method: str = "unipelt_apl") -> list[str]:
    return ["--data.tasks", tasks, "--model.model_name_or_path", str(model), "--model.method", method,
            "--data.data_dir", str(data), "--data.k_shot", "16", "--data.dev_size", "24", "--data.batch_size", "8",
            "--data.cache_dir", str(out.parent / "cache"), "--trainer.default_root_dir", str(out),
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def scores_of(cli) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/") and "loss" not in k}


def test_fit_test_predict_and_one_task_alone(files, tmp_path):
    out = tmp_path / "run"
    fit = build_cli(["fit", *args(*files, out), "--trainer.max_epochs", "3",
                     "--trainer.check_val_every_n_epoch", "1", "--model.learning_rate", "0.01"])
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["task"] == "rte+stsb" and summary["best_val"]["name"] == "val/mean"
    assert summary["head"] == "cls_mlp" and summary["task_gates"] == "embedding" and summary["test_examples"] == 42
    tasks = summary["tasks"]
    assert set(tasks) == {"rte", "stsb"} and tasks["stsb"]["labels"] == []
    assert tasks["stsb"]["main_metric"] == "spearman"
    assert set(tasks["rte"]["test"]) == {"test/accuracy"} and set(tasks["stsb"]["test"]) == {"test/pearson",
                                                                                              "test/spearman"}
    assert set(summary["gates"]) == {"rte", "stsb"} and summary["gates"]["rte"] != summary["gates"]["stsb"]
    assert summary["test"]["test/mean"] == pytest.approx(
        (summary["test"]["test/rte/accuracy"] + summary["test"]["test/stsb/spearman"]) / 2)

    # The best dev scores are those of the logged validation with the best val/mean (the selected checkpoint's).
    rows = list(csv.DictReader((out / "lightning_logs" / "version_0" / "metrics.csv").open()))
    evals = [r for r in rows if r.get("val/mean")]
    assert len(evals) == 3
    best = max(evals, key=lambda r: float(r["val/mean"]))
    assert summary["best_val"]["value"] == pytest.approx(float(best["val/mean"]))
    assert tasks["rte"]["dev"]["val/accuracy"] == pytest.approx(float(best["val/rte/accuracy"]))
    assert tasks["stsb"]["dev"]["val/spearman"] == pytest.approx(float(best["val/stsb/spearman"]))
    assert float(best["val/mean"]) == pytest.approx((float(best["val/rte/accuracy"])
                                                     + float(best["val/stsb/spearman"])) / 2)

    # test from the checkpoint alone: every task's scores, as after fit.
    where = ["--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false"]
    again = build_cli(["test", "--ckpt_path", summary["best_checkpoint"], *where])
    assert scores_of(again) == pytest.approx(summary["test"], abs=0)
    only = build_cli(["test", "--ckpt_path", summary["best_checkpoint"], "--data.task", "stsb", *where])
    assert scores_of(only) == pytest.approx({"test/stsb/pearson": summary["test"]["test/stsb/pearson"],
                                               "test/stsb/spearman": summary["test"]["test/stsb/spearman"],
                                               "test/mean": summary["test"]["test/stsb/spearman"]}, abs=0)

    # predict one task's file from the checkpoint alone; the task's model exported alone predicts the same.
    rows_in = [{"sentence1": "the cat runs", "sentence2": "the cat runs not"},
               {"sentence1": "a dog", "sentence2": "a dog"}]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sentence1", "sentence2"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows_in)
    main(["predict", "--ckpt_path", summary["best_checkpoint"], "--data.task", "rte", "--data.predict_file",
          str(tmp_path / "pairs.csv"), "--predictions", str(tmp_path / "preds.csv")])
    preds = list(csv.DictReader((tmp_path / "preds.csv").open()))
    assert [r["sentence1"] for r in preds] == [r["sentence1"] for r in rows_in]

    import unipelt

    module = fit.model.eval()
    alone = unipelt.from_pretrained(out / "export", task="rte")
    tokenizer = fit.datamodule.tokenizer
    batch = tokenizer([r["sentence1"] for r in rows_in], [r["sentence2"] for r in rows_in], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        expected = module.model(**batch, task="rte").logits
        torch.testing.assert_close(alone(**batch).logits, expected, rtol=1e-5, atol=1e-6)
    probs = torch.tensor([[float(r["prob_entailment"]), float(r["prob_not_entailment"])] for r in preds])
    torch.testing.assert_close(probs, alone(**batch).logits.softmax(-1).detach(), rtol=0, atol=2e-6)
    assert alone.config.id2label == {0: "entailment", 1: "not_entailment"}

    # GLUE's leaderboard file of one task from the checkpoint alone.
    main(["predict", "--ckpt_path", summary["best_checkpoint"], "--data.task", "rte", "--predictions",
          str(tmp_path / "submission")])
    assert (tmp_path / "submission" / "RTE.tsv").read_text().splitlines()[0] == "index\tprediction"


class StopAtStep(pl.Callback):
    """Stop the run with an error right after optimizer step `step`, as a killed run stops."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"stopped at step {self.step}")


def test_a_run_resumed_mid_epoch_ends_as_an_uninterrupted_one(files, tmp_path):
    """4 steps an epoch, `last.ckpt` every 3 steps, stopped after step 7 of 8: `--ckpt_path last` (step 6, the middle
    of epoch 1) replays the rest of epoch 1's batches (tasks and rows) and the RNG, and ends as the straight run."""
    settings = ["--model.learning_rate", "0.01", "--trainer.check_val_every_n_epoch", "1", "--trainer.max_epochs", "2",
                "--model.checkpoint_every_n_steps", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    build_cli(["fit", *args(*files, straight), *settings])
    with pytest.raises(RuntimeError, match="stopped at step 7"):
        build_cli(["fit", *args(*files, resumed), *settings,
                   "--trainer.callbacks+", "tests.test_multitask_cli.StopAtStep", "--trainer.callbacks.step", "7"])
    assert not (resumed / SUMMARY_FILE).exists()
    state = load_checkpoint_file(resumed / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 6 and state["epoch"] == 1
    build_cli(["fit", *args(*files, resumed), *settings, "--ckpt_path", "last"])
    a, b = (json.loads((run / SUMMARY_FILE).read_text()) for run in (straight, resumed))
    assert a["global_steps"] == b["global_steps"] == 8
    assert a["test"] == pytest.approx(b["test"], abs=1e-6) and a["best_val"] == pytest.approx(b["best_val"])
    assert a["tasks"]["rte"]["dev"] == pytest.approx(b["tasks"]["rte"]["dev"])


@pytest.mark.parametrize(("tasks", "message"), [
    ("[rte, foo]", "--data.tasks=['rte', 'foo']: task='foo' is not a GLUE task here; choose one of: cola, sst2"),
    ("[rte, RTE]", "--data.tasks=['rte', 'RTE']: task 'rte' is given twice; give each task once"),
    ("[rte, {name: rte, train_file: FILE}]", "task 'rte' is given twice, with labels ['entailment', "
                                             "'not_entailment'] and ['neg', 'pos']"),
    ("[{name: a, train_file: FILE}, {name: a, train_file: FILE3}]", "task 'a' is given twice, with labels ['neg', "
                                                                    "'pos'] and ['bad', 'good', 'ok']"),
])
def test_bad_task_lists_are_one_line_exit_2(files, tmp_path, capsys, tasks, message):
    for name, labels in (("two.csv", ["neg", "pos"]), ("three.csv", ["bad", "good", "ok"])):
        (tmp_path / name).write_text("sentence,label\n" + "".join(f"the cat {i},{labels[i % len(labels)]}\n"
                                                                  for i in range(60)))
    tasks = tasks.replace("FILE3", str(tmp_path / "three.csv")).replace("FILE", str(tmp_path / "two.csv"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args(*files, out, tasks=tasks)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_pooler_head_and_other_tasks_than_the_checkpoint_s_are_refused(files, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args(*files, out), "--model.head", "pooler"])
    assert exc.value.code == 2
    assert "head 'pooler' cannot serve several tasks" in capsys.readouterr().err
    build_cli(["fit", *args(*files, out), "--trainer.max_epochs", "1"])
    best = json.loads((out / SUMMARY_FILE).read_text())["best_checkpoint"]
    with pytest.raises(SystemExit) as exc:
        main(["test", "--ckpt_path", best, "--data.tasks", "[stsb, rte]", "--trainer.default_root_dir", str(out)])
    assert exc.value.code == 2
    assert "tasks differ: the checkpoint was trained on ['rte', 'stsb'] but the config gives ['stsb', 'rte']" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["test", "--ckpt_path", best, "--data.task", "cola", "--trainer.default_root_dir", str(out)])
    assert exc.value.code == 2
    assert "--data.task='cola' is not one of --data.tasks: rte, stsb" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["slim", "--ckpt_path", best, "--out", str(tmp_path / "slim")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "a multi-task run; slim takes a single-task run" in err and "\n" not in err
    assert not (tmp_path / "slim").exists()


@pytest.mark.slow
def test_multitask_fit_and_test_on_two_processes(files, tmp_path):
    """2 processes (gloo): each step trains one task on both ranks (the other tasks' parameters take no
    gradient: DDP is told so), each task's test examples are scored once, and `test` gives one process's scores."""
    out = tmp_path / "ddp"
    run_cli(["fit", *args(*files, out), *DDP, "--trainer.max_epochs", "2",
             "--model.learning_rate", "0.01"], tmp_path)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["tasks"]["rte"]["test_examples"] == summary["tasks"]["stsb"]["test_examples"] == 21
    best = str(tmp_path / summary["best_checkpoint"])  # relative to where the CLI ran (tmp_path)
    where = ["--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu"]
    run_cli(["test", "--ckpt_path", best, *DDP, *where], tmp_path)
    logged = {k: v for k, v in logged_test_metrics(out, 1).items() if "loss" not in k}
    one = scores_of(build_cli(["test", "--ckpt_path", best, *where]))
    for two in (summary["test"], logged):
        assert set(two) == set(one)
        for key, value in one.items():  # Pearson merges the ranks' float32 moments (torchmetrics): rounding
            assert two[key] == pytest.approx(value, abs=1e-6, rel=1e-3 if "pearson" in key else 0)


def test_a_task_of_your_files_predicts_from_the_checkpoint_without_its_files(files, tmp_path):
    """predict takes a task's labels and text fields from the checkpoint: its training file may be gone."""
    train = tmp_path / "reviews.csv"
    rows_in = [f"the {'good' if i % 3 else 'bad'} cat {i},{'pos' if i % 3 else 'neg'}" for i in range(60)]
    train.write_text("review,stars\n" + "\n".join(rows_in) + "\n")
    out = tmp_path / "run"
    tasks = f"[{{name: reviews, train_file: {train}, label_field: stars}}, rte]"
    build_cli(["fit", *args(*files, out, tasks=tasks), "--trainer.max_epochs", "1"])
    best = json.loads((out / SUMMARY_FILE).read_text())["best_checkpoint"]
    train.unlink()
    (tmp_path / "new.csv").write_text("review\nthe good cat\nthe bad cat\n")
    main(["predict", "--ckpt_path", best, "--data.task", "reviews", "--data.predict_file", str(tmp_path / "new.csv"),
          "--predictions", str(tmp_path / "preds.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [r["review"] for r in rows] == ["the good cat", "the bad cat"]
    assert {r["prediction"] for r in rows} <= {"neg", "pos"} and set(rows[0]) >= {"prob_neg", "prob_pos"}
