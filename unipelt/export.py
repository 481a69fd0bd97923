"""Leave unipelt: merge LoRA into the frozen weights, fix gates at calibrated values, export to PEFT.

* `merge(model)` folds ungated LoRA (``W + alpha/r * B A``) and returns a plain transformers model of
  the backbone's own class: no unipelt module, hook or attention function; BitFit and the trained
  head are already plain weights. Same logits to float rounding.
* A gate depends on each input, so a gated model cannot be merged exactly. `calibrate_gates(model,
  batches)` measures each gate's mean over a calibration set; `merge(model, gates=...)` fixes every
  gate at its value: LoRA merges with the fixed gate as its scale; adapter and prefix (not linear in
  any weight) stay as modules with constant gates. An approximation of the gated model: how close it
  is depends on how much the gates vary between inputs (docs/export.md).
* `to_peft(model, path)` writes what PEFT's LoRA can express (``adapter_config.json`` +
  ``adapter_model.safetensors``, the trained head as ``modules_to_save``), loadable with
  ``peft.PeftModel.from_pretrained(base, path)`` without unipelt installed.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import PELTConfig, PELTError
from .gates import ConstantGate, Gate
from .inject import gate_values
from .lora import LoRALinear
from .prefix import IMPL_PREFIX


def calibrate_gates(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Each gate's mean over every example of ``batches`` (HF keyword dicts, e.g. a DataLoader), in eval mode."""
    _config_of(model)
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "label", "idx")}
                model(**inputs)
                values = gate_values(model)
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + float(value.double().sum())
                count += next(iter(inputs.values())).shape[0]
    finally:
        model.train(was_training)
    if not sums:
        raise PELTError("calibrate_gates: this model has no gates (or the batches were empty)")
    return {key: total / count for key, total in sorted(sums.items())}


def merge(model: nn.Module, gates: Mapping[str, float] | None = None) -> nn.Module:
    """A copy of ``model`` with LoRA folded into the frozen weights (``model`` is not changed).

    Without ``gates``: ungated LoRA, BitFit and fine-tuning only; returns a plain transformers model.
    With ``gates`` (every gate's fixed value, e.g. from `calibrate_gates`): LoRA merges with its
    fixed gate as scale; adapter and prefix stay, with constant gates (a unipelt model then).
    """
    config = _config_of(model)
    model_gates = _gates(model)
    if gates is None:
        blocked = [name for name, on in (("adapter", config.adapter), ("prefix", config.prefix)) if on]
        if blocked:
            raise PELTError(
                f"merge: {' and '.join(blocked)} cannot be folded into plain weights (not linear in any weight); "
                "pass gates=unipelt.calibrate_gates(model, batches) to keep them as modules with fixed gates "
                "and merge the rest")
        if model_gates:
            raise PELTError(
                f"merge: the model is gated ({_kinds(model_gates)}): each input scales its submodules differently, "
                "so no single weight equals it; pass gates=unipelt.calibrate_gates(model, batches) to fix them")
    fixed = _check_gates(model_gates, gates or {})
    if not (config.adapter or config.prefix):
        return _plain_model(model, fixed)
    merged = copy.deepcopy(model)
    for parent, child, lora in _lora_modules(merged):
        setattr(parent, child, _merged_linear(lora, fixed))
    for parent, child, gate in _gate_slots(merged):
        setattr(parent, child, ConstantGate(fixed[gate.key], gate.key))
    return merged


