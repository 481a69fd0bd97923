"""Leave unipelt: merge LoRA into the frozen weights, fix gates at calibrated values, export to PEFT.

* `merge(model)` folds ungated LoRA (``W + alpha/r * B A``) and returns a plain transformers model of
  the backbone's own class: no unipelt module, hook or attention function; BitFit and the trained
  head are already plain weights. Same logits to float rounding.
* A gate depends on each input, so a gated model cannot be merged exactly. `calibrate_gates(model,
  batches)` measures each gate's mean over a calibration set; `merge(model, gates=...)` fixes every
  gate at its value: LoRA merges with the fixed gate as its scale; adapter and prefix (not linear in
  any weight) stay as modules, their gates constant (each gate bank's weights zero, its bias the
  logit of the fixed value: ``sigmoid`` of it is the value for every token). An approximation of
  the gated model: how close it is depends on how much the gates vary between inputs (docs/export.md).
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
from .gates import GateBank, GateSlot
from .inject import gate_values
from .tuners.lora import FusedLoRALinear, LoRALinear, is_conv1d
from .tuners.prefix import IMPL_PREFIX

MERGED_ATTR = "pelt_merged"  # set on a merge that keeps unipelt modules: not saveable as unipelt's format
_WRAPPED = ("base", "inner")  # the child a unipelt wrapper keeps the original module in


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
                for key, value in gate_values(model).items():
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
    model_gates = _gate_keys(model)
    if gates is None:
        blocked = [name for name in ("adapter", "prefix") if name in config.submodules]
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
    merged = copy.deepcopy(model)
    for parent, child, lora in _children_of_type(merged, (LoRALinear, FusedLoRALinear)):
        setattr(parent, child, _merged_base(lora, fixed))
    for bank in (m for m in merged.modules() if isinstance(m, GateBank)):
        _fix_bank(bank, fixed)
    if "adapter" in config.submodules or "prefix" in config.submodules or config.head in ("mean", "cls_mlp"):
        setattr(merged, MERGED_ATTR, True)  # unipelt modules stay (a mean/cls_mlp head is one: heads.py)
        return merged
    return _plain_model(merged)


def to_peft(model: nn.Module, path: str | os.PathLike, gates: Mapping[str, float] | None = None,
            base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA adapter folder for ``model`` (LoRA + trained head only).

    Gated LoRA needs ``gates`` (fixed values, e.g. from `calibrate_gates`); each fixed gate is folded
    into its ``lora_B``, so PEFT's constant ``lora_alpha / r`` gives the fixed scale: an approximation
    of the gated model, which the folder's README states.
    """
    config = _config_of(model)
    subs = config.submodules
    cannot = [name for name, on in (("fine-tuning", config.finetune), ("BitFit's biases", "bitfit" in subs),
                                    ("the adapter", "adapter" in subs), ("the prefix", "prefix" in subs)) if on]
    if config.head != "pooler":  # a pelt head, or a trained pooler inside the backbone (not in modules_to_save)
        cannot.append(f"the {config.head!r} head")
    if cannot or "lora" not in subs:
        what = ", ".join(cannot) if cannot else "a model without LoRA"
        raise PELTError(f"to_peft: PEFT's LoRA cannot express {what}; only LoRA (with the trained head) exports "
                        "to PEFT (use unipelt.save_pretrained, or merge for a plain model)")
    fused = [name for name, m in model.named_modules() if isinstance(m, FusedLoRALinear)]
    if fused:
        raise PELTError(f"to_peft: PEFT's LoRA cannot express LoRA on slices of a fused projection ({fused[0]}); "
                        "use unipelt.save_pretrained, or merge for a plain model")
    model_gates = _gate_keys(model)
    if model_gates and gates is None:
        raise PELTError(
            f"to_peft: PEFT's LoRA has a constant scale, this model's LoRA is gated ({_kinds(model_gates)}); "
            "pass gates=unipelt.calibrate_gates(model, batches) to export it with the gates fixed (an approximation)")
    fixed = _check_gates(model_gates, gates or {})
    prefix = "base_model.model."
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, lora in model.named_modules():
        if not isinstance(lora, LoRALinear):
            continue
        plain = _plain_path(model, name)  # the projection's name in the backbone without unipelt
        targets.add(plain.rsplit(".", 1)[-1])
        down, up = lora.lora_pair(lora.target)
        b = up.weight.detach()
        if lora.gate is not None:  # PEFT scales by lora_alpha / r: fold gate / (alpha / r) into B
            b = b * (fixed[_slot_key(lora.gate)] / lora.scaling)
        tensors[f"{prefix}{plain}.lora_A.weight"] = down.weight.detach()
        tensors[f"{prefix}{plain}.lora_B.weight"] = b
    head = _head_names(model)
    for module_name in head:
        for name, p in model.get_submodule(module_name).named_parameters():
            tensors[f"{prefix}{module_name}.{name}"] = p.detach()
    base_name = base_model_name_or_path if base_model_name_or_path is not None else model.config._name_or_path
    adapter_config = {
        "peft_type": "LORA",
        "task_type": _peft_task_type(model),
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
        f"model = PeftModel.from_pretrained(base, \"{path.name}\")  # base: {type(model).__name__} of base_model\n"
        "```\n")
    return path


# ----------------------------------------------------------------------------- helpers
def _config_of(model: nn.Module) -> PELTConfig:
    cfg = getattr(model, "pelt_config", None)
    if cfg is None:
        raise PELTError("this model has no PELT config; call apply_pelt(model, config) first")
    if getattr(model, MERGED_ATTR, False):
        raise PELTError("this model is already merged; use the model it was merged from")
    return cfg


