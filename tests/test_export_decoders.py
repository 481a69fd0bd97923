"""Export on decoders: merge folds LoRA (GPT-2's fused Conv1D included) into a plain transformers model, and
to_peft writes a causal-LM or classification adapter that PEFT loads to the same logits and generations."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import unipelt
from tests.test_decoders import FAMILIES, PAD, build, config, pad, rows
from unipelt import PELTError
from unipelt.context import positions_from_mask

UNFUSED = [f for f in FAMILIES if f != "gpt2"]  # GPT-2's q, k and v are one Conv1D (c_attn)


def logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, plain: bool = False) -> torch.Tensor:
    # A plain transformers decoder takes positions from the caller (generate() derives them from the mask);
    # a unipelt one derives them itself: pass them, so left padding shifts neither.
    extra = {"position_ids": positions_from_mask(mask, ids.shape[1])} if plain else {}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **extra).logits
    return out[mask.bool()] if out.dim() == 3 else out


def greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=PAD)
    return out[:, ids.shape[1]:].tolist()


def is_ours(model: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("unipelt") for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["lm", "cls"])
def test_merged_lora_is_a_plain_model_with_the_same_outputs(family: str, head: str) -> None:
    model = build(family, "lora", head=head)
    ids, mask = pad(rows(), "left")
    merged = unipelt.merge(model)
    assert not is_ours(merged) and type(merged) is type(model)
    torch.testing.assert_close(logits(merged, ids, mask, plain=True), logits(model, ids, mask), atol=2e-6, rtol=0)
    if head == "lm":
        assert greedy(merged, ids, mask) == greedy(model, ids, mask)


def test_merge_adds_gpt2_lora_to_the_query_and_value_columns_of_c_attn_only() -> None:
    model = build("gpt2", "lora")
    attn = model.transformer.h[0].attn.c_attn
    before = attn.base.weight.detach().clone()  # Conv1D: (in, 3 * hidden), columns q | k | v
    merged = unipelt.merge(model)
    after = merged.transformer.h[0].attn.c_attn.weight.detach()
    hidden = model.config.n_embd
    q, v = attn.lora_pair("query"), attn.lora_pair("value")
    want_q = before[:, :hidden] + attn.scaling * (q[1].weight @ q[0].weight).T.detach()
    want_v = before[:, 2 * hidden:] + attn.scaling * (v[1].weight @ v[0].weight).T.detach()
    torch.testing.assert_close(after[:, :hidden], want_q)
    torch.testing.assert_close(after[:, 2 * hidden:], want_v)
    assert torch.equal(after[:, hidden:2 * hidden], before[:, hidden:2 * hidden])  # keys untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_ungated_union_merges_lora_and_keeps_adapter_and_prefix_exactly(family: str) -> None:
    model = build(family, "unipelt_apl_nogate")
    ids, mask = pad(rows(seed=2), "left")
    merged = unipelt.merge(model, gates={})  # no gates to fix: LoRA folds, adapter and prefix stay as modules
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids, mask), logits(model, ids, mask), atol=2e-6, rtol=0)
    assert greedy(merged, ids, mask) == greedy(model, ids, mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_gated_merge_equals_the_model_with_its_gates_held_at_the_calibrated_values(family: str) -> None:
    model = build(family, "unipelt_apl")
    ids, mask = pad(rows(seed=3), "left")
    gates = unipelt.calibrate_gates(model, [{"input_ids": ids, "attention_mask": mask}])
    merged = unipelt.merge(model, gates=gates)
    logits(merged, ids, mask)
    held = unipelt.gate_values(merged)  # per example, each the same constant
    for key, value in gates.items():
        torch.testing.assert_close(held[key].double(), torch.full_like(held[key].double(), value), atol=1e-6,
                                   rtol=0)


def peft_base(family: str, head: str) -> torch.nn.Module:
    """The backbone `build` starts from (same seed, same random weights), without unipelt."""
    torch.manual_seed(0)
    if head == "lm":
        return AutoModelForCausalLM.from_config(config(family)).eval()
    return AutoModelForSequenceClassification.from_config(config(family, num_labels=3)).eval()


@pytest.mark.parametrize("family", UNFUSED)
@pytest.mark.parametrize("head", ["lm", "cls"])
def test_lora_round_trips_through_peft(tmp_path, family: str, head: str) -> None:
    peft = pytest.importorskip("peft")
    model = build(family, "lora", head=head)
    path = unipelt.to_peft(model, tmp_path / "peft")
    written = json.loads((path / "adapter_config.json").read_text())
    assert written["task_type"] == ("CAUSAL_LM" if head == "lm" else "SEQ_CLS")
    assert written["target_modules"] == ["q_proj", "v_proj"]
    assert written["modules_to_save"] == ([] if head == "lm" else ["score"])  # the frozen lm_head stays out
    loaded = peft.PeftModel.from_pretrained(peft_base(family, head), path).eval()
    ids, mask = pad(rows(seed=4), "left")
    torch.testing.assert_close(logits(loaded, ids, mask, plain=True), logits(model, ids, mask), atol=2e-6, rtol=0)
    if head == "lm":
        assert greedy(loaded, ids, mask) == greedy(model, ids, mask)


def test_gpt2_fused_lora_to_peft_is_refused_with_the_way_out(tmp_path) -> None:
    with pytest.raises(PELTError, match=r"slices of a fused projection.*c_attn.*merge"):
        unipelt.to_peft(build("gpt2", "lora"), tmp_path / "peft")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_pretrained_rebuilds_the_causal_lm_from_its_record(tmp_path, family: str) -> None:
    base_dir = tmp_path / "backbone"
    peft_base(family, "lm").save_pretrained(base_dir)
    model = build(family, "unipelt_apl")  # same random backbone as peft_base, trained submodules
    out = unipelt.save_pretrained(model, tmp_path / "export", base_model_name_or_path=str(base_dir))
    loaded = unipelt.from_pretrained(out)  # the recorded backbone and class: no model given
    assert type(loaded) is type(model)
    ids, mask = pad(rows(seed=5), "left")
    torch.testing.assert_close(logits(loaded, ids, mask), logits(model, ids, mask), atol=0, rtol=0)
    assert greedy(loaded, ids, mask) == greedy(model, ids, mask)
    classifier = peft_base(family, "cls")
    with pytest.raises(PELTError, match="model class differs"):
        unipelt.from_pretrained(out, model=classifier)
