"""(IA)^3, DoRA and rsLoRA equal PEFT's on shared weights, and to_peft writes what PEFT loads to our logits.

Each test builds PEFT's model and ours on copies of one random backbone, copies the same random "trained"
tensors into both (PEFT's targets must be exactly ours: every tensor has its counterpart), and compares
logits (and for DoRA the gradients: its norm is a constant in both). Families PEFT has no IA3 default for
(ELECTRA, XLM-R, DistilBERT, ModernBERT) get our sites as PEFT's ``target_modules``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

import unipelt
from tests.test_core_model import FAMILIES as ENCODERS
from tests.test_core_model import tiny
from tests.test_decoders import FAMILIES as DECODERS
from tests.test_decoders import config as decoder_config
from tests.test_space_tuners import loud_head
from unipelt import PELTConfig, PELTError, apply_pelt, spec_for
from unipelt.context import positions_from_mask
from unipelt.tuners.base import backbone_path
from unipelt.tuners.ia3 import IA3Linear
from unipelt.tuners.lora import LoRALinear

peft = pytest.importorskip("peft")

PEFT_IA3_DEFAULT = ("bert", "roberta", "deberta-v2", "llama", "mistral", "qwen2", "qwen3", "gpt2")
ALL = (*ENCODERS, "xlm-roberta", *DECODERS)
UNFUSED = [f for f in ALL if f not in ("modernbert", "gpt2")]  # PEFT's LoRA cannot take slices of a fused qkv


def backbone(family: str) -> torch.nn.Module:
    """A tiny random model: a classifier for encoders, a causal LM for decoders; its head drawn with std 1,
    so that logits are O(1) and a difference in the layers below shows in them."""
    torch.manual_seed(0)
    if family in DECODERS:
        model = AutoModelForCausalLM.from_config(decoder_config(family))
    elif family == "xlm-roberta":
        model = XLMRobertaForSequenceClassification(XLMRobertaConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=70, pad_token_id=1, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=3))
    else:
        model = tiny(family, attn="eager" if family == "deberta-v2" else "sdpa")
    return loud_head(model).eval()


def inputs(family: str) -> dict[str, torch.Tensor]:
    """Four rows, the second padded (left for decoders, which take positions from the mask)."""
    g = torch.Generator().manual_seed(1)
    decoder = family in DECODERS
    ids = torch.randint(3, 61 if decoder else 99, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    pad_id = 1 if family in ("roberta", "xlm-roberta") else 0
    span = slice(0, 4) if decoder else slice(6, None)
    ids[1, span], mask[1, span] = pad_id, 0
    out = {"input_ids": ids, "attention_mask": mask}
    if decoder:  # a plain transformers decoder needs them passed; ours derives the same from the mask
        out["position_ids"] = positions_from_mask(mask, ids.shape[1])
    return out


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch).logits
    return out[batch["attention_mask"].bool()] if out.dim() == 3 else out


def task_type(family: str) -> str:
    return "CAUSAL_LM" if family in DECODERS else "SEQ_CLS"


def ia3_config(family: str) -> peft.IA3Config:
    if family in PEFT_IA3_DEFAULT:  # PEFT's own default targets for the family
        # GPT-2's Conv1D stores weights transposed: said here, PEFT does not warn that it corrects the flag.
        return peft.IA3Config(task_type=task_type(family), fan_in_fan_out=family == "gpt2")
    sites = spec_for(backbone(family)).ia3
    return peft.IA3Config(task_type=task_type(family), target_modules=list(sites.outputs + sites.inputs),
                          feedforward_modules=list(sites.inputs))


def shared(ours: torch.nn.Module, theirs: torch.nn.Module, tensors: dict[str, str]) -> None:
    """Random tensors in ours (each wrapped projection: ``attribute -> PEFT's attribute``) copied into PEFT's
    module of the same backbone name; PEFT's set of wrapped modules must be exactly ours."""
    g = torch.Generator().manual_seed(7)
    mine = {backbone_path(ours, n): m for n, m in ours.named_modules() if isinstance(m, (IA3Linear, LoRALinear))}
    kind = peft.tuners.ia3.IA3Layer if "ia3_l" in tensors else peft.tuners.lora.LoraLayer
    inner = theirs.base_model.model
    assert {n for n, m in inner.named_modules() if isinstance(m, kind)} == set(mine)
    with torch.no_grad():
        for name, module in mine.items():
            peft_module = inner.get_submodule(name)
            for attribute, peft_attribute in tensors.items():
                ours_t = module.get_parameter(attribute)
                ours_t.copy_(ours_t + 0.3 * torch.randn(ours_t.shape, generator=g))  # off its init (ones, zeros)
                container, _, leaf = peft_attribute.partition(".")
                target = getattr(peft_module, container)["default"]
                target = target if not leaf else getattr(target, leaf)
                target.copy_(ours_t.reshape(target.shape))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def assert_equal_to_rounding(got: torch.Tensor, want: torch.Tensor, scale: float = 1e-6) -> None:
    """Equal to float rounding of logits of this size (the std-1 heads make them 1-60)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=scale * max(1.0, float(want.detach().abs().max())))


@pytest.mark.parametrize("family", ALL)
def test_ia3_equals_peft_on_shared_weights(family):
    base = backbone(family)
    ours = apply_pelt(copy.deepcopy(base), PELTConfig.preset("ia3")).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), ia3_config(family)).eval()
    shared(ours, theirs, {"ia3_l": "ia3_l"})
    batch = inputs(family)
    with torch.no_grad():
        got, want, plain = logits(ours, batch), logits(theirs, batch), logits(base, batch)
    assert max_diff(want, plain) > 1e-3  # the vectors matter
    assert_equal_to_rounding(got, want)


LORA = dict(lora_r=4, lora_alpha=6)  # scales 1.5 and 3 (rsLoRA): not powers of two, so not exact by luck


def lora_config(family: str, **options: bool) -> peft.LoraConfig:
    names = spec_for(backbone(family)).projections
    return peft.LoraConfig(task_type=task_type(family), r=4, lora_alpha=6, lora_dropout=0.0,
                           target_modules=[names["query"], names["value"]], **options)


VARIANTS = {  # ours -> PEFT's LoraConfig options
    "dora": ({"lora_dora": True}, {"use_dora": True}),
    "rslora": ({"lora_rslora": True}, {"use_rslora": True}),
    "dora+rslora": ({"lora_dora": True, "lora_rslora": True}, {"use_dora": True, "use_rslora": True}),
}


@pytest.mark.parametrize("family", UNFUSED)
@pytest.mark.parametrize("variant", VARIANTS)
def test_dora_and_rslora_equal_peft_on_shared_weights_with_the_same_gradients(family, variant):
    ours_options, peft_options = VARIANTS[variant]
    base = backbone(family)
    ours = apply_pelt(copy.deepcopy(base), PELTConfig.preset("lora", **LORA, **ours_options)).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), lora_config(family, **peft_options)).eval()
    tensors = {"lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight"}
    if "dora" in variant:
        tensors["lora_magnitude"] = "lora_magnitude_vector.weight"
    shared(ours, theirs, tensors)
    batch = inputs(family)
    got, want = logits(ours, batch), logits(theirs, batch)
    with torch.no_grad():
        assert max_diff(want, logits(base, batch)) > 1e-3
    assert_equal_to_rounding(got, want)
    # the same gradients: DoRA's norm is a constant in both (no gradient through it)
    got.square().sum().backward()
    want.square().sum().backward()
    inner = theirs.base_model.model
    for name, module in ours.named_modules():
        if isinstance(module, LoRALinear):
            peft_module = inner.get_submodule(backbone_path(ours, name))
            pairs = [(module.lora_A.weight, peft_module.lora_A["default"].weight),
                     (module.lora_B.weight, peft_module.lora_B["default"].weight)]
            if module.dora:
                pairs.append((module.lora_magnitude, peft_module.lora_magnitude_vector["default"].weight))
            for mine, peft_param in pairs:  # to float rounding of the largest entry (a few sum near zero)
                torch.testing.assert_close(mine.grad, peft_param.grad, rtol=1e-4,
                                           atol=1e-5 * float(peft_param.grad.abs().max()))


def trained(family: str, preset: str, **overrides) -> torch.nn.Module:
    """Ours with random trained tensors (vectors off one, B off zero) and, gated, random gate banks."""
    model = apply_pelt(backbone(family), PELTConfig.preset(preset, **overrides))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and any(k in name for k in ("ia3_l", "lora_", "pelt_gates")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


EXPORTS = [(f, "ia3", {}) for f in ALL] + [(f, "dora", LORA) for f in UNFUSED] + \
          [(f, "lora", {**LORA, "lora_rslora": True}) for f in ("bert", "llama")]


@pytest.mark.parametrize("family,preset,overrides", EXPORTS, ids=[f"{f}-{p}" for f, p, _ in EXPORTS])
def test_to_peft_loads_in_peft_to_the_same_logits(tmp_path, family, preset, overrides):
    model = trained(family, preset, **overrides)
    path = unipelt.to_peft(model, tmp_path / "peft")
    written = json.loads((path / "adapter_config.json").read_text())
    assert written["peft_type"] == ("IA3" if preset == "ia3" else "LORA")
    assert written.get("use_dora", False) == (preset == "dora")
    assert written.get("use_rslora", False) == overrides.get("lora_rslora", False)
    loaded = peft.PeftModel.from_pretrained(backbone(family), path).eval()
    batch = inputs(family)
    with torch.no_grad():
        assert_equal_to_rounding(logits(loaded, batch), logits(model, batch))


@pytest.mark.parametrize("family,preset", [("bert", "ia3"), ("llama", "ia3"), ("bert", "dora"), ("llama", "dora"),
                                           ("gpt2", "ia3")])
def test_gated_exports_with_fixed_gates_equal_the_calibrated_merge(tmp_path, family, preset):
    """PEFT has no gates: a fixed gate folds into the tensors (IA3: 1 + g (l - 1); DoRA: B and the magnitude),
    which must give what merge gives with the same gates."""
    model = trained(family, preset, **{f"{'lora' if preset == 'dora' else preset}_gate": True})
    with pytest.raises(PELTError, match="PEFT has no gates"):
        unipelt.to_peft(model, tmp_path / "refused")
    gates = unipelt.calibrate_gates(model, [inputs(family)])
    assert all(0.05 < g < 0.95 for g in gates.values())  # neither end: 0 and 1 would hide the folding
    with pytest.warns(UserWarning, match="approximation"):
        path = unipelt.to_peft(model, tmp_path / "peft", gates=gates)
    loaded = peft.PeftModel.from_pretrained(backbone(family), path).eval()
    batch = inputs(family)
    with torch.no_grad():
        assert_equal_to_rounding(logits(loaded, batch), logits(unipelt.merge(model, gates), batch), scale=1e-5)


@pytest.mark.parametrize("preset,overrides,words", [
    ("parallel_adapter", {}, "cannot express 'parallel_adapter'"),
    ("unipelt_apli", {}, "cannot express 'adapter', 'prefix'"),
    ("ia3", {"lora": True}, "holds one method; this model has lora, ia3"),
    ("ia3", {"parallel_adapter": True}, "cannot express 'parallel_adapter'"),
])
def test_what_peft_cannot_express_is_refused_in_one_line(tmp_path, preset, overrides, words):
    model = apply_pelt(backbone("bert"), PELTConfig.preset(preset, **overrides))
    with pytest.raises(PELTError, match=words) as err:
        unipelt.to_peft(model, tmp_path / "peft")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "peft").exists()


def test_dora_on_a_fused_projection_is_refused_by_to_peft(tmp_path):
    with pytest.raises(PELTError, match=r"slices of a fused projection \(transformer.h.0.attn.c_attn\)"):
        unipelt.to_peft(trained("gpt2", "dora", **LORA), tmp_path / "peft")


def test_a_classifier_decoder_exports_ia3_too(tmp_path):
    torch.manual_seed(0)
    model = apply_pelt(AutoModelForSequenceClassification.from_config(decoder_config("llama", num_labels=3)),
                       PELTConfig.preset("ia3"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IA3Linear):
                m.ia3_l.add_(0.3)
    path = unipelt.to_peft(model.eval(), tmp_path / "peft")
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(decoder_config("llama", num_labels=3))
    loaded = peft.PeftModel.from_pretrained(base, path).eval()
    batch = inputs("llama")
    with torch.no_grad():
        assert_equal_to_rounding(logits(loaded, batch), logits(model, batch))
