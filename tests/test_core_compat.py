"""Every private name of transformers/torch that unipelt/compat.py uses still exists in the installed
versions: a failure names the ones that disappeared (and so the compat function to rewrite)."""

from __future__ import annotations

import importlib

import torch
from transformers import BertConfig, BertForSequenceClassification

from tests.fixtures import enable_checkpointing
from unipelt import compat
from unipelt.backbones import BACKBONES

EXPLICIT = {name for name, spec in BACKBONES.items() if spec.explicit_attention is not None}


def modeling_file(family: str) -> str:
    package = family.replace("-", "_")
    return f"transformers.models.{package}.modeling_{package}"


def missing() -> list[str]:
    """'<where>: <name>' for each private name compat.py reads that is gone."""
    gone = []

    def check(where: str, ok) -> None:
        try:
            if not ok():
                gone.append(where)
        except Exception as err:  # noqa: BLE001 - any failure means the name is gone or changed
            gone.append(f"{where} ({type(err).__name__}: {err})")

    check("transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (compat.is_causal_lm)",
          lambda: compat.is_causal_lm("LlamaForCausalLM") and not compat.is_causal_lm("LlamaForSequenceClassification"))
    check("transformers.initialization.no_init_weights (compat.no_init_weights)",
          lambda: importlib.import_module("transformers.initialization").no_init_weights is not None)
    for family in BACKBONES:
        if family not in EXPLICIT:
            check(f"{modeling_file(family)}.eager_attention_forward (compat.eager_attention)",
                  lambda f=family: callable(importlib.import_module(modeling_file(f)).eager_attention_forward))
    for name in ("build_relative_position", "build_rpos", "scaled_size_sqrt"):
        check(f"transformers.models.deberta_v2.modeling_deberta_v2.{name} (compat.deberta_v2_functions)",
              lambda name=name: callable(getattr(compat.deberta_v2_functions(), name)))
    check("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu (compat.FLASH_CPU)",
          lambda: compat.FLASH_CPU is not None)
    check("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward (compat.FLASH_CPU_BACKWARD)",
          lambda: compat.FLASH_CPU_BACKWARD is not None)

    def version_counts() -> bool:
        t = torch.zeros(2)
        before = compat.version_counter(t)
        t.add_(1)
        return compat.version_counter(t) == before + 1

    check("torch.Tensor._version (compat.version_counter)", version_counts)

    model = BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=8))
    model.set_attn_implementation("eager")
    check("PretrainedConfig._attn_implementation (compat.attn_implementation)",
          lambda: compat.attn_implementation(model.config) == "eager")
    enable_checkpointing(model)
    layer = model.bert.encoder.layer[0]
    check("GradientCheckpointingLayer._gradient_checkpointing_func (compat.checkpoint_function)",
          lambda: callable(compat.checkpoint_function(layer)))
    return gone


def test_every_private_name_compat_uses_is_still_there():
    gone = missing()
    assert not gone, "gone from the installed transformers/torch: " + "; ".join(gone)


def test_the_check_names_a_name_that_is_gone(monkeypatch):
    monkeypatch.setattr(compat, "FLASH_CPU", None)
    assert missing() == ["torch.ops.aten._scaled_dot_product_flash_attention_for_cpu (compat.FLASH_CPU)"]
