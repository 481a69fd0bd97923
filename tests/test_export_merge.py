"""merge: ungated LoRA and BitFit fold into a plain transformers model (same logits); gated models merge
only with fixed gates (calibrate_gates), exactly where the gates equal their fixed values."""

from __future__ import annotations

import pytest
import torch

import unipelt
from tests.test_core_model import FAMILIES, tiny  # every supported family, tiny and random
from unipelt import PELTConfig, PELTError, apply_pelt

PAD = {"roberta": 1}


def batch(family: str, n: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (n, 10), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, n):
        cut = 10 - (row * 2) % 7
        ids[row, cut:], mask[row, cut:] = PAD.get(family, 0), 0
    return {"input_ids": ids, "attention_mask": mask}


def backbone(family: str) -> torch.nn.Module:
    return tiny(family, attn="eager" if family == "deberta-v2" else "sdpa")


def trained(family: str, preset: str, steps: int = 5, **overrides) -> torch.nn.Module:
    model = backbone(family)
    torch.manual_seed(3)
    apply_pelt(model, PELTConfig.preset(preset, **overrides)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for step in range(steps):
        loss = model(**batch(family, 6, seed=10 + step), labels=torch.tensor([0, 1, 2, 0, 1, 2])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def is_plain(model: torch.nn.Module) -> bool:
    return (not hasattr(model, "pelt_config")
            and not any(type(m).__module__.startswith("unipelt") for m in model.modules())
            and not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
            and not model.config._attn_implementation.startswith("unipelt"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset,overrides", [
    ("lora", {}), ("bitfit", {}), ("lora", {"lora_targets": "query,key,value"}), ("finetune", {}),
])
def test_ungated_lora_and_bitfit_merge_into_a_plain_model_with_the_same_logits(family, preset, overrides):
    model = trained(family, preset, **overrides)
    inputs = batch(family)
    before = logits(model, inputs)
    plain = unipelt.merge(model)
    assert type(plain) is type(model) and is_plain(plain) and not plain.training
    assert logits(model, inputs).equal(before)  # the model itself is unchanged
    if preset == "lora":
        assert not torch.allclose(before, logits(backbone(family).eval(), inputs), atol=1e-3)  # LoRA matters here
    torch.testing.assert_close(logits(plain, inputs), before, rtol=1e-5, atol=1e-6)
    assert set(plain.state_dict()) == set(backbone(family).state_dict())  # the backbone's own names


@pytest.mark.parametrize("preset,words", [
    ("unipelt_apl", "'adapter' and 'prefix' cannot be folded"),
    ("adapter", "'adapter' cannot be folded"),
    ("unipelt_apl_nogate", "'adapter' and 'prefix' cannot be folded"),
])
def test_what_cannot_merge_is_named(preset, words):
    model = apply_pelt(backbone("bert"), PELTConfig.preset(preset))
    with pytest.raises(PELTError, match=words):
        unipelt.merge(model)


def test_gated_lora_needs_gates_and_gates_are_checked():
    model = apply_pelt(backbone("bert"), PELTConfig.preset("lora", lora_gate=True))
    with pytest.raises(PELTError, match=r"gated \(lora gates\).*calibrate_gates"):
        unipelt.merge(model)
    with torch.no_grad():
        model(**batch("bert"))
    gates = {k: 0.5 for k in unipelt.gate_values(model)}
    with pytest.raises(PELTError, match=r"missing \['layer0.lora_query'\]"):
        unipelt.merge(model, {k: v for k, v in gates.items() if k != "layer0.lora_query"})
    with pytest.raises(PELTError, match=r"unknown \['layer9.adapter'\]"):
        unipelt.merge(model, {**gates, "layer9.adapter": 0.5})
    with pytest.raises(PELTError, match=r"gate layer0.lora_query = 1.5: a gate is a number in \[0, 1\]"):
        unipelt.merge(model, {**gates, "layer0.lora_query": 1.5})


@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_gates_are_exact_where_the_gates_equal_them(family):
    """Calibrated on one example, the merge equals the gated model on that example: fixing the gates is
    the only approximation (LoRA merged, adapter and prefix kept with constant gates)."""
    model = trained(family, "unipelt_apl")
    one = {k: v[1:2] for k, v in batch(family).items()}
    gates = unipelt.calibrate_gates(model, [one])
    layers = model.config.num_hidden_layers
    assert len(gates) == 4 * layers and all(0 < g < 1 for g in gates.values())  # adapter, prefix, 2 LoRA a layer
    merged = unipelt.merge(model, gates)
    assert not any("LoRALinear" in type(m).__name__ for m in merged.modules())  # LoRA merged
    with torch.no_grad():
        merged(**batch(family))
    values = unipelt.gate_values(merged)
    assert values.keys() == gates.keys()
    for key, g in gates.items():  # every gate at its fixed value, for every input
        torch.testing.assert_close(values[key], torch.full((4,), g), rtol=0, atol=1e-6)
    with pytest.raises(PELTError, match="merged"):
        unipelt.save_pretrained(merged, "unused")
    torch.testing.assert_close(logits(merged, one), logits(model, one), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_calibrated_merge_error_is_bounded_on_held_out_inputs(family):
    """On inputs it was not calibrated on, the merged model's error stays a small part of what the
    submodules change, and below fixing every gate at 1 (no calibration)."""
    model = trained(family, "unipelt_apl", steps=8)
    calibration = [batch(family, 8, seed=s) for s in (20, 21, 22)]
    held_out = batch(family, 8, seed=30)
    gates = unipelt.calibrate_gates(model, calibration)
    merged = unipelt.merge(model, gates)
    reference = logits(model, held_out)
    error = (logits(merged, held_out) - reference).abs().max()
    uncalibrated = (logits(unipelt.merge(model, dict.fromkeys(gates, 1.0)), held_out) - reference).abs().max()
    effect = (logits(backbone(family).eval(), held_out) - reference).abs().max()  # submodules on vs off
    assert effect > 0.05, effect  # the submodules matter on this model
    assert error < 0.25 * effect and error < 0.5 * uncalibrated, (error, uncalibrated, effect)


def test_calibrate_gates_is_the_mean_over_every_example():
    model = trained("bert", "unipelt_ap")
    batches = [batch("bert", 3, seed=40), batch("bert", 5, seed=41)]
    per_example = {}
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            with torch.no_grad():
                model(**{k: v[i:i + 1] for k, v in b.items()})
            for key, value in unipelt.gate_values(model).items():
                per_example.setdefault(key, []).append(float(value))
    gates = unipelt.calibrate_gates(model, batches)
    assert gates.keys() == per_example.keys()
    for key, values in per_example.items():
        assert gates[key] == pytest.approx(sum(values) / len(values), abs=1e-6)
