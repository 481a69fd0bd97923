"""`predict`: from a checkpoint alone into your file's rows, and GLUE's leaderboard files for every task."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from cli import main
from datamodules import GLUE_TASKS, TextDataModule
from lightning_modules import UniPELTLightningModule
from lightning_modules.predictions import write_predictions
from lightning_modules.run import build_cli
from tests.fixtures import WORDS, write_rte, write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-bert")


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))


def write_reviews(path: Path, n: int, labelled: bool = True, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = sentence(rng) + (", not" if i % 3 == 0 else "")  # a comma: CSV quoting is exercised
        row = {"id": f"r{i}", "review": text}
        if labelled:
            row["sentiment"] = "negative" if i % 3 == 0 else ("positive" if i % 3 == 1 else "neutral")
        rows.append(row)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def reference_probs(ckpt: Path, texts: list[str], tokenizer_dir: Path) -> torch.Tensor:
    """The checkpoint's probabilities computed another way: load it, tokenise each row alone, no padding."""
    from transformers import AutoTokenizer

    model = UniPELTLightningModule.load_from_checkpoint(ckpt).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits.softmax(-1) for t in texts])


def test_fit_on_a_csv_then_predict_from_the_checkpoint_alone(tiny_model, tmp_path, capsys):
    train = tmp_path / "reviews.csv"
    write_reviews(train, 40)
    run = tmp_path / "run"
    build_cli([
        "fit", "--data.train_file", str(train), "--data.text_fields", "[review]", "--data.label_field", "sentiment",
        "--data.k_shot", "24", "--data.dev_size", "10", "--data.batch_size", "8",
        "--data.cache_dir", str(tmp_path / "cache"), "--model.model_name_or_path", str(tiny_model),
        "--model.method", "UniPELT_APL", "--model.learning_rate", "0.01", "--trainer.max_epochs", "2",
        "--trainer.default_root_dir", str(run), *QUIET,
    ])  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["labels"] == ["negative", "neutral", "positive"] and summary["task"] == "reviews"
    assert summary["method"] == "unipelt_apl" and summary["optimizer"] == "AdamW"
    assert set(summary["test"]) == {"test/accuracy", "test/f1_macro"} and summary["test_split"] == "validation"
    ckpt = Path(summary["best_checkpoint"])
    versions = sorted(p.name for p in (run / "lightning_logs").iterdir())

    new = tmp_path / "new.csv"
    rows = write_reviews(new, 9, labelled=False, seed=1)
    out = tmp_path / "out" / "preds.csv"
    # Nothing but the checkpoint: backbone, method, labels, text fields all come from it.
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_file", str(new), "--predictions", str(out), *QUIET])
    got = list(csv.DictReader(out.open()))
    assert list(got[0]) == ["id", "review", "prediction", "prob_negative", "prob_neutral", "prob_positive"]
    assert [(r["id"], r["review"]) for r in got] == [(r["id"], r["review"]) for r in rows]
    probs = torch.tensor([[float(r[f"prob_{c}"]) for c in ("negative", "neutral", "positive")] for r in got])
    expected = reference_probs(ckpt, [r["review"] for r in rows], tiny_model)
    torch.testing.assert_close(probs, expected, atol=2e-6, rtol=0)
    labels = ["negative", "neutral", "positive"]
    assert [r["prediction"] for r in got] == [labels[i] for i in expected.argmax(-1).tolist()]
    # The default place is the run folder's predictions/, as JSON Lines when asked; no new version_N.
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_file", str(new), *QUIET])
    assert (run / "predictions" / "new.csv").read_text() == out.read_text()
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_file", str(new), "--predictions",
          str(tmp_path / "p.jsonl"), *QUIET])  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [x["prediction"] for x in lines] == [r["prediction"] for r in got]
    assert sorted(p.name for p in (run / "lightning_logs").iterdir()) == versions
    # `test` from the checkpoint alone gives the summary's scores (the files are recorded in it).
    cli = build_cli(["test", "--ckpt_path", str(ckpt), *QUIET])
    again = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/") and "loss" not in k}
    assert again == pytest.approx(summary["test"], abs=1e-6)

    # A predict file without the text column: one line naming the file and the columns it has, exit 2.
    (tmp_path / "bad.csv").write_text("id,body\n1,a cat\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--ckpt_path", str(ckpt), "--data.predict_file", str(tmp_path / "bad.csv"), *QUIET])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "bad.csv" in err and "'review'" in err and "['id', 'body']" in err


