"""(IA)^3, DoRA, rsLoRA and the parallel adapter as gated submodules on every family: what their gates mean,
where they sit, and that merge folds IA3 and DoRA exactly (the presets' padding, training, checkpoint and
causal tests run in tests/test_core_model.py, test_io_roundtrip.py and test_decoders.py, over every preset)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import unipelt
from tests.test_core_model import FAMILIES, batch, tiny, train_steps
from tests.test_decoders import config as decoder_config
from tests.test_decoders import pad, rows
from tests.test_export_merge import is_plain, logits, trained
from unipelt import PELTConfig, PELTError, apply_pelt, gate_values
from unipelt.context import current, positions_from_mask
from unipelt.gates import GateBank
from unipelt.tuners.ia3 import IA3Linear
from unipelt.tuners.lora import LoRALinear
from unipelt.tuners.parallel_adapter import ParallelAdapter

ALL = (*FAMILIES, "llama", "gpt2")


def loud_head(model: torch.nn.Module) -> torch.nn.Module:
    """The head (what lies outside the backbone) drawn with std 1: logits O(1), so that a change in the
    layers below shows in them (the default 0.02 makes every logit ~0.01)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(model.base_model_prefix + "."):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def model_of(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family in ("llama", "gpt2"):
        return loud_head(AutoModelForCausalLM.from_config(decoder_config(family)))
    return loud_head(tiny(family, attn="eager" if family == "deberta-v2" else "sdpa"))


def inputs(family: str) -> dict[str, torch.Tensor]:
    if family in ("llama", "gpt2"):  # left-padded; positions passed, as a plain transformers decoder needs them
        ids, mask = pad(rows(seed=3, lengths=(7, 4)), "left")
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask, ids.shape[1])}
    return batch(family, [7, 4], seed=3)


