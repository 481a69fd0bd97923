"""unipelt.slim: drop the gated parts whose mean gate is below min_gate, fix the other gates as constants, fold
what folds; the result equals the gated model with its gates held (kept) or at 0 (removed), runs fewer ops,
and save_pretrained / from_pretrained rebuild it exactly."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import unipelt
from tests.test_core_model import FAMILIES
from tests.test_core_tuners import shift  # noqa: F401  (the fixture: docs/method.md's Shift, registered)
from tests.test_space_tuners import forced, inputs, model_of, nudged, out
from unipelt import PELTConfig, PELTError, apply_pelt
from unipelt.gates import GateBank
from unipelt.slim import SlimReport
from unipelt.tuners.adapter import Adapter
from unipelt.tuners.ia3 import IA3Linear
from unipelt.tuners.lora import FusedLoRALinear, LoRALinear
from unipelt.tuners.parallel_adapter import ParallelAdapter

ALL = (*FAMILIES, "llama", "gpt2")
# every gated submodule but the prefix: removing a part is then the same as its gate at 0 (a prefix at gate 0
# still takes softmax weight with its zero keys; removed, it takes none)
NO_PREFIX = dict(adapter_gate=True, lora=True, lora_gate=True, lora_dora=True, ia3=True, ia3_gate=True,
                 parallel_adapter=True, parallel_adapter_gate=True)
TUNER_MODULES = (GateBank, LoRALinear, FusedLoRALinear, IA3Linear, Adapter, ParallelAdapter)


def gated(family: str, preset: str = "adapter", **overrides) -> torch.nn.Module:
    return nudged(apply_pelt(model_of(family), PELTConfig.preset(preset, **overrides)))


def calibration(family: str) -> list[dict[str, torch.Tensor]]:
    return [inputs(family)]


def count_ops(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(**batch)
    return Count.calls


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("preset", ["unipelt_all", "unipelt_apl"])
def test_keeping_every_part_equals_the_calibrated_merge_with_fewer_ops(family, preset):
    """min_gate 0 keeps everything: the gates fixed at their means, as merge(model, calibrate_gates(...)) fixes
    them (a separate path: constant gate banks), with no gate bank left to run."""
    model = gated(family, preset)
    batches = calibration(family)
    slim = unipelt.slim(model, batches, min_gate=0.0)
    report = slim.pelt_slim_report
    assert report.kept == report.gates and len(report.gates) > 0
    merged = unipelt.merge(model, unipelt.calibrate_gates(model, batches))
    # Two float paths (weights folded in another order): 1.1e-5 apart at most on one thread (gpt2, unipelt_all)
    torch.testing.assert_close(out(slim, family), out(merged, family), rtol=1e-5, atol=3e-5)
    assert not any(isinstance(m, (GateBank, LoRALinear, FusedLoRALinear, IA3Linear)) for m in slim.modules())
    assert count_ops(slim, inputs(family)) < count_ops(merged, inputs(family)) < count_ops(model, inputs(family))


@pytest.mark.parametrize("family", ALL)
def test_a_removed_part_is_its_gate_at_zero_a_kept_one_its_gate_held(family, monkeypatch):
    model = gated(family, **NO_PREFIX)
    batches = calibration(family)
    gates = unipelt.calibrate_gates(model, batches)
    threshold = sorted(gates.values())[len(gates) // 2]  # about half of them go
    slim = unipelt.slim(model, batches, min_gate=threshold)
    kept = slim.pelt_slim_report.kept
    assert 0 < len(kept) < len(gates) and kept == {k: v for k, v in gates.items() if v >= threshold}
    assert slim.pelt_config.slim == kept
    got = out(slim, family)
    forced(monkeypatch, {k: kept.get(k, 0.0) for k in gates})
    torch.testing.assert_close(got, out(model, family), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ALL)
def test_removing_every_gated_part_gives_the_backbone(family):
    """min_gate 1: no gate reaches it; what is left is the backbone (and its head), prefix included, and
    the model runs no unipelt module and enters no per-forward context (decoders: for their positions)."""
    model = gated(family, "unipelt_all")
    slim = unipelt.slim(model, calibration(family), min_gate=1.0)
    assert slim.pelt_slim_report.kept == {}
    assert not any(isinstance(m, TUNER_MODULES) for m in slim.modules())
    torch.testing.assert_close(out(slim, family), out(model_of(family).eval(), family), rtol=1e-5, atol=1e-5)
    assert not any("pelt_prefix" in name for name, _ in slim.named_parameters())
    assert slim.base_model._pelt_context == (family in ("llama", "gpt2"))  # decoders: positions from the mask


@pytest.mark.parametrize("family,preset", [("bert", "unipelt_all"), ("deberta-v2", "unipelt_apl_dora"),
                                           ("modernbert", "unipelt_all"), ("llama", "unipelt_all"),
                                           ("gpt2", "unipelt_apli")])
def test_save_pretrained_and_from_pretrained_rebuild_the_slimmed_model_exactly(tmp_path, family, preset):
    model = gated(family, preset)
    gates = unipelt.calibrate_gates(model, calibration(family))
    slim = unipelt.slim(model, calibration(family), min_gate=sorted(gates.values())[len(gates) // 3])
    path = unipelt.save_pretrained(slim, tmp_path / "slim", base_model_name_or_path="unused")
    loaded = unipelt.from_pretrained(path, model=model_of(family))
    assert loaded.pelt_config == slim.pelt_config and loaded.pelt_config.slim
    assert torch.equal(out(loaded, family), out(slim, family))
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in slim.modules()]
    # what it saved: the kept parts' tensors before their folds, none of a removed part's, no gate bank
    saved = unipelt.pelt_state_dict(loaded)["weights"]
    assert not any("pelt_gates" in name for name in saved)
    assert sum(t.numel() for t in saved.values()) < sum(t.numel() for t in unipelt.pelt_state_dict(model)["weights"]
                                                        .values())
    again = unipelt.save_pretrained(loaded, tmp_path / "again", base_model_name_or_path="unused")
    assert torch.equal(out(unipelt.from_pretrained(again, model=model_of(family)), family), out(slim, family))
    still = [p for n, p in loaded.named_parameters() if n in saved]  # kept as modules: the prefix, adapters
    with torch.no_grad():  # trained after slim: the saved form would rebuild the model it was, so refused
        still[0].add_(1)
    with pytest.raises(PELTError, match="changed since slim"):
        unipelt.save_pretrained(loaded, tmp_path / "stale", base_model_name_or_path="unused")


def test_the_report_is_what_it_says():
    model = gated("bert", "unipelt_all")
    batches = [inputs("bert"), {k: v[:1] for k, v in inputs("bert").items()}]
    slim = unipelt.slim(model, batches, min_gate=0.5)
    report = slim.pelt_slim_report
    assert isinstance(report, SlimReport) and report.examples == 3 and report.min_gate == 0.5
    full = torch.cat([out_of(model, b) for b in batches])
    small = torch.cat([out_of(slim, b) for b in batches])
    assert report.max_logit_diff == pytest.approx(float((full - small).abs().max()), abs=1e-6)
    assert report.max_prob_diff == pytest.approx(float((full.softmax(-1) - small.softmax(-1)).abs().max()), abs=1e-6)
    assert report.agreement == pytest.approx(float((full.argmax(-1) == small.argmax(-1)).float().mean()))
    assert report.folded == ("lora", "ia3")
    rows = report.rows()
    assert len(rows) == len(report.gates) and {r["as"] for r in rows} <= {"removed", "folded", "module"}
    assert all((r["as"] == "removed") == (r["mean_gate"] < 0.5) for r in rows)
    table = report.markdown()
    assert table.startswith("| layer | adapter | lora_query | lora_value | ia3 | parallel_adapter | prefix |")
    assert table.count("\n| 0 |") == 1 and "max |logit difference|" in table
    assert model.pelt_config.slim is None  # the model given is not changed


def out_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_what_cannot_be_slimmed_or_used_slimmed_is_refused_in_one_line(tmp_path):
    model = gated("bert", "unipelt_apl")
    slim = unipelt.slim(model, calibration("bert"), min_gate=0.3)
    cases = [
        (lambda: unipelt.slim(model, calibration("bert"), min_gate=1.5), "min_gate must be a number in"),
        (lambda: unipelt.slim(model, [], min_gate=0.1), "no calibration batches"),
        (lambda: unipelt.slim(slim, calibration("bert")), "slimmed"),
        (lambda: unipelt.merge(slim, {}), "slimmed"),
        (lambda: unipelt.to_peft(slim, tmp_path / "peft"), "slimmed"),
        (lambda: unipelt.calibrate_gates(slim, calibration("bert")), "slimmed"),
        (lambda: unipelt.slim(apply_pelt(model_of("bert"), PELTConfig.preset("finetune")), calibration("bert")),
         "no submodules"),
        (lambda: unipelt.slim(unipelt.merge(model, unipelt.calibrate_gates(model, calibration("bert"))),
                              calibration("bert")), "merged"),
        (lambda: apply_pelt(model_of("bert"), PELTConfig.preset("unipelt_apl", slim={"layer9.adapter": 0.5})),
         "slim names gates this model does not have"),
        (lambda: PELTConfig.preset("unipelt_apl", slim={"layer0.adapter": 2}), "slim must map gate names"),
    ]
    for call, words in cases:
        with pytest.raises(PELTError, match=words) as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.usefixtures("shift")
def test_a_gated_submodule_that_declares_no_settle_is_refused():
    """docs/method.md's Shift declares nothing: gated, slim refuses it by name; ungated, it stays as it is."""
    model = gated("bert", "lora", shift=True, shift_gate=True)
    with pytest.raises(PELTError, match=r"^'shift' cannot be slimmed \(it declares no settle\)$"):
        unipelt.slim(model, calibration("bert"))
    ungated = gated("bert", "lora", shift=True)
    with torch.no_grad():
        for name, p in ungated.named_parameters():
            if name.endswith("shift.vector"):
                p.add_(0.5)
    torch.testing.assert_close(out(unipelt.slim(ungated, calibration("bert")), "bert"), out(ungated, "bert"),
                               rtol=1e-5, atol=1e-5)