# ------------------------------------------------------------------------------------ GLUE's test sets
TEST_HEADERS = {
    "cola": "index\tsentence",
    "sst2": "index\tsentence",
    "mrpc": "index\t#1 ID\t#2 ID\t#1 String\t#2 String",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2",
    "qqp": "id\tquestion1\tquestion2",
    "mnli": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2",
    "qnli": "index\tquestion\tsentence",
    "rte": "index\tsentence1\tsentence2",
}
SUBMISSION = {"cola": ["CoLA"], "sst2": ["SST-2"], "mrpc": ["MRPC"], "stsb": ["STS-B"], "qqp": ["QQP"],
              "mnli": ["MNLI-m", "MNLI-mm", "AX"], "qnli": ["QNLI"], "rte": ["RTE"]}  # fmt: skip
ALLOWED = {"cola": {"0", "1"}, "sst2": {"0", "1"}, "mrpc": {"0", "1"}, "qqp": {"0", "1"},
           "mnli": {"entailment", "neutral", "contradiction"}, "qnli": {"entailment", "not_entailment"},
           "rte": {"entailment", "not_entailment"}}  # fmt: skip


def write_glue_tests(root: Path) -> dict[str, int]:
    """GLUE's unlabeled test files in download_glue_data.py's layout; {file: data rows}."""
    rng, counts = random.Random(0), {}
    for task, header in TEST_HEADERS.items():
        info = GLUE_TASKS[task]
        names = ["test_matched.tsv", "test_mismatched.tsv"] if task == "mnli" else ["test.tsv"]
        for n, name in enumerate(names):
            lines = [header]
            size = 7 + n + len(task)
            for i in range(size):
                texts = [sentence(rng) for _ in info.text_fields]
                cols = header.split("\t")
                row = {c: "x" for c in cols}
                row[cols[0]] = str(i)
                targets = [c for c in cols if c in ("sentence", "#1 String", "#2 String", "sentence1", "sentence2",
                                                    "question1", "question2", "question")]  # fmt: skip
                row.update(zip(targets, texts, strict=True))
                lines.append("\t".join(row[c] for c in cols))
            (root / info.glue_dir).mkdir(parents=True, exist_ok=True)
            (root / info.glue_dir / name).write_text("\n".join(lines) + "\n")
            counts[f"{task}/{name}"] = size
    (root / "diagnostic").mkdir()
    ax = ["index\tsentence1\tsentence2", *(f"{i}\t{sentence(rng)}\t{sentence(rng)}" for i in range(5))]
    (root / "diagnostic" / "diagnostic.tsv").write_text("\n".join(ax) + "\n")
    counts["mnli/ax"] = 5
    return counts


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*will save all targets and predictions in the buffer.*")
def test_glue_submission_files_for_every_task(tiny_model, tmp_path):
    """No training file needed; one file per leaderboard split, `index<TAB>prediction`, GLUE's label format."""
    root = tmp_path / "glue"
    counts = write_glue_tests(root)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    for task, files in SUBMISSION.items():
        dm = TextDataModule(task=task, data_dir=str(root), model_name_or_path=str(tiny_model),
                            cache_dir=str(tmp_path / "cache"), eval_batch_size=4)  # fmt: skip
        dm.stage = "predict"
        model = UniPELTLightningModule(model_name_or_path=str(tiny_model), task=task, method="lora").eval()
        outputs = trainer.predict(model, datamodule=dm)  # a list per loader when there are several
        per_loader = outputs if len(dm.predict_splits) > 1 else [outputs]
        written = write_predictions(per_loader, dm, model.task_info, tmp_path / "submission")
        assert [p.name for p in written] == [f"{f}.tsv" for f in files]
        for path, key in zip(written, [k for k in counts if k.startswith(f"{task}/")], strict=True):
            lines = path.read_text().splitlines()
            assert lines[0] == "index\tprediction"
            assert len(lines) - 1 == counts[key], (path.name, len(lines))
            index, values = zip(*(line.split("\t") for line in lines[1:]), strict=True)
            assert list(index) == [str(i) for i in range(counts[key])]
            if task == "stsb":
                assert all(float(v) == float(v) for v in values)  # scores
            else:
                assert set(values) <= ALLOWED[task], (path.name, set(values))
        if task == "rte":  # the file's order is the test file's, whatever order the batches ran in
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tiny_model))
            rows = [r.split("\t") for r in (root / "RTE" / "test.tsv").read_text().splitlines()[1:]]
            with torch.no_grad():
                ids = [int(model(**tok(a, b, return_tensors="pt")).logits.argmax()) for _, a, b in rows]
            got = [line.split("\t")[1] for line in written[0].read_text().splitlines()[1:]]
            assert got == [model.task_info.label_names[i] for i in ids]


