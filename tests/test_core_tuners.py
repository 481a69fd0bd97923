"""A new submodule is one file and one registry line: docs/method.md's Shift example, run as written.

What a tuner does not declare (merge, PEFT) is refused in one line naming it, never dropped; a
variant that declares a merge is carried exactly.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import unipelt
from unipelt import PELTConfig, PELTError, apply_pelt, gate_values, load_pelt_state_dict, pelt_state_dict
from unipelt.tuners import TUNERS
from unipelt.tuners.base import Merge

try:  # works whether or not tests/ is a package
    from .test_core_model import batch, tiny, train_steps
except ImportError:
    from test_core_model import batch, tiny, train_steps

DOC = Path(__file__).parents[1] / "docs" / "method.md"


@pytest.fixture
def shift(monkeypatch, tmp_path):
    """docs/method.md's ``unipelt/tuners/shift.py``, exactly as written, with its registry line."""
    code = re.search(r"```python\n(# unipelt/tuners/shift.py\n.*?)```", DOC.read_text(), re.S).group(1)
    (tmp_path / "shift.py").write_text(code)
    spec = importlib.util.spec_from_file_location("shift_example", tmp_path / "shift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(TUNERS, "shift", module.ShiftConfig)  # the registry line
    return module


def model_with(family: str, cfg: PELTConfig, steps: int = 2) -> torch.nn.Module:
    model = apply_pelt(tiny(family, attn="eager" if family == "deberta-v2" else "sdpa"), cfg)
    train_steps(model, family, steps=steps)  # shift vectors and LoRA B away from zero
    return model.eval()


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_the_documented_new_submodule_is_one_file_and_one_registry_line(shift):
    """Registered, configured, trained, gated, saved: nothing else in unipelt changes."""
    cfg = PELTConfig.preset("unipelt_apl", shift=True, shift_gate=True)
    assert cfg.shift.gate and PELTConfig.from_dict(cfg.to_dict()) == cfg
    for family in ("bert", "deberta-v2"):
        model = model_with(family, cfg)
        vectors = [p for n, p in model.named_parameters() if n.endswith("shift.vector")]
        assert len(vectors) == model.config.num_hidden_layers and all(v.abs().sum() > 0 for v in vectors)
        inputs = batch(family, [5, 3])
        expected = logits(model, inputs)
        assert "layer0.shift" in gate_values(model)
        fresh = apply_pelt(tiny(family, attn="eager" if family == "deberta-v2" else "sdpa"), cfg)
        load_pelt_state_dict(fresh, pelt_state_dict(model))
        assert torch.equal(logits(fresh.eval(), inputs), expected)
        assert unipelt.count_trainable(model) == unipelt.count_trainable(fresh)


@pytest.mark.parametrize("gated", [False, True])
def test_merge_refuses_a_submodule_that_declares_no_merge_in_one_line(shift, gated):
    cfg = PELTConfig.preset("lora", shift=True, shift_gate=gated, lora_gate=gated)
    model = model_with("bert", cfg)
    gates = unipelt.calibrate_gates(model, [batch("bert", [5, 3])]) if gated else None
    with pytest.raises(PELTError) as err:
        unipelt.merge(model, gates)
    assert str(err.value) == "'shift' cannot be merged into the backbone (it declares no merge)"


def test_to_peft_refuses_a_submodule_that_declares_no_peft_mapping_in_one_line(shift, tmp_path):
    model = model_with("bert", PELTConfig.preset("lora", shift=True))
    with pytest.raises(PELTError, match=r"^to_peft: PEFT cannot express 'shift'; [^\n]*$"):
        unipelt.to_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_a_shift_that_declares_it_stays_a_module_is_carried_exactly(shift, monkeypatch, family):
    @dataclass(frozen=True)
    class KeptShift(shift.ShiftConfig):
        merge: ClassVar[Merge] = Merge.KEEP

    monkeypatch.setitem(TUNERS, "shift", KeptShift)
    inputs = batch(family, [5, 3])
    model = model_with(family, PELTConfig.preset("lora", shift=True))  # ungated: exact for every input
    without_shift = copy_without(model, "shift")
    assert not torch.allclose(logits(without_shift, inputs), logits(model, inputs), atol=1e-3)  # shift matters
    merged = unipelt.merge(model, {})
    assert sum(n.endswith("shift.vector") for n, _ in merged.named_parameters()) == model.config.num_hidden_layers
    torch.testing.assert_close(logits(merged, inputs), logits(model, inputs), rtol=1e-5, atol=1e-6)

    gated = model_with(family, PELTConfig.preset("lora", shift=True, shift_gate=True, lora_gate=True))
    one = {k: v[1:2] for k, v in inputs.items()}  # gates fixed at their values on this example: exact there
    merged = unipelt.merge(gated, unipelt.calibrate_gates(gated, [one]))
    torch.testing.assert_close(logits(merged, one), logits(gated, one), rtol=1e-5, atol=1e-6)


def copy_without(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """A copy whose ``name`` vectors are zero: the model as if the submodule were dropped."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            if n.endswith(f"{name}.vector"):
                p.zero_()
    return out
