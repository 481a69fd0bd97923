"""The run pipeline against outputs pinned before its v3 refactor (tests/fixtures/run_v1/, written by the v2
`cli.py` at commit ceddb31 from the same tiny models and rows; the checkpoints are `*_checkpoint.pt`, as
.gitignore leaves out `*.ckpt`): a `fit` gives the same checkpoint and summary, and checkpoints v2 wrote still
predict the same.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from decoder_fixtures import prompt_rows, write_jsonl

from cli import main
from lightning_modules.run import SUMMARY_FILE, build_cli
from tests.fixtures import write_tiny_model
from tests.test_instruct_cli import write_tiny_llama
from tests.test_predict import write_reviews

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "tests" / "fixtures" / "run_v1"
QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
# The encoder summary's keys as v2 wrote them: unchanged.
ENCODER_KEYS = {"backbone_params", "best_checkpoint", "best_val", "data_seed", "epochs", "exported_weights",
                "fit_time_s", "gates", "global_steps", "head", "k_shot", "labels", "learning_rate", "method",
                "model_name_or_path", "optimizer", "seed", "task", "test", "test_examples", "test_split",
                "test_time_s", "total_params", "train_time_per_epoch_s", "trainable_params", "trainable_pct"}


def pinned(name: str) -> dict:
    return json.loads((PINNED / name).read_text())


def trainable(ckpt: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_record(got: object, expected: object, where: str = "summary") -> None:
    """Equal, floats to 1e-6 (the same run on the same CPU; rounding may differ with the thread count)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() >= expected.keys(), (where, got)
        for key, value in expected.items():
            assert_same_record(got[key], value, f"{where}.{key}")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-6), (where, got, expected)
    else:
        assert got == expected, (where, got, expected)


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The models and rows the pinned runs used, made again (seeded)."""
    work = tmp_path_factory.mktemp("v1")
    write_tiny_model(work / "tiny-bert")
    write_reviews(work / "reviews.csv", 40)
    write_reviews(work / "new.csv", 9, labelled=False, seed=1)
    write_tiny_llama(work / "tiny-llama")
    write_jsonl(work / "train.jsonl", prompt_rows(40))
    write_jsonl(work / "test.jsonl", prompt_rows(7, seed=1))
    write_jsonl(work / "prompts.jsonl", [{"prompt": "what is the cat", "id": "x"}, {"prompt": "the dog", "id": "y"},
                                        {"messages": [{"role": "user", "content": "who"}], "id": "z"}])
    return work


def test_classifier_fit_gives_the_v1_checkpoint_and_summary(inputs, tmp_path):
    run = tmp_path / "run"
    build_cli([
        "fit", "--data.train_file", str(inputs / "reviews.csv"), "--data.text_fields", "[review]",
        "--data.label_field", "sentiment", "--data.k_shot", "24", "--data.dev_size", "10", "--data.batch_size", "8",
        "--data.cache_dir", str(tmp_path / "cache"), "--model.model_name_or_path", str(inputs / "tiny-bert"),
        "--model.method", "lora", "--model.learning_rate", "0.01", "--trainer.max_epochs", "2",
        "--trainer.default_root_dir", str(run), *QUIET,
    ])  # fmt: skip
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert set(summary) == ENCODER_KEYS
    expected = pinned("encoder_summary.json")
    assert_same_record(summary, expected)
    assert_same_tensors(trainable(summary["best_checkpoint"]), trainable(PINNED / "encoder_checkpoint.pt"))
    assert summary["exported_weights"] == str(run / "export")


def test_classifier_checkpoint_of_v1_predicts_the_same(inputs, tmp_path):
    out = tmp_path / "preds.csv"
    main(["predict", "--ckpt_path", str(PINNED / "encoder_checkpoint.pt"), "--model.model_name_or_path",
          str(inputs / "tiny-bert"), "--data.predict_file", str(inputs / "new.csv"), "--predictions", str(out),
          "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path),
          *QUIET])  # fmt: skip
    got, expected = (list(csv.DictReader(p.open())) for p in (out, PINNED / "encoder_predictions.csv"))
    assert [{k: v for k, v in r.items() if not k.startswith("prob_")} for r in got] == [
        {k: v for k, v in r.items() if not k.startswith("prob_")} for r in expected]
    probs = [[float(v) for k, v in r.items() if k.startswith("prob_")] for r in (*got, *expected)]
    torch.testing.assert_close(torch.tensor(probs[: len(got)]), torch.tensor(probs[len(got):]), rtol=0, atol=2e-6)


def test_instruction_fit_gives_the_v1_checkpoint_and_scores_and_exports(inputs, tmp_path):
    run = tmp_path / "run"
    main(["fit", "--config", str(ROOT / "configs" / "instruct_example.yaml"), "--model.model_name_or_path",
          str(inputs / "tiny-llama"), "--data.cache_dir", str(tmp_path / "cache"), *QUIET,
          "--model.method", "LoRA", "--data.train_file",
          str(inputs / "train.jsonl"), "--data.test_file", str(inputs / "test.jsonl"), "--data.k_shot", "24",
          "--data.dev_size", "8", "--data.batch_size", "4", "--trainer.max_epochs", "2", "--data.max_seq_length", "64",
          "--trainer.default_root_dir", str(run)])  # fmt: skip
    summary = json.loads((run / SUMMARY_FILE).read_text())
    expected = pinned("decoder_summary.json")
    assert summary["method"] == "lora" and expected.pop("method") == "LoRA"  # v2 kept the spelling given
    assert_same_record(summary, expected)
    best = summary["best_checkpoint"]
    assert_same_tensors(trainable(best), trainable(PINNED / "decoder_checkpoint.pt"))
    # export/ replaces pelt_weights.pt: it rebuilds the decoder with the best checkpoint's logits.
    from lightning_modules import CausalLMModule
    from unipelt import from_pretrained

    assert summary["exported_weights"] == str(run / "export") and not list(run.rglob("*.pt"))
    reference = CausalLMModule.load_from_checkpoint(best).model.eval()
    exported = from_pretrained(summary["exported_weights"]).eval()
    ids = torch.tensor([[1, 5, 9, 7, 3], [1, 4, 4, 8, 2]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_instruction_checkpoint_of_v1_generates_the_same(inputs, tmp_path):
    out = tmp_path / "gen.jsonl"
    main(["predict", "--ckpt_path", str(PINNED / "decoder_checkpoint.pt"), "--model.model_name_or_path",
          str(inputs / "tiny-llama"), "--data.cache_dir", str(tmp_path / "cache"), "--data.predict_file",
          str(inputs / "prompts.jsonl"), "--model.max_new_tokens", "5", "--predictions", str(out),
          "--trainer.default_root_dir", str(tmp_path), *QUIET])  # not the fixture's folder
    assert out.read_text() == (PINNED / "decoder_generations.jsonl").read_text()