def test_predict_glue_test_set_from_a_checkpoint_into_the_run_folder(tiny_model, tmp_path):
    glue = write_rte(tmp_path / "glue", n_train=40, n_dev=9)
    run = tmp_path / "run"
    build_cli([
        "fit", "--config", str(ROOT / "configs" / "rte_k100.yaml"), "--model.model_name_or_path", str(tiny_model),
        "--data.data_dir", str(glue), "--data.k_shot", "16", "--data.dev_size", "8", "--trainer.max_epochs", "1",
        "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(run), *QUIET,
    ])  # fmt: skip
    ckpt = json.loads((run / "summary.json").read_text())["best_checkpoint"]
    main(["predict", "--ckpt_path", ckpt, *QUIET])
    lines = (run / "predictions" / "RTE.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 2  # write_rte's test.tsv has one row
    assert lines[1].split("\t")[1] in ("entailment", "not_entailment")


@pytest.mark.filterwarnings("ignore:`UniPELTLightningModule.configure_optimizers` will be overridden")
def test_summary_records_the_optimizer_used_and_the_loss_of_every_step(tiny_model, tmp_path):
    train = tmp_path / "reviews.csv"
    write_reviews(train, 30)
    run = tmp_path / "run"
    build_cli([
        "fit", "--data.train_file", str(train), "--data.k_shot", "16", "--data.dev_size", "6",
        "--data.label_field", "sentiment", "--data.batch_size", "4", "--data.cache_dir", str(tmp_path / "cache"),
        "--model.model_name_or_path", str(tiny_model), "--model.method", "lora", "--trainer.max_epochs", "2",
        "--optimizer", "SGD", "--optimizer.lr", "0.2", "--trainer.default_root_dir", str(run), *QUIET,
    ])  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["optimizer"] == "SGD" and summary["learning_rate"] == 0.2  # not the module's AdamW 5e-4
    assert summary["trainable_pct"] == pytest.approx(100 * summary["trainable_params"] / summary["backbone_params"])
    rows = list(csv.DictReader((run / "lightning_logs" / "version_0" / "metrics.csv").open()))
    assert len([r for r in rows if r.get("train/loss_step")]) == summary["global_steps"] == 8


def test_an_override_the_method_does_not_use_is_an_error(tiny_model):
    from unipelt import PELTError

    with pytest.raises(PELTError, match="adapter_bottleneck.*'lora' has no adapter"):
        UniPELTLightningModule(str(tiny_model), method="LoRA", pelt_overrides={"adapter_bottleneck": 64})
    with_adapter = UniPELTLightningModule(str(tiny_model), method="lora",
                                          pelt_overrides={"adapter": True, "adapter_bottleneck": 8})  # fmt: skip
    assert with_adapter.pelt_config.adapter and with_adapter.pelt_config.adapter_bottleneck == 8
    assert with_adapter.hparams.method == "lora"