def nudged(model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """Every new tensor moved off its init (vectors of ones, zero B and up): a trained state."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("ia3_l", "lora_", "adapter", "pelt_")):  # not the head: the backbone's
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def forced(monkeypatch: pytest.MonkeyPatch, value: float | dict[str, float]) -> None:
    """Every gate at ``value`` (or ``value[key]``) for every input (per example, or per token in decoders)."""
    def constant(bank: GateBank, x: torch.Tensor) -> torch.Tensor:
        values = [value[k] if isinstance(value, dict) else value for k in bank.gate_keys]
        return current().reduce(x.new_tensor(values).expand(*x.shape[:-1], len(values)))

    monkeypatch.setattr(GateBank, "forward", constant)


def out(model: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(family)).logits


GATED = {"ia3": {"ia3_gate": True}, "dora": {"lora_dora": True, "lora_gate": True},
         "parallel_adapter": {"parallel_adapter_gate": True}}
UNGATED = {"ia3": "ia3", "dora": "dora", "parallel_adapter": "parallel_adapter"}


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("method", GATED)
def test_gate_zero_is_the_backbone_and_gate_one_the_ungated_method(family, method, monkeypatch):
    """The gating forms: IA3 ``1 + g (l - 1)``, DoRA ``W x + g (DoRA(x) - W x)``, the parallel adapter
    ``h + g s PA(x)``: at 0 the frozen backbone, at 1 the method as PEFT (or He et al.) computes it."""
    preset = "lora" if method == "dora" else method
    gated = nudged(apply_pelt(model_of(family), PELTConfig.preset(preset, **GATED[method])))
    ungated = apply_pelt(model_of(family), PELTConfig.preset(UNGATED[method]))
    missing = ungated.load_state_dict({n: p for n, p in gated.named_parameters() if ".pelt_gates." not in n},
                                      strict=False)
    assert not missing.unexpected_keys
    backbone = model_of(family).eval()
    real = out(gated, family)
    assert not torch.allclose(real, out(backbone, family), atol=1e-4)
    forced(monkeypatch, 0.0)
    torch.testing.assert_close(out(gated, family), out(backbone, family), rtol=1e-5, atol=1e-6)
    forced(monkeypatch, 1.0)
    torch.testing.assert_close(out(gated, family), out(ungated.eval(), family), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ("bert", "llama"))
def test_a_gate_between_scales_ia3_vectors_and_the_parallel_adapter_as_documented(family, monkeypatch):
    """Gate 0.3: each IA3 vector acts as 1 + 0.3 (l - 1), the parallel adapter as scale 0.3 s."""
    gated = nudged(apply_pelt(model_of(family), PELTConfig.preset(
        "ia3", ia3_gate=True, parallel_adapter=True, parallel_adapter_gate=True)))
    ungated = apply_pelt(model_of(family), PELTConfig.preset("ia3", parallel_adapter=True,
                                                             parallel_adapter_scale=0.3 * 4.0))
    weights = {n: p.detach().clone() for n, p in gated.named_parameters() if ".pelt_gates." not in n}
    for name in list(weights):
        if name.endswith("ia3_l"):
            weights[name] = 1 + 0.3 * (weights[name] - 1)
    ungated.load_state_dict(weights, strict=False)
    forced(monkeypatch, 0.3)
    torch.testing.assert_close(out(gated, family), out(ungated.eval(), family), rtol=1e-5, atol=1e-5)


def sites(model: torch.nn.Module) -> dict[str, list[str]]:
    spec = unipelt.spec_for(model)
    layer = spec.layer_list(model)[0]
    return {"ia3 out": [n for n, m in layer.named_modules() if isinstance(m, IA3Linear) and not m.on_input],
            "ia3 in": [n for n, m in layer.named_modules() if isinstance(m, IA3Linear) and m.on_input],
            "parallel": [n for n, m in layer.named_modules() if isinstance(m, ParallelAdapter)]}


@pytest.mark.parametrize("family,expected", [
    ("bert", {"ia3 out": ["attention.self.key", "attention.self.value"],
              "ia3 in": ["attention.output.dense", "output.base.base.dense"],
              "parallel": ["output.parallel_adapter"]}),
    ("distilbert", {"ia3 out": ["attention.k_lin", "attention.v_lin"], "ia3 in": ["ffn.base.base.lin2"],
                    "parallel": ["ffn.base.parallel_adapter"]}),
    ("modernbert", {"ia3 out": ["attn.Wqkv"], "ia3 in": ["mlp.base.Wo"], "parallel": ["mlp.parallel_adapter"]}),
    ("llama", {"ia3 out": ["self_attn.k_proj", "self_attn.v_proj"], "ia3 in": ["mlp.base.base.down_proj"],
               "parallel": ["mlp.base.parallel_adapter"]}),
    ("gpt2", {"ia3 out": ["attn.c_attn"], "ia3 in": ["mlp.base.base.c_proj"],
              "parallel": ["mlp.base.parallel_adapter"]}),
])
def test_in_a_union_each_submodule_sits_at_its_site_and_the_series_adapter_reads_the_parallel_one(family, expected):
    """unipelt_all: IA3 on the family's sites, the parallel adapter beside the FFN, inside the series adapter's
    wrapper (or, in post-LN BERT, outside the output block it gives the FFN input to)."""
    model = apply_pelt(model_of(family), PELTConfig.preset("unipelt_all"))
    assert sites(model) == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset,overrides", [
    ("ia3", {}), ("dora", {}), ("lora", {"lora_rslora": True}), ("dora", {"lora_rslora": True}),
    ("dora", {"lora_targets": "query,key,value"}),
])
def test_ungated_ia3_dora_and_rslora_merge_into_a_plain_model_with_the_same_logits(family, preset, overrides):
    model = trained(family, preset, **overrides)
    data = batch(family, [9, 6, 3], seed=8)
    before = logits(model, data)
    assert not torch.allclose(before, logits(tiny(family, attn="eager" if family == "deberta-v2" else "sdpa").eval(),
                                             data), atol=1e-4)
    plain = unipelt.merge(model)
    assert type(plain) is type(model) and is_plain(plain)
    torch.testing.assert_close(logits(plain, data), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("preset", ["unipelt_all", "unipelt_apl_dora"])
def test_calibrated_merge_equals_the_model_with_its_gates_held_at_those_values(family, preset, monkeypatch):
    """IA3 and DoRA fold with their fixed gates, the parallel adapter stays with a constant gate: exact
    against the gated model whose gates are held at the same values."""
    model = nudged(apply_pelt(model_of(family), PELTConfig.preset(preset)))
    gates = unipelt.calibrate_gates(model, [inputs(family)])
    merged = unipelt.merge(model, gates)
    assert not any(isinstance(m, (LoRALinear, IA3Linear)) for m in merged.modules())
    assert any(isinstance(m, ParallelAdapter) for m in merged.modules()) == (preset == "unipelt_all")
    expected = out(merged, family)
    assert not torch.allclose(expected, out(model, family), atol=1e-4)  # the gates vary: fixing them shows
    forced(monkeypatch, gates)
    torch.testing.assert_close(expected, out(model, family), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ("bert", "deberta-v2", "llama"))
def test_gates_of_new_submodules_are_reported_and_train(family):
    model = apply_pelt(model_of(family), PELTConfig.preset("unipelt_all"))
    if family != "llama":
        train_steps(model, family, steps=2)
    with torch.no_grad():
        model.eval()(**inputs(family))
    keys = set(gate_values(model))
    for i in range(model.config.num_hidden_layers):
        assert {f"layer{i}.{k}" for k in ("adapter", "parallel_adapter", "prefix", "lora_query", "lora_value",
                                          "ia3")} <= keys


@pytest.mark.parametrize("call,words", [
    (lambda: PELTConfig.preset("unipelt_apl", lora_rslora=True), "lora_rslora changes nothing when lora_gate"),
    (lambda: PELTConfig.preset("parallel_adapter", parallel_adapter_scale=0), "parallel_adapter_scale must be a"),
    (lambda: PELTConfig.preset("parallel_adapter", parallel_adapter_activation="swish"), "is not one of: relu"),
    (lambda: PELTConfig.preset("dora", lora_dora="yes"), "lora_dora must be true or false"),
    (lambda: PELTConfig.preset("lora", ia3_gate=True), "ia3_gate does not apply"),
])
def test_bad_options_are_one_line_errors_naming_the_value(call, words):
    with pytest.raises(PELTError, match=words) as err:
        call()
    assert "\n" not in str(err.value)


def test_gated_dora_keeps_its_scale_and_rslora_changes_it():
    """DoRA's gate multiplies its change (alpha/r stays: the norm needs it); rsLoRA is alpha/sqrt(r)."""
    cfg = PELTConfig.preset("unipelt_apl_dora", lora_rslora=True, lora_r=16, lora_alpha=8)
    model = apply_pelt(model_of("bert"), cfg)
    lora = next(m for m in model.modules() if isinstance(m, LoRALinear))
    assert lora.dora and lora.gate is not None and lora.scaling == pytest.approx(8 / 4)
    assert cfg.lora.scaling == pytest.approx(2.0) and PELTConfig.preset("lora").lora.scaling == 2.0


def test_the_presets_are_the_unions_the_issue_names():
    presets = unipelt.PRESETS
    assert presets["unipelt_apl_dora"].options == (("lora_dora", True),)
    assert set(presets["unipelt_apli"].gates) == {"adapter", "prefix", "lora", "ia3"}
    assert set(presets["unipelt_all"].gates) == {"adapter", "parallel_adapter", "prefix", "lora", "ia3"}
    cfg = PELTConfig.preset("unipelt_apl", lora_dora=True, ia3=True, ia3_gate=True)  # the issue's example
    assert cfg.lora.dora and cfg.ia3.gate and cfg.adapter.gate
    dora = PELTConfig.preset("dora")
    assert dora.lora.dora and not dora.lora.gate and set(dora.submodules) == {"lora"}
    assert copy.deepcopy(dora) == PELTConfig.from_dict(dora.to_dict())
