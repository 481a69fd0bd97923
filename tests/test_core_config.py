"""PELTConfig, presets, the backbone table and their error messages."""

from __future__ import annotations

import json

import pytest
from transformers import AlbertConfig, AlbertForSequenceClassification

from unipelt import BACKBONES, PRESETS, PELTConfig, PELTError, apply_pelt, spec_for
from unipelt.tuners import TUNERS

try:  # works whether or not tests/ is a package
    from .test_core_model import tiny
except ImportError:
    from test_core_model import tiny


def test_presets_listed_and_roundtrip():
    assert {"finetune", "bitfit", "adapter", "prefix", "lora", "unipelt_ap", "unipelt_apl",
            "unipelt_apl_nogate"} <= set(PRESETS)
    for name in PRESETS:
        cfg = PELTConfig.preset(name)
        assert cfg.name == name
        d = json.loads(json.dumps(cfg.to_dict()))
        assert PELTConfig.from_dict(d) == cfg
        assert PELTConfig.from_dict(json.loads(json.dumps(cfg.flat()))) == cfg  # v1 flat form
        preset = PRESETS[name]
        assert set(cfg.submodules) == set(preset.submodules)
        assert {k for k, s in cfg.submodules.items() if s.gate} == set(preset.gates)


def test_preset_overrides_and_gating():
    cfg = PELTConfig.preset("unipelt_apl", lora_r=16, lora_targets="query,key")
    assert cfg.lora_r == 16 and cfg.lora.r == 16 and cfg.lora_targets == ("query", "key") and cfg.gated
    assert cfg.adapter.bottleneck == 48 and cfg.prefix.length == 10 and cfg.bitfit is None
    assert not PELTConfig.preset("unipelt_apl_nogate").gated
    for single in ("adapter", "prefix", "lora"):  # single methods are ungated, as in the paper
        assert not PELTConfig.preset(single).gated
    # a submodule can be added by name, with its fields
    both = PELTConfig.preset("lora", adapter=True, adapter_bottleneck=16)
    assert set(both.submodules) == {"adapter", "lora"} and both.adapter.bottleneck == 16


def test_preset_names_ignore_case():
    assert PELTConfig.preset("UniPELT_APL") == PELTConfig.preset("unipelt_apl")
    assert PELTConfig.preset("UniPELT_APL").name == "unipelt_apl"
    assert "LoRA" in PRESETS and PRESETS["LoRA"].label == "LoRA"


def test_v1_flat_dict_loads():
    v1 = {"name": "unipelt_ap", "finetune": False, "bitfit": False, "adapter": True,
          "adapter_bottleneck": 48, "adapter_activation": "relu", "adapter_gate": True,
          "prefix": True, "prefix_length": 10, "prefix_mid_dim": 512, "prefix_gate": True,
          "lora": False, "lora_r": 8, "lora_alpha": 16, "lora_targets": ["query", "value"],
          "lora_dropout": 0.0, "lora_gate": False, "init_std": 0.02}
    assert PELTConfig.from_dict(v1) == PELTConfig.preset("unipelt_ap")


@pytest.mark.parametrize("call, words", [
    (lambda: PELTConfig.preset("unipelt"), ["unknown preset", "unipelt_apl", "bitfit"]),
    (lambda: PELTConfig.preset("lora", lora_rank=4), ["unknown PELTConfig field", "lora_r"]),
    (lambda: PELTConfig.preset("lora", lora_r=0), ["lora_r", "positive"]),
    (lambda: PELTConfig.preset("adapter", adapter_activation="swish"), ["swish", "relu", "gelu"]),
    (lambda: PELTConfig.preset("lora", lora_targets=("query", "dense")), ["dense", "query, key, value"]),
    (lambda: PELTConfig.preset("lora", lora_dropout=1.5), ["lora_dropout"]),
    (lambda: PELTConfig.preset("finetune", lora=True), ["finetune", "cannot be combined"]),
    (lambda: PELTConfig.preset("prefix", prefix="yes"), ["prefix must be true or false"]),
    (lambda: PELTConfig.preset("lora", adapter_bottleneck=64),
     ["adapter_bottleneck does not apply", "preset 'lora' has no adapter", "its submodules: lora"]),
    (lambda: PELTConfig.preset("bitfit", bitfit_gate=True), ["bitfit has no gate"]),
    (lambda: PELTConfig.from_dict({"bogus": 1}), ["unknown PELTConfig field 'bogus'"]),
    (lambda: PELTConfig.from_dict({"lora": {"rank": 4}}), ["unknown lora field 'rank'", "r, alpha"]),
])
def test_config_errors_are_one_line_and_name_choices(call, words):
    with pytest.raises(PELTError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert isinstance(info.value, ValueError)


def test_registry_and_backbone_table():
    assert list(TUNERS) == ["bitfit", "adapter", "lora", "ia3", "parallel_adapter", "prefix"]
    assert {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2",
            "modernbert"} <= set(BACKBONES)


def test_unsupported_family_names_supported_ones():
    model = AlbertForSequenceClassification(AlbertConfig(
        vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=37))
    with pytest.raises(PELTError, match="unsupported model type 'albert'.*bert, roberta.*modernbert"):
        apply_pelt(model, PELTConfig.preset("lora"))


def test_spec_position_offset_and_no_decay():
    roberta = tiny("roberta")
    assert spec_for(roberta).max_input_length(roberta.config) == 64 - 2  # padding_idx 1 + 1
    assert spec_for(tiny("bert").config).max_input_length(tiny("bert").config) == 64
    for family in ("bert", "distilbert", "deberta-v2", "modernbert", "electra"):
        model = tiny(family)
        spec = spec_for(model)
        no_decay = [n for n, _ in model.named_parameters() if not spec.decays(n)]
        assert all(n.endswith("bias") or "norm" in n.lower() for n in no_decay), family
        norms = [n for n, _ in model.named_parameters() if "norm" in n.lower() and n.endswith("weight")]
        assert norms and not any(spec.decays(n) for n in norms), family
        assert any(spec.decays(n) for n, _ in model.named_parameters())


def test_apply_twice_and_non_config_errors():
    model = apply_pelt(tiny("bert"), PELTConfig.preset("lora"))
    with pytest.raises(PELTError, match="already applied"):
        apply_pelt(model, PELTConfig.preset("lora"))
    with pytest.raises(PELTError, match="PELTConfig"):
        apply_pelt(tiny("bert"), {"lora": True})


def test_xlm_roberta_shares_roberta_layout():
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    torch.manual_seed(0)
    model = XLMRobertaForSequenceClassification(XLMRobertaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=70, pad_token_id=1, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2))
    model = apply_pelt(model, PELTConfig.preset("unipelt_apl")).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, 1, 1]])
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        got = model(input_ids=padded, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])).logits
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-6)
    assert spec_for(model).max_input_length(model.config) == 70 - 2
