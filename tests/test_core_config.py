"""PELTConfig, presets and error messages."""

from __future__ import annotations

import json

import pytest
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from unipelt import PRESETS, PELTConfig, PELTError, apply_pelt


def test_presets_listed_and_roundtrip():
    assert {"finetune", "bitfit", "adapter", "prefix", "lora", "unipelt_ap", "unipelt_apl",
            "unipelt_apl_nogate"} <= set(PRESETS)
    for name in PRESETS:
        cfg = PELTConfig.preset(name)
        assert cfg.name == name
        d = json.loads(json.dumps(cfg.to_dict()))
        assert PELTConfig.from_dict(d) == cfg


def test_preset_overrides_and_gating():
    cfg = PELTConfig.preset("unipelt_apl", lora_r=16, lora_targets="query,key")
    assert cfg.lora_r == 16 and cfg.lora_targets == ("query", "key") and cfg.gated
    assert not PELTConfig.preset("unipelt_apl_nogate").gated
    for single in ("adapter", "prefix", "lora"):  # single methods are ungated, as in the paper
        assert not PELTConfig.preset(single).gated


@pytest.mark.parametrize("call, words", [
    (lambda: PELTConfig.preset("unipelt"), ["unknown preset", "unipelt_apl", "bitfit"]),
    (lambda: PELTConfig.preset("lora", lora_rank=4), ["unknown PELTConfig field", "lora_r"]),
    (lambda: PELTConfig.preset("lora", lora_r=0), ["lora_r", "positive"]),
    (lambda: PELTConfig.preset("adapter", adapter_activation="swish"), ["swish", "relu", "gelu"]),
    (lambda: PELTConfig.preset("lora", lora_targets=("query", "dense")), ["dense", "query, key, value"]),
    (lambda: PELTConfig.preset("lora", lora_dropout=1.5), ["lora_dropout"]),
    (lambda: PELTConfig.preset("finetune", lora=True), ["finetune", "cannot be combined"]),
    (lambda: PELTConfig.preset("prefix", prefix="yes"), ["prefix must be true or false"]),
    (lambda: PELTConfig.from_dict({"bogus": 1}), ["unknown PELTConfig field 'bogus'"]),
])
def test_config_errors_are_one_line_and_name_choices(call, words):
    with pytest.raises(PELTError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert isinstance(info.value, ValueError)


def test_unsupported_family_names_supported_ones():
    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=99, dim=32, n_layers=1, n_heads=4, hidden_dim=37))
    with pytest.raises(PELTError, match="unsupported model type 'distilbert'.*bert, roberta"):
        apply_pelt(model, PELTConfig.preset("lora"))


def test_apply_twice_and_non_config_errors(make_tiny):
    model = apply_pelt(make_tiny(), PELTConfig.preset("lora"))
    with pytest.raises(PELTError, match="already applied"):
        apply_pelt(model, PELTConfig.preset("lora"))
    with pytest.raises(PELTError, match="PELTConfig"):
        apply_pelt(make_tiny(), {"lora": True})
