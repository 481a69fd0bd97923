"""Pinned outputs of every preset on tiny random decoders (Llama, GPT-2, Qwen2) and of the pooling heads.

The fixture ``tests/fixtures/core_decoder_outputs.safetensors`` was written by the code of main at
ceddb31 (before the v3 refactor: tuners owning their merge, the prefix as a package, the heads' state in
the forward context): per family, the backbone's weights, every trained tensor of each preset (random,
so that every submodule and every gate matters), a left-padded batch and

* the language model's logits on it, and the greedy generation of 6 new tokens (exactly);
* ``merge``'s logits: ungated presets merged as they are, gated ones with the gates fixed at their
  mean over the batch (``calibrate_gates``), so the pin also covers fixed gates;
* for the ``mean`` and ``cls_mlp`` heads (BERT and Llama classifiers, ``unipelt_apl``): logits and loss.

The test rebuilds each case with today's code, loads those tensors and requires the same outputs to
float rounding. Regenerate only from code known to be right: ``python tests/test_core_decoder_regression.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig

import unipelt
from tests.test_decoders import PAD, config, pad, rows
from unipelt import PRESETS, PELTConfig, apply_pelt, gate_values

FIXTURE = Path(__file__).parent / "fixtures" / "core_decoder_outputs.safetensors"
FAMILIES = ("llama", "gpt2", "qwen2")
HEADS = ("mean", "cls_mlp")
HEAD_FAMILIES = ("bert", "llama")
NEW_TOKENS = 6
GATED = tuple(p for p in PRESETS if PRESETS[p].gates)
# the presets pinned before the v3 refactor (later presets have outside references: tests/test_space_peft.py)
PINNED = ("finetune", "bitfit", "adapter", "prefix", "lora", "unipelt_ap", "unipelt_ap_nogate", "unipelt_apl",
          "unipelt_apl_nogate")


def overrides(preset: str) -> dict:
    """Small submodules keep the fixture small."""
    subs = PRESETS[preset].submodules
    return {**({"prefix_mid_dim": 24} if "prefix" in subs else {}),
            **({"adapter_bottleneck": 8} if "adapter" in subs else {})}


def backbone(family: str, head: str = "lm") -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "bert":
        return AutoModelForSequenceClassification.from_config(BertConfig(
            vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))
    if head == "lm":
        return AutoModelForCausalLM.from_config(config(family))
    return AutoModelForSequenceClassification.from_config(config(family, num_labels=3))


def batch() -> dict[str, torch.Tensor]:
    ids, mask = pad(rows(seed=3, lengths=(6, 3, 8)), "left")
    return {"input_ids": ids, "attention_mask": mask}


def randomise(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every trainable tensor drawn at random (LoRA's B, adapters' up projections, gates: none at init)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                weights[name] = p.detach().clone()
    return weights


def merged_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], gated: bool) -> torch.Tensor:
    gates = unipelt.calibrate_gates(model, [inputs]) if gated else {}
    merged = unipelt.merge(model, gates).eval()
    mask = inputs["attention_mask"]
    # a plain decoder takes positions from the caller, as generate() does; a unipelt one from the mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return merged(**inputs, position_ids=positions).logits


def decoder_outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor], gated: bool) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = {"logits": model(**inputs).logits}
        out.update({f"gate.{k}": v for k, v in gate_values(model).items()})
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                   do_sample=False, pad_token_id=PAD)
    out["generated"] = generated[:, inputs["input_ids"].shape[1]:]
    out["merged"] = merged_logits(model, inputs, gated)
    return out


def head_outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs, labels=torch.tensor([0, 2, 1]))
    return {"logits": out.logits, "loss": out.loss}


def cases() -> list[tuple[str, str, str, str]]:
    """(key, family, preset, head): every preset on every decoder family, then the pooling heads."""
    out = [(f"{family}.{preset}", family, preset, "lm") for family in FAMILIES for preset in PINNED
           if not (family == "llama" and preset == "bitfit")]  # Llama has no biases: BitFit trains nothing
    out += [(f"{family}.head_{head}", family, "unipelt_apl", head) for family in HEAD_FAMILIES for head in HEADS]
    return out


def build(family: str, preset: str, head: str) -> torch.nn.Module:
    model = backbone(family, "lm" if head == "lm" else "cls")
    return apply_pelt(model, PELTConfig.preset(preset, **overrides(preset), **({} if head == "lm" else {"head": head})))


def outputs(model: torch.nn.Module, preset: str, head: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.eval()
    return decoder_outputs(model, inputs, preset in GATED) if head == "lm" else head_outputs(model, inputs)


def generate() -> None:
    inputs = batch()
    tensors = {f"batch.{k}": v for k, v in inputs.items()}
    for family in (*FAMILIES, *HEAD_FAMILIES):
        for head in ("lm", "cls") if family != "bert" else ("cls",):
            tensors.update({f"backbone.{family}.{head}.{k}": v for k, v in backbone(family, head).state_dict().items()})
    for i, (key, family, preset, head) in enumerate(cases()):
        model = build(family, preset, head)
        tensors.update({f"{key}.weight.{n}": w for n, w in randomise(model, 1000 + i).items()})
        tensors.update({f"{key}.out.{n}": v for n, v in outputs(model, preset, head, inputs).items()})
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, FIXTURE)


@pytest.fixture(scope="module")
def pinned() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE)


def part(pinned: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in pinned.items() if k.startswith(prefix)}


@pytest.mark.parametrize("key,family,preset,head", cases(), ids=[c[0] for c in cases()])
def test_outputs_equal_the_pinned_outputs(pinned, key, family, preset, head):
    model = backbone(family, "lm" if head == "lm" else "cls")
    model.load_state_dict(part(pinned, f"backbone.{family}.{'lm' if head == 'lm' else 'cls'}."))
    model = apply_pelt(model, PELTConfig.preset(preset, **overrides(preset),
                                                **({} if head == "lm" else {"head": head})))
    weights = part(pinned, f"{key}.weight.")
    params = dict(model.named_parameters())
    assert set(weights) == {n for n, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    got = outputs(model, preset, head, part(pinned, "batch."))
    expected = part(pinned, f"{key}.out.")
    assert set(got) == set(expected)
    for name, value in expected.items():
        if name == "generated":
            assert got[name].tolist() == value.tolist()
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=f"{key}: {name}")


if __name__ == "__main__":
    generate()
    print(f"wrote {FIXTURE}")
