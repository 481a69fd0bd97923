"""`cli.py fit` then `cli.py predict` on a tiny random Llama and a few JSON Lines rows, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from decoder_fixtures import prompt_rows, tiny_tokenizer, write_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

from cli import main
from lightning_modules.kinds import CLASSIFICATION, INSTRUCTION, choose_kind
from lightning_modules.run import SUMMARY_FILE

ROOT = Path(__file__).resolve().parents[1]


class MoveWeightsAtFitEnd(pl.Callback):
    """After training, move the trainable weights away from every checkpoint's (runs before RunSummary)."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            for param in pl_module.parameters():
                if param.requires_grad:
                    param.add_(0.5)


def write_tiny_llama(folder: Path) -> Path:
    """A random 2-layer Llama (grouped-query attention) with the word-level tokenizer; seeded."""
    tok = tiny_tokenizer()
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")


def test_fit_then_predict_writes_generations(tiny_llama, tmp_path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", prompt_rows(40))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "what is the cat", "id": "x"},
                                                      {"prompt": "the dog", "id": "y"},
                                                      {"messages": [{"role": "user", "content": "who"}], "id": "z"}])
    run = tmp_path / "run"
    common = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(run)]
    main(["fit", "--config", str(ROOT / "configs" / "instruct_example.yaml"),
          "--model.model_name_or_path", str(tiny_llama), "--data.train_file", str(train), "--data.k_shot", "24",
          "--data.dev_size", "8", "--data.batch_size", "4", "--trainer.max_epochs", "2", "--data.max_seq_length", "64",
          "--data.cache_dir", str(tmp_path / "cache"), "--trainer.callbacks+", f"{__name__}.MoveWeightsAtFitEnd",
          *common])
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["task"] == "instruct" and summary["method"] == "unipelt_apl"
    # No test set: the summary comes at the end of fit, and export/ holds the best checkpoint's weights
    # (not the weights in memory then).
    from lightning_modules import CausalLMModule
    from unipelt import from_pretrained

    assert summary["test"] == {} and summary["exported_weights"] == str(run / "export")
    exported = from_pretrained(summary["exported_weights"]).eval()
    reference = CausalLMModule.load_from_checkpoint(summary["best_checkpoint"]).model.eval()
    ids = torch.tensor([[1, 5, 9, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    assert summary["best_val"]["perplexity"] == pytest.approx(torch.tensor(summary["best_val"]["value"]).exp().item())
    assert 0 < summary["trainable_params"] < summary["total_params"]
    best = summary["best_checkpoint"]
    assert Path(best).is_file()
    assert choose_kind(["predict", "--ckpt_path", best]) is INSTRUCTION  # the checkpoint says what it is

    # No config: the checkpoint states the model; the command line the rest.
    out = tmp_path / "gen.jsonl"
    main(["predict", "--ckpt_path", best, "--data.predict_file", str(prompts), "--model.max_new_tokens", "5",
          "--model.predict_output", str(out), *common])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    inputs = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "generation"} for row in lines] == inputs  # in file order
    assert all(isinstance(row["generation"], str) for row in lines)


def test_bad_instruction_file_is_one_line_exit_2(tiny_llama, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "instruct_example.yaml"),
              "--model.model_name_or_path", str(tiny_llama), "--data.train_file", str(bad),
              "--data.max_seq_length", "64", "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # not progress bars
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.jsonl:2: not valid JSON" in err[0]


def test_instruct_example_config_parses(capsys) -> None:
    import yaml

    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs" / "instruct_example.yaml"), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["method"] == "unipelt_apl" and printed["data"]["prompt_field"] == "prompt"
    assert printed["model"]["do_sample"] is False


def test_bf16_mixed_with_gradient_clipping_trains(tiny_llama, tmp_path) -> None:
    """The example config clips gradients; under mixed precision Lightning refuses to clip for an
    optimizer that unscales in its own step (fused AdamW), so the module must not fuse there."""
    train = write_jsonl(tmp_path / "train.jsonl", prompt_rows(16))
    run = tmp_path / "run"
    main(["fit", "--config", str(ROOT / "configs" / "instruct_example.yaml"),
          "--model.model_name_or_path", str(tiny_llama), "--data.train_file", str(train), "--data.k_shot", "8",
          "--data.dev_size", "4", "--data.batch_size", "4", "--trainer.max_epochs", "1", "--data.max_seq_length", "64",
          "--data.cache_dir", str(tmp_path / "cache"), "--trainer.accelerator", "cpu",
          "--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "1.0",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)])
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert torch.isfinite(torch.tensor(summary["best_val"]["value"]))


def test_the_run_kind_comes_from_the_options_named() -> None:
    """Options only instruction runs have (on the command line or in a --config) make one; else classification."""
    configs = ROOT / "configs"
    assert choose_kind(["fit", "--data.prompt_field", "q"]) is INSTRUCTION
    assert choose_kind(["fit", "--model.max_new_tokens=3"]) is INSTRUCTION
    assert choose_kind(["fit", "--config", str(configs / "instruct_example.yaml")]) is INSTRUCTION
    assert choose_kind(["fit", "--config", str(configs / "rte_k100.yaml")]) is CLASSIFICATION
    assert choose_kind(["fit", "--data.train_file", "rows.jsonl", "--model.method", "lora"]) is CLASSIFICATION
    assert choose_kind(["predict", "--ckpt_path", "no-such.ckpt"]) is CLASSIFICATION  # the CLI refuses the file