def to_peft(model: nn.Module, path: str | os.PathLike, gates: Mapping[str, float] | None = None,
            base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA adapter folder for ``model`` (LoRA + trained head only).

    Gated LoRA needs ``gates`` (fixed values, e.g. from `calibrate_gates`); each fixed gate is folded
    into its ``lora_B``, so PEFT's constant ``lora_alpha / r`` gives the fixed scale: an approximation
    of the gated model, which the folder's README states.
    """
    config = _config_of(model)
    cannot = [name for name, on in (("fine-tuning", config.finetune), ("BitFit's biases", config.bitfit),
                                    ("the adapter", config.adapter), ("the prefix", config.prefix)) if on]
    if cannot or not config.lora:
        what = ", ".join(cannot) if cannot else "a model without LoRA"
        raise PELTError(f"to_peft: PEFT's LoRA cannot express {what}; only LoRA (with the trained head) exports "
                        "to PEFT (use unipelt.save_pretrained, or merge for a plain model)")
    model_gates = _gates(model)
    if model_gates and gates is None:
        raise PELTError(
            f"to_peft: PEFT's LoRA has a constant scale, this model's LoRA is gated ({_kinds(model_gates)}); "
            "pass gates=unipelt.calibrate_gates(model, batches) to export it with the gates fixed (an approximation)")
    fixed = _check_gates(model_gates, gates or {})
    prefix = "base_model.model."
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, lora in _named_lora(model):
        targets.add(name.rsplit(".", 1)[-1])
        up = lora.lora_B.weight.detach()
        if lora.gate is not None:  # PEFT scales by lora_alpha / r: fold gate / (alpha / r) into B
            up = up * (fixed[lora.gate.key] / lora.scaling)
        tensors[f"{prefix}{name}.lora_A.weight"] = lora.lora_A.weight.detach()
        tensors[f"{prefix}{name}.lora_B.weight"] = up
    head = _head_names(model)
    for module_name in head:
        for name, p in model.get_submodule(module_name).named_parameters():
            tensors[f"{prefix}{module_name}.{name}"] = p.detach()
    base_name = base_model_name_or_path if base_model_name_or_path is not None else model.config._name_or_path
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_name or None,
        "r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(targets),
        "modules_to_save": head,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to("cpu").contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors",
              metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    note = (f"The gated LoRA of this `{config.name}` model is exported with every gate fixed at the value given "
            "(e.g. its mean over a calibration set): an approximation of the gated model, whose gates vary "
            "with each input.") if model_gates else "Exact: the same logits as the unipelt model, to float rounding."
    if model_gates:
        warnings.warn(f"to_peft: {note}", stacklevel=2)
    (path / "README.md").write_text(
        f"---\nbase_model: {base_name}\nlibrary_name: peft\ntags:\n- unipelt\n- lora\n---\n\n"
        f"# LoRA exported from unipelt (`{config.name}`)\n\n{note}\n\n```python\nfrom peft import PeftModel\n"
        f"model = PeftModel.from_pretrained(base, \"{path.name}\")  # base: the sequence-classification backbone\n"
        "```\n")
    return path


# ----------------------------------------------------------------------------- helpers
def _config_of(model: nn.Module) -> PELTConfig:
    cfg = getattr(model, "pelt_config", None)
    if cfg is None:
        raise PELTError("this model has no PELT config; call apply_pelt(model, config) first")
    return cfg


def _gates(model: nn.Module) -> dict[str, Gate]:
    return {m.key: m for m in model.modules() if isinstance(m, Gate)}


def _kinds(gates: Mapping[str, Gate]) -> str:
    return ", ".join(sorted({key.split(".", 1)[-1].split("_")[0] for key in gates})) + " gates"


def _check_gates(model_gates: Mapping[str, Gate], gates: Mapping[str, float]) -> dict[str, float]:
    missing = sorted(set(model_gates) - set(gates))
    unknown = sorted(set(gates) - set(model_gates))
    if missing or unknown:
        raise PELTError(f"gates must give exactly this model's gates: missing {missing[:3]}"
                        f"{' ...' if len(missing) > 3 else ''}, unknown {unknown[:3]}")
    bad = {k: v for k, v in gates.items() if not isinstance(v, (int, float)) or not 0 <= float(v) <= 1}
    if bad:
        key = next(iter(bad))
        raise PELTError(f"gate {key} = {bad[key]!r}: a gate is a number in [0, 1]")
    return {k: float(v) for k, v in gates.items()}


def _named_lora(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _lora_modules(model: nn.Module) -> list[tuple[nn.Module, str, LoRALinear]]:
    out = []
    for name, lora in _named_lora(model):
        parent, _, child = name.rpartition(".")
        out.append((model.get_submodule(parent), child, lora))
    return out


def _gate_slots(model: nn.Module) -> list[tuple[nn.Module, str, Gate]]:
    return [(parent, child, m) for parent in model.modules() for child, m in parent.named_children()
            if isinstance(m, Gate)]


def _delta(lora: LoRALinear, fixed: Mapping[str, float]) -> torch.Tensor:
    scale = fixed[lora.gate.key] if lora.gate is not None else lora.scaling
    return scale * (lora.lora_B.weight.float() @ lora.lora_A.weight.float())


def _merged_linear(lora: LoRALinear, fixed: Mapping[str, float]) -> nn.Linear:
    base = lora.base
    with torch.no_grad():
        base.weight.copy_((base.weight.float() + _delta(lora, fixed)).to(base.weight.dtype))
    return base


def _head_names(model: nn.Module) -> list[str]:
    """The trained head: the model's children outside the base model that have parameters."""
    return [name for name, child in model.named_children()
            if child is not model.base_model and any(True for _ in child.parameters())]


def _plain_model(model: nn.Module, fixed: Mapping[str, float]) -> nn.Module:
    """The backbone's own class, built from its config, holding the merged weights."""
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(model.config)
    impl = config._attn_implementation or "eager"
    config._attn_implementation_internal = impl.removeprefix(IMPL_PREFIX)
    state = {}
    loras = dict(_named_lora(model))
    for key, value in model.state_dict().items():
        owner = next((name for name in loras if key.startswith(name + ".")), None)
        if owner is None:
            state[key] = value
            continue
        rest = key[len(owner) + 1:]
        if rest == "base.weight":
            state[f"{owner}.weight"] = (value.float() + _delta(loras[owner], fixed)).to(value.dtype)
        elif rest.startswith("base."):
            state[f"{owner}.{rest[5:]}"] = value
    ref = next(model.parameters())
    with no_init_weights():  # every weight comes from the state dict below (strict)
        plain = type(model)(config)
    plain.to(device=ref.device, dtype=ref.dtype)
    plain.load_state_dict(state, strict=True)
    return plain.train(model.training)
