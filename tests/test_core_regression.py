"""Pinned outputs of every preset on a tiny random BERT (logits, gates, hidden states).

The fixture ``tests/fixtures/core_v1_outputs.safetensors`` was written by the v1 code (the
gated forward shown equal to AdapterHub's UniPELT on MiniLM) before the v2 refactor: the
backbone weights, every trained tensor of each preset (random, so that LoRA, adapters, gates
and prefix all matter), the padded input batch and the outputs. The test rebuilds each preset
with today's code, loads those tensors (v1 names mapped to today's by ``v1_to_current``) and
requires the same outputs to float rounding.

Regenerate only from code known to be right: ``python tests/test_core_regression.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

from unipelt import PELTConfig, apply_pelt, gate_values

FIXTURE = Path(__file__).parent / "fixtures" / "core_v1_outputs.safetensors"
CONFIG = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, num_labels=3)
OVERRIDES = {"prefix_mid_dim": 24}  # a small prefix MLP keeps the fixture small


PREFIX_PRESETS = ("prefix", "unipelt_ap", "unipelt_ap_nogate", "unipelt_apl", "unipelt_apl_nogate")
# the presets v1 pinned (later presets have outside references instead: tests/test_space_peft.py)
PINNED = ("finetune", "bitfit", "adapter", "prefix", "lora", "unipelt_ap", "unipelt_ap_nogate", "unipelt_apl",
          "unipelt_apl_nogate")


def overrides(preset: str) -> dict:
    return OVERRIDES if preset in PREFIX_PRESETS else {}


def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**CONFIG))
    model.set_attn_implementation("sdpa")
    return model.eval()


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for row, n in enumerate((8, 5, 3)):
        ids[row, :n] = torch.randint(3, 99, (n,), generator=g)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    result = {"logits": out.logits}
    result.update({f"hidden.{i}": h for i, h in enumerate(out.hidden_states)})
    result.update({f"gate.{k}": v for k, v in gate_values(model).items()})
    return result


def v1_to_current(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's names for the v1 tensors (identity while the v1 layout is in place)."""
    from unipelt import checkpoint

    convert = getattr(checkpoint, "convert_v1_weights", None)
    return convert(model, weights) if convert is not None else weights


def generate() -> None:
    batch = inputs()
    tensors = {f"batch.{k}": v for k, v in batch.items()}
    tensors.update({f"backbone.{k}": v for k, v in backbone().state_dict().items()})
    for i, preset in enumerate(PINNED):
        model = apply_pelt(backbone(), PELTConfig.preset(preset, **overrides(preset)))
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                    tensors[f"{preset}.weight.{name}"] = p.detach().clone()
        model.eval()
        tensors.update({f"{preset}.out.{k}": v for k, v in outputs(model, batch).items()})
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, FIXTURE)


@pytest.fixture(scope="module")
def pinned() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE)


@pytest.mark.parametrize("preset", PINNED)
def test_outputs_equal_pinned_v1_outputs(pinned, preset):
    model = backbone()
    model.load_state_dict({k[len("backbone."):]: v for k, v in pinned.items()
                           if k.startswith("backbone.")})
    model = apply_pelt(model, PELTConfig.preset(preset, **overrides(preset)))
    prefix = f"{preset}.weight."
    weights = v1_to_current(model, {k[len(prefix):]: v for k, v in pinned.items()
                                    if k.startswith(prefix)})
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert set(weights) == trainable
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    batch = {k[len("batch."):]: v for k, v in pinned.items() if k.startswith("batch.")}
    got = outputs(model.eval(), batch)
    expected = {k[len(f"{preset}.out."):]: v for k, v in pinned.items()
                if k.startswith(f"{preset}.out.")}
    assert set(got) == set(expected)
    assert any(k.startswith("gate.") for k in expected) == (preset in ("unipelt_ap", "unipelt_apl"))
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)


if __name__ == "__main__":
    generate()
    print(f"wrote {FIXTURE}")
