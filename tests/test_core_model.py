"""Behaviour of every preset on tiny random models of every supported family."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    ModernBertConfig,
    ModernBertForSequenceClassification,
)

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
from unipelt.gates import GateBank

FAMILIES = ("bert", "roberta", "electra", "distilbert", "deberta-v2", "modernbert")
PAD = {"roberta": 1}
SMALL = dict(vocab_size=99, num_labels=3)


def tiny(family: str, seed: int = 0, attn: str = "sdpa", **overrides) -> torch.nn.Module:
    """A 2-3 layer random model of ``family`` (hidden 32, 4 heads), dropout off, in seconds."""
    torch.manual_seed(seed)
    if family in ("bert", "roberta"):
        from transformers import (
            BertConfig,
            BertForSequenceClassification,
            RobertaConfig,
            RobertaForSequenceClassification,
        )
        kwargs = {**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, **SMALL), **overrides}
        model = (BertForSequenceClassification(BertConfig(**kwargs)) if family == "bert" else
                 RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **kwargs)))
    elif family == "electra":
        model = ElectraForSequenceClassification(ElectraConfig(
            embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **SMALL, **overrides))
    elif family == "distilbert":
        model = DistilBertForSequenceClassification(DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64, dropout=0.0,
            attention_dropout=0.0, seq_classif_dropout=0.0, **SMALL, **overrides))
    elif family == "deberta-v2":  # DeBERTa-v3's settings: relative attention, shared keys, buckets
        model = DebertaV2ForSequenceClassification(DebertaV2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, relative_attention=True, position_buckets=8,
            max_relative_positions=16, pos_att_type=["p2c", "c2p"], position_biased_input=False,
            norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0, pad_token_id=0,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pooler_dropout=0.0,
            **SMALL, **overrides))
    elif family == "modernbert":  # layer 0 global, layers 1-2 sliding (window 2 each side)
        model = ModernBertForSequenceClassification(ModernBertConfig(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=3,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
            attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0, classifier_dropout=0.0,
            **SMALL, **overrides))
    else:
        raise ValueError(family)
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    return model


def n_layers(model: torch.nn.Module) -> int:
    return model.config.num_hidden_layers


def batch(family: str, lengths: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded random ids (never the pad id inside a sequence) and their mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD.get(family, 0))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, 99, (n,), generator=g)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pelt(family: str, preset: str, seed: int = 0, attn: str = "sdpa", **overrides) -> torch.nn.Module:
    model = tiny(family, attn="eager" if family == "deberta-v2" else attn)  # backbone: seed 0
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
def test_padding_does_not_change_logits(family, preset):
    model = pelt(family, preset)
    train_steps(model, family, steps=1)  # LoRA B leaves zero, so LoRA matters
    model.eval()
    alone = batch(family, [5])
    padded = batch(family, [9, 5, 2])
    padded["input_ids"][1] = torch.cat([alone["input_ids"][0], padded["input_ids"][1, 5:]])
    with torch.no_grad():
        ref = model(**alone).logits[0]
        ref_no_mask = model(input_ids=alone["input_ids"]).logits[0]
        got = model(**padded).logits[1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_no_mask, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_frozen_stay_bit_identical_and_trainable_move(family, preset):
    model = pelt(family, preset)
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
    base_prefix = model.base_model_prefix + "."
    head = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(base_prefix)]
    assert head, "the classification head must train for every method"
    if preset != "finetune":  # the pretrained embeddings stay frozen
        assert not model.get_input_embeddings().weight.requires_grad


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_save_load_reproduces_logits_exactly(family, preset):
    model = pelt(family, preset)
    train_steps(model, family, steps=2)
    model.eval()
    inputs = batch(family, [8, 6, 3], seed=5)
    with torch.no_grad():
        expected = model(**inputs).logits
    buffer = io.BytesIO()
    torch.save(pelt_state_dict(model), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = pelt(family, preset, seed=1)
    load_pelt_state_dict(fresh, state)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, expected)
    assert set(state) == {"config", "backbone", "weights"}
    assert state["backbone"]["model_type"] == family
    if preset != "finetune":
        assert sum(t.numel() for t in state["weights"].values()) == count_trainable(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_in_unit_interval_per_example_and_padding_free(family):
    model = pelt(family, "unipelt_apl").eval()
    with torch.no_grad():
        model(**batch(family, [6, 4, 2]))
    gates = gate_values(model)
    expected = {f"layer{i}.{k}" for i in range(n_layers(model))
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
        padded = torch.cat([ids, torch.full((1, 3), PAD.get(family, 0))], dim=1)
        model(input_ids=padded, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0, 0]]))
        with_pad = gate_values(model)
    for key in expected:
        torch.testing.assert_close(with_pad[key], alone[key], rtol=1e-5, atol=1e-6)


def _constant_gates(monkeypatch: pytest.MonkeyPatch, config: PELTConfig) -> None:
    """Every gate forced to its NoGate constant: 1 for adapter/prefix, alpha/r for LoRA."""
    scale = config.lora.alpha / config.lora.r if config.lora is not None else None

    def forced(bank: GateBank, x: torch.Tensor) -> torch.Tensor:
        values = [scale if key.startswith("lora_") else 1.0 for key in bank.keys]
        return x.new_tensor(values).expand(x.shape[0], -1)

    monkeypatch.setattr(GateBank, "forward", forced)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gated, ungated", [("unipelt_apl", "unipelt_apl_nogate"),
                                            ("unipelt_ap", "unipelt_ap_nogate")])
def test_nogate_equals_gated_model_with_forced_gates(family, gated, ungated, monkeypatch):
    """NoGate is defined as: adapter and prefix scale 1, LoRA scale alpha/r (authors' code).

    The gated model, with every gate forced to that constant and the same submodule weights,
    must give the NoGate model's logits: the ungated code paths (no gate at all) and the gated
    ones agree. With its real gates it differs (the gates matter).
    """
    model = pelt(family, gated)
    train_steps(model, family, steps=2)
    nogate = pelt(family, ungated, seed=3)
    weights = {n: p for n, p in model.named_parameters() if ".pelt_gates." not in n}
    missing = nogate.load_state_dict(weights, strict=False)
    assert not missing.unexpected_keys and all(".pelt_gates." not in k for k in missing.missing_keys)
    model.eval()
    nogate.eval()
    inputs = batch(family, [7, 4])
    with torch.no_grad():
        real = model(**inputs).logits
        expected = nogate(**inputs).logits
        assert not torch.allclose(real, expected)
        _constant_gates(monkeypatch, model.pelt_config)
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_at_init_and_zero_adapter_equal_backbone(family):
    backbone = tiny(family, attn="eager" if family == "deberta-v2" else "sdpa").eval()
    inputs = batch(family, [6, 3])
    with torch.no_grad():
        reference = backbone(**inputs).logits
    model = apply_pelt(copy.deepcopy(backbone), PELTConfig.preset("lora")).eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    # the adapter leaves the block unchanged when its output is zero (Pfeiffer placement)
    model = apply_pelt(copy.deepcopy(backbone), PELTConfig.preset("adapter")).eval()
    for name, p in model.named_parameters():
        if ".adapter.up." in name:
            torch.nn.init.zeros_(p)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "distilbert", "modernbert"])
def test_eager_attention_matches_sdpa_with_prefix(family):
    inputs = batch(family, [7, 4])
    logits = []
    for attn in ("sdpa", "eager"):
        model = pelt(family, "unipelt_apl", attn=attn).eval()
        assert model.config._attn_implementation == f"unipelt_{attn}"
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_deepcopy_keeps_working(family):
    model = pelt(family, "unipelt_apl").eval()
    clone = copy.deepcopy(model)
    inputs = batch(family, [5, 3])
    with torch.no_grad():
        expected = model(**inputs).logits
        got = clone(**inputs).logits
    assert torch.equal(got, expected)
    assert gate_values(clone) and all(v.shape == (2,) for v in gate_values(clone).values())


def test_load_mismatches_are_named():
    lora = pelt("bert", "lora")
    apl = pelt("bert", "unipelt_apl")
    with pytest.raises(PELTError, match="made with method 'lora' but the model uses 'unipelt_apl'"):
        load_pelt_state_dict(apl, pelt_state_dict(lora))
    r16 = pelt("bert", "lora", lora_r=16)
    with pytest.raises(PELTError, match="lora_r=8 .model: 16."):
        load_pelt_state_dict(r16, pelt_state_dict(lora))
    wide = apply_pelt(tiny("bert", hidden_size=48), PELTConfig.preset("lora"))
    with pytest.raises(PELTError, match="backbone differs.*hidden_size=32 .model: 48."):
        load_pelt_state_dict(wide, pelt_state_dict(lora))
    other_family = pelt("roberta", "lora")
    with pytest.raises(PELTError, match="model_type='bert'"):
        load_pelt_state_dict(other_family, pelt_state_dict(lora))
    state = pelt_state_dict(lora)
    name = next(iter(state["weights"]))
    state["weights"][name] = state["weights"][name][..., :1]
    with pytest.raises(PELTError, match=f"{name} has shape"):
        load_pelt_state_dict(pelt("bert", "lora"), state)
    state = pelt_state_dict(lora)
    state["weights"].pop(name)
    with pytest.raises(PELTError, match="missing"):
        load_pelt_state_dict(pelt("bert", "lora"), state)
    with pytest.raises(PELTError, match="apply_pelt"):
        pelt_state_dict(tiny("bert"))


def test_training_uses_fused_adamw_where_torch_has_the_kernel():
    """The CPU default is a Python loop per tensor (bert-base fine-tuning: 470 vs 70 ms a step fused);
    a device without the kernel keeps torch's default rather than failing."""
    from lightning_modules.base import adamw

    cpu = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    fused = adamw([{"params": cpu[:1], "weight_decay": 0.1}, {"params": cpu[1:], "weight_decay": 0.0}], lr=0.1)
    assert fused.defaults["fused"] is True and [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert adamw([{"params": meta}], lr=0.1).defaults["fused"] is None
    # the same update as torch's default loop
    twins = [torch.nn.Parameter(p.detach().clone()) for p in cpu]
    plain = torch.optim.AdamW([{"params": twins[:1], "weight_decay": 0.1}, {"params": twins[1:], "weight_decay": 0.0}],
                              lr=0.1)
    for _ in range(3):
        for p, q in zip(cpu, twins, strict=True):
            p.grad = torch.full_like(p, 0.5)
            q.grad = torch.full_like(q, 0.5)
        fused.step()
        plain.step()
    for p, q in zip(cpu, twins, strict=True):
        torch.testing.assert_close(p, q)
