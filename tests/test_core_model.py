"""Behaviour of every preset on tiny random BERT and RoBERTa models."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from unipelt import (
    PRESETS,
    PELTConfig,
    PELTError,
    apply_pelt,
    count_trainable,
    gate_values,
    load_pelt_state_dict,
    pelt_state_dict,
)
from unipelt.gates import ConstantGate, Gate

FAMILIES = ("bert", "roberta")
PAD = {"bert": 0, "roberta": 1}


def batch(family: str, lengths: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded random ids (never the pad id inside a sequence) and their mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD[family])
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, 99, (n,), generator=g)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pelt(make_tiny, family: str, preset: str, seed: int = 0, **overrides) -> torch.nn.Module:
    model = make_tiny(family)  # backbone always from seed 0
    torch.manual_seed(100 + seed)  # new modules: seed-dependent
    return apply_pelt(model, PELTConfig.preset(preset, **overrides))


def train_steps(model: torch.nn.Module, family: str, steps: int = 3) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch(family, [7, 5, 3])
    for _ in range(steps):
        out = model(**inputs, labels=torch.tensor([0, 1, 2]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_padding_does_not_change_logits(make_tiny, family, preset):
    model = pelt(make_tiny, family, preset).eval()
    train_steps(model, family, steps=1)  # LoRA B leaves zero, so LoRA matters
    model.eval()
    alone = batch(family, [5])
    padded = batch(family, [9, 5, 2])
    padded["input_ids"][1] = torch.cat([alone["input_ids"][0], padded["input_ids"][1, 5:]])
    with torch.no_grad():
        ref = model(**alone).logits[0]
        ref_no_mask = model(input_ids=alone["input_ids"]).logits[0]
        got = model(**padded).logits[1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref_no_mask, ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_frozen_stay_bit_identical_and_trainable_move(make_tiny, family, preset):
    model = pelt(make_tiny, family, preset)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, family)
    trainable = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += 1
            assert not torch.equal(p, before[name]), f"{name} did not move"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    assert trainable > 0
    head = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("classifier")]
    assert head, "the classification head must train for every method"
    if preset != "finetune":  # the pretrained pooler/embeddings stay frozen
        assert not model.base_model.embeddings.word_embeddings.weight.requires_grad


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_save_load_reproduces_logits_exactly(make_tiny, family, preset):
    model = pelt(make_tiny, family, preset)
    train_steps(model, family, steps=2)
    model.eval()
    inputs = batch(family, [8, 6, 3], seed=5)
    with torch.no_grad():
        expected = model(**inputs).logits
    buffer = io.BytesIO()
    torch.save(pelt_state_dict(model), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    fresh = pelt(make_tiny, family, preset, seed=1)
    load_pelt_state_dict(fresh, state)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, expected)
    assert set(state) == {"config", "backbone", "weights"}
    assert state["backbone"]["model_type"] == family
    if preset != "finetune":
        assert sum(t.numel() for t in state["weights"].values()) == count_trainable(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_in_unit_interval_per_example_and_padding_free(make_tiny, family):
    model = pelt(make_tiny, family, "unipelt_apl").eval()
    with torch.no_grad():
        model(**batch(family, [6, 4, 2]))
    gates = gate_values(model)
    expected = {f"layer{i}.{k}" for i in range(2)
                for k in ("adapter", "prefix", "lora_query", "lora_value")}
    assert set(gates) == expected
    for value in gates.values():
        assert value.shape == (3,) and not value.requires_grad
        assert ((value > 0) & (value < 1)).all()
    # a sequence's gates do not depend on the padding added to its batch
    ids = batch(family, [4])["input_ids"]
    with torch.no_grad():
        model(input_ids=ids)
        alone = gate_values(model)
        padded = torch.cat([ids, torch.full((1, 3), PAD[family])], dim=1)
        model(input_ids=padded, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0, 0]]))
        with_pad = gate_values(model)
    for key in expected:
        torch.testing.assert_close(with_pad[key], alone[key], rtol=1e-5, atol=1e-6)


def _force_gates(model: torch.nn.Module, cfg: PELTConfig) -> int:
    """Replace every Gate by a constant: 1 for adapter/prefix, alpha/r for LoRA."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Gate):
                value = cfg.lora_alpha / cfg.lora_r if ".lora_" in child.key else 1.0
                setattr(module, child_name, ConstantGate(value, child.key))
                count += 1
    return count


@pytest.mark.parametrize("gated, ungated", [("unipelt_apl", "unipelt_apl_nogate"),
                                            ("unipelt_ap", "unipelt_ap_nogate")])
