"""LoRA's per-target views: ``delta_weight`` merged into the frozen weight gives the LoRA forward."""

from __future__ import annotations

import copy

import pytest
import torch

from unipelt.tuners.lora import FusedLoRALinear, LoRALinear

try:  # works whether or not tests/ is a package
    from .test_core_model import batch, pelt
except ImportError:
    from test_core_model import batch, pelt


def lora_modules(model: torch.nn.Module) -> list[LoRALinear | FusedLoRALinear]:
    return [m for m in model.modules() if isinstance(m, (LoRALinear, FusedLoRALinear))]


@pytest.mark.parametrize("family", ["bert", "distilbert", "deberta-v2", "modernbert"])
@pytest.mark.parametrize("targets", ["query,value", "query,key,value", "key"])
def test_merged_delta_weights_equal_the_lora_forward(family, targets):
    model = pelt(family, "lora", lora_targets=targets).eval()
    modules = lora_modules(model)
    wanted = targets.split(",")
    assert sorted(t for m in modules for t in m.targets) == sorted(wanted * model.config.num_hidden_layers)
    fused = [m for m in modules if isinstance(m, FusedLoRALinear)]
    assert bool(fused) == (family == "modernbert")
    with torch.no_grad():
        for m in modules:
            for t in m.targets:
                torch.nn.init.normal_(m.lora_pair(t)[1].weight, std=0.5)  # B leaves zero
    inputs = batch(family, [6, 4])
    plain = copy.deepcopy(model)
    for m in lora_modules(plain):
        for t in m.targets:
            m.lora_pair(t)[1].weight.data.zero_()
    merged = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(**inputs).logits
        for m in lora_modules(merged):
            for t in m.targets:
                m.base.weight[m.output_slice(t)] += m.delta_weight(t)
                m.lora_pair(t)[1].weight.zero_()
        got = merged(**inputs).logits
        assert not torch.allclose(plain(**inputs).logits, expected)  # the update matters
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fused_lora_slices_are_q_k_v_blocks():
    model = pelt("modernbert", "lora", lora_targets="query,key,value")
    m = lora_modules(model)[0]
    hidden = model.config.hidden_size
    assert [m.output_slice(t) for t in ("query", "key", "value")] == [
        slice(0, hidden), slice(hidden, 2 * hidden), slice(2 * hidden, 3 * hidden)]
    assert m.delta_weight("key").shape == (hidden, hidden)
    with pytest.raises(ValueError, match="no LoRA on 'dense'"):
        m.delta_weight("dense")
