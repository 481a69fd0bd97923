"""The benchmarks' reference models are what their tables call them."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

from tests.test_core_model import FAMILIES, batch, tiny


@functools.cache
def _step_time():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
    spec = importlib.util.spec_from_file_location("step_time", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", FAMILIES)
def test_the_floor_trains_the_head_only_and_backpropagates_through_every_layer(family):
    """The "(frozen backbone)" row: no backbone weight trains, yet the backward reaches the
    embeddings' output (so it runs through every layer), and its loss is the backbone's."""
    backbone = tiny(family)
    floor = _step_time().frozen_backbone(backbone).train()
    base = {id(p) for p in floor.base_model.parameters()}
    assert not any(p.requires_grad for p in floor.parameters() if id(p) in base)
    assert all(p.requires_grad for p in floor.parameters() if id(p) not in base)

    outputs = []
    floor.get_input_embeddings().register_forward_hook(lambda _m, _a, out: outputs.append(out))
    inputs, labels = batch(family, [6, 4]), torch.tensor([0, 2])
    loss = floor(**inputs, labels=labels).loss
    loss.backward()
    assert outputs[0].grad is not None and outputs[0].grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(loss, backbone.train()(**inputs, labels=labels).loss)


@pytest.mark.parametrize("preset,plain", [("ia3", True), ("dora", True), ("parallel_adapter", False),
                                          ("unipelt_all", False)])
def test_the_merged_rows_time_the_merge_that_unipelt_gives(preset, plain):
    """`--merged`: a plain transformers model where everything folds, else fixed gates; same logits where the
    gates are what it was calibrated on (one example)."""
    from unipelt import PELTConfig, apply_pelt

    model = apply_pelt(tiny("bert"), PELTConfig.preset(preset)).eval()
    one = batch("bert", [6])
    merged = _step_time().merged(model, one)
    assert hasattr(merged, "pelt_config") != plain
    with torch.no_grad():
        torch.testing.assert_close(merged(**one).logits, model(**one).logits, rtol=1e-5, atol=1e-6)
