"""to_peft: what PEFT's LoRA can express loads with peft.PeftModel.from_pretrained and gives our logits."""

from __future__ import annotations

import json

import pytest
import torch

import unipelt
from unipelt import PELTConfig, PELTError, apply_pelt, spec_for

peft = pytest.importorskip("peft")

from tests.test_core_model import FAMILIES, tiny  # noqa: E402  every supported family, tiny and random

PAD = {"roberta": 1}
UNFUSED = [f for f in FAMILIES if f != "modernbert"]  # ModernBERT's q/k/v are one fused Linear


def batch(family: str, n: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (n, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = PAD.get(family, 0), 0
    return {"input_ids": ids, "attention_mask": mask}


def backbone(family: str) -> torch.nn.Module:
    return tiny(family, attn="eager" if family == "deberta-v2" else "sdpa")


def trained(family: str, config: PELTConfig) -> torch.nn.Module:
    model = backbone(family)
    torch.manual_seed(3)
    apply_pelt(model, config).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for step in range(4):
        loss = model(**batch(family, 4, seed=10 + step), labels=torch.tensor([0, 1, 2, 0])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", UNFUSED)
@pytest.mark.parametrize("targets", ["query,value", "query,key,value"])
def test_lora_round_trips_through_peft(tmp_path, family, targets):
    model = trained(family, PELTConfig.preset("lora", lora_targets=targets, lora_r=4, lora_alpha=8))
    inputs = batch(family)
    ours = logits(model, inputs)
    path = unipelt.to_peft(model, tmp_path / "peft")
    config = json.loads((path / "adapter_config.json").read_text())
    projections = {t: n for t, n in spec_for(model).projections.items()}  # query -> q_lin in DistilBERT
    assert config["target_modules"] == sorted(projections[t] for t in targets.split(","))
    assert "classifier" in config["modules_to_save"] and (config["r"], config["lora_alpha"]) == (4, 8)

    base = backbone(family)  # the same pretrained backbone, without unipelt
    assert not torch.allclose(logits(base.eval(), inputs), ours, atol=1e-3)
    loaded = peft.PeftModel.from_pretrained(base, path).eval()
    torch.testing.assert_close(logits(loaded, inputs), ours, rtol=1e-5, atol=1e-6)


def test_gated_lora_exports_only_with_fixed_gates_as_the_merge_does(tmp_path):
    model = trained("bert", PELTConfig.preset("lora", lora_gate=True))
    with pytest.raises(PELTError, match=r"to_peft: PEFT has no gates.*lora gates.*calibrate_gates"):
        unipelt.to_peft(model, tmp_path / "peft")
    gates = unipelt.calibrate_gates(model, [batch("bert", 6, seed=5)])
    with pytest.warns(UserWarning, match="approximation"):
        path = unipelt.to_peft(model, tmp_path / "peft", gates=gates)
    assert "approximation" in (path / "README.md").read_text()
    loaded = peft.PeftModel.from_pretrained(backbone("bert"), path).eval()
    inputs = batch("bert")
    torch.testing.assert_close(logits(loaded, inputs), logits(unipelt.merge(model, gates), inputs),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset,words", [
    ("unipelt_apl", "cannot express 'adapter', 'prefix'"),
    ("adapter", "cannot express 'adapter'"),
    ("bitfit", "cannot express 'bitfit'"),
    ("finetune", "cannot express fine-tuning"),
])
def test_what_peft_cannot_express_is_named(tmp_path, preset, words):
    model = apply_pelt(backbone("bert"), PELTConfig.preset(preset))
    with pytest.raises(PELTError, match=words):
        unipelt.to_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_lora_on_a_fused_projection_is_refused_naming_it(tmp_path):
    model = apply_pelt(backbone("modernbert"), PELTConfig.preset("lora"))
    with pytest.raises(PELTError, match=r"slices of a fused projection \(model.layers.0.attn.Wqkv\)"):
        unipelt.to_peft(model, tmp_path / "peft")