def _bank_keys(bank: GateBank) -> list[str]:
    return [f"layer{bank.layer}.{key}" for key in bank.keys]  # as gate_values() names them


def _gate_keys(model: nn.Module) -> list[str]:
    return [key for m in model.modules() if isinstance(m, GateBank) for key in _bank_keys(m)]


def _slot_key(slot: GateSlot) -> str:
    return _bank_keys(slot.bank)[slot.index]


def _kinds(keys: Iterable[str]) -> str:
    return ", ".join(sorted({key.split(".", 1)[-1].split("_")[0] for key in keys})) + " gates"


def _check_gates(model_gates: Iterable[str], gates: Mapping[str, float]) -> dict[str, float]:
    model_gates = set(model_gates)
    missing = sorted(model_gates - set(gates))
    unknown = sorted(set(gates) - model_gates)
    if missing or unknown:
        raise PELTError(f"gates must give exactly this model's gates: missing {missing[:3]}"
                        f"{' ...' if len(missing) > 3 else ''}, unknown {unknown[:3]}")
    bad = {k: v for k, v in gates.items() if isinstance(v, bool) or not isinstance(v, (int, float))
           or not 0 <= float(v) <= 1}
    if bad:
        key = next(iter(bad))
        raise PELTError(f"gate {key} = {bad[key]!r}: a gate is a number in [0, 1]")
    return {k: float(v) for k, v in gates.items()}


def _children_of_type(model: nn.Module, kinds: tuple[type, ...]) -> list[tuple[nn.Module, str, nn.Module]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, kinds)]


def _merged_base(lora: LoRALinear | FusedLoRALinear, fixed: Mapping[str, float]) -> nn.Module:
    """The wrapped projection with ``scale * B @ A`` added to each target's outputs (scale: alpha/r or the
    fixed gate): rows of a Linear's weight, columns of GPT-2's Conv1D (whose weight is (in, out))."""
    base = lora.base
    slots = lora.gates if isinstance(lora, FusedLoRALinear) else {lora.target: lora.gate}
    transposed = is_conv1d(base)
    with torch.no_grad():
        weight = base.weight.float()
        if transposed:
            weight = weight.T  # a view: adding to its rows adds to the Conv1D weight's columns
        for target in lora.targets:
            down, up = lora.lora_pair(target)
            slot = slots[target]
            scale = lora.scaling if slot is None else fixed[_slot_key(slot)]
            weight[lora.output_slice(target)] += scale * (up.weight.float() @ down.weight.float())
        base.weight.copy_((weight.T if transposed else weight).to(base.weight.dtype))
    return base


def _fix_bank(bank: GateBank, fixed: Mapping[str, float]) -> None:
    """Every gate of the bank at its fixed value: zero weights, bias logit(value)."""
    values = torch.tensor([fixed[k] for k in _bank_keys(bank)], dtype=torch.float64)
    with torch.no_grad():
        bank.proj.weight.zero_()
        bank.proj.bias.copy_(torch.logit(values).to(bank.proj.bias.dtype))


def _is_ours(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "unipelt"


def _plain_path(model: nn.Module, path: str) -> str:
    """``path`` without the segments of unipelt's wrappers (``...self.inner.query_proj`` -> ``...self.query_proj``)."""
    out, module = [], model
    for segment in path.split(".") if path else []:
        if not (_is_ours(module) and segment in _WRAPPED):
            out.append(segment)
        module = getattr(module, segment)
    return ".".join(out)


def _head_names(model: nn.Module) -> list[str]:
    """The trained head: the model's children outside the base model with trainable parameters (a
    decoder's frozen language-modelling head is the backbone's, not ours to ship)."""
    return [name for name, child in model.named_children()
            if child is not model.base_model and any(p.requires_grad for p in child.parameters())]


def _peft_task_type(model: nn.Module) -> str:
    """PEFT's task type, which picks the wrapper class `PeftModel.from_pretrained` builds."""
    from .io import is_causal_lm

    return "CAUSAL_LM" if is_causal_lm(type(model).__name__) else "SEQ_CLS"


def _plain_model(merged: nn.Module) -> nn.Module:
    """The backbone's own class, built from its config, holding ``merged``'s weights (LoRA already folded)."""
    from transformers.initialization import no_init_weights

    ours = [name for name, m in merged.named_modules() if name and _is_ours(m) and not _wraps(m)]
    state = {}
    for key, value in merged.state_dict().items():
        if not any(key.startswith(name + ".") for name in ours):  # gate banks: nothing of the backbone
            state[_plain_path(merged, key.rsplit(".", 1)[0]) + "." + key.rsplit(".", 1)[1]] = value
    config = copy.deepcopy(merged.config)
    config._attn_implementation_internal = (config._attn_implementation or "eager").removeprefix(IMPL_PREFIX)
    ref = next(merged.parameters())
    with no_init_weights():  # every weight comes from the state dict below (strict)
        plain = type(merged)(config)
    plain.to(device=ref.device, dtype=ref.dtype)
    plain.load_state_dict(state, strict=True)
    return plain.train(merged.training)


def _wraps(module: nn.Module) -> bool:
    """A unipelt wrapper (explicit attention) keeps the original module as a child: its keys are the backbone's."""
    return any(isinstance(getattr(module, name, None), nn.Module) and not _is_ours(getattr(module, name))
               for name in _WRAPPED)