def test_nogate_equals_gated_model_with_forced_gates(make_tiny, gated, ungated):
    """NoGate is defined as: adapter and prefix scale 1, LoRA scale alpha/r (authors' code).

    The gated model, with every Gate module replaced by that constant and the same
    submodule weights, must give the NoGate model's logits: the ungated code paths
    (no gate module at all) and the gated ones agree.
    """
    model = pelt(make_tiny, "bert", gated)
    train_steps(model, "bert", steps=2)
    nogate = pelt(make_tiny, "bert", ungated, seed=3)
    weights = {n: p for n, p in model.named_parameters() if "gate.proj." not in n}
    missing = nogate.load_state_dict(weights, strict=False)
    assert not missing.unexpected_keys and all("gate.proj." not in k for k in missing.missing_keys)
    n = _force_gates(model, model.pelt_config)
    assert n == 2 * (4 if "apl" in gated else 2)
    model.eval()
    nogate.eval()
    inputs = batch("bert", [7, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, nogate(**inputs).logits,
                                   rtol=1e-6, atol=1e-7)
        # and the gated model with its real gates differs (the gates matter)
        real = pelt(make_tiny, "bert", gated)
        real.load_state_dict(weights, strict=False)
        assert not torch.allclose(real.eval()(**inputs).logits, nogate(**inputs).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_at_zero_init_equals_backbone(make_tiny, family):
    backbone = make_tiny(family).eval()
    model = apply_pelt(copy.deepcopy(backbone), PELTConfig.preset("lora")).eval()
    inputs = batch(family, [6, 3])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, backbone(**inputs).logits)
    # the adapter leaves the block unchanged when its output is zero (Pfeiffer placement)
    model = apply_pelt(copy.deepcopy(backbone), PELTConfig.preset("adapter")).eval()
    for name, p in model.named_parameters():
        if ".adapter.up." in name:
            torch.nn.init.zeros_(p)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, backbone(**inputs).logits,
                                   rtol=0, atol=1e-6)


def test_eager_attention_matches_sdpa_with_prefix(make_tiny):
    inputs = batch("bert", [7, 4])
    logits = []
    for attn in ("sdpa", "eager"):
        model = make_tiny("bert", attn=attn)
        torch.manual_seed(100)
        apply_pelt(model, PELTConfig.preset("unipelt_apl")).eval()
        assert model.config._attn_implementation == f"unipelt_{attn}"
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-6)


def test_deepcopy_keeps_working(make_tiny):
    model = pelt(make_tiny, "bert", "unipelt_apl").eval()
    clone = copy.deepcopy(model)
    inputs = batch("bert", [5, 3])
    with torch.no_grad():
        expected = model(**inputs).logits
        got = clone(**inputs).logits
    assert torch.equal(got, expected)
    assert all(v.shape == (2,) for v in gate_values(clone).values())


def test_load_mismatches_are_named(make_tiny):
    lora = pelt(make_tiny, "bert", "lora")
    apl = pelt(make_tiny, "bert", "unipelt_apl")
    with pytest.raises(PELTError, match="made with method 'lora' but the model uses 'unipelt_apl'"):
        load_pelt_state_dict(apl, pelt_state_dict(lora))
    r16 = pelt(make_tiny, "bert", "lora", lora_r=16)
    with pytest.raises(PELTError, match="lora_r=8 .model: 16."):
        load_pelt_state_dict(r16, pelt_state_dict(lora))
    wide = apply_pelt(make_tiny("bert", hidden_size=48), PELTConfig.preset("lora"))
    with pytest.raises(PELTError, match="backbone differs.*hidden_size=32 .model: 48."):
        load_pelt_state_dict(wide, pelt_state_dict(lora))
    other_family = pelt(make_tiny, "roberta", "lora")
    with pytest.raises(PELTError, match="model_type='bert'"):
        load_pelt_state_dict(other_family, pelt_state_dict(lora))
    state = pelt_state_dict(lora)
    name = next(iter(state["weights"]))
    state["weights"][name] = state["weights"][name][..., :1]
    with pytest.raises(PELTError, match=f"{name} has shape"):
        load_pelt_state_dict(pelt(make_tiny, "bert", "lora"), state)
    state = pelt_state_dict(lora)
    state["weights"].pop(name)
    with pytest.raises(PELTError, match="missing"):
        load_pelt_state_dict(pelt(make_tiny, "bert", "lora"), state)
    with pytest.raises(PELTError, match="apply_pelt"):
        pelt_state_dict(make_tiny())
