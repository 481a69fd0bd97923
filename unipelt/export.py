"""Leave unipelt: merge into the backbone, fix gates at calibrated values, export to PEFT.

Each submodule declares what can be done with it (``TunerConfig.merge``, ``peft_type``;
unipelt/tuners/base.py); this file asks, and names none of them.

* `merge(model)` folds every ``Merge.FOLD`` submodule into the frozen weights (LoRA: ``W + alpha/r * B A``;
  BitFit's biases and the trained head are plain weights already) and returns a plain transformers
  model of the backbone's own class: no unipelt module, hook or attention function. Same logits to
  float rounding. A submodule that declares no merge is refused in one line naming it.
* A gate depends on each input, so a gated model cannot be merged exactly. `calibrate_gates(model,
  batches)` measures each gate's mean over a calibration set; `merge(model, gates=...)` fixes every
  gate at its value: a folded submodule takes its fixed gate as its scale; ``Merge.KEEP`` submodules
  (adapter and prefix: not linear in any weight) stay as modules, their gates constant (each gate
  bank's weights zero, its bias the logit of the fixed value: ``sigmoid`` of it is the value for every
  token). An approximation of the gated model: how close it is depends on how much the gates vary
  between inputs (docs/export.md).
* `to_peft(model, path)` writes the submodule PEFT can express (``adapter_config.json`` +
  ``adapter_model.safetensors``, the trained head as ``modules_to_save``), loadable with
  ``peft.PeftModel.from_pretrained(base, path)`` without unipelt installed.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write, check_output, write_json, write_safetensors
from .backbones import spec_for
from .compat import is_causal_lm, no_init_weights
from .config import PELTConfig, PELTError
from .errors import one_line
from .gates import GateBank, gate_keys
from .heads import HEAD_ATTR
from .inject import MERGED_ATTR, config_of, gate_values
from .tuners import TUNERS
from .tuners.base import WRAPPED, Merge, backbone_path, is_ours


def calibrate_gates(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Each gate's mean over every example of ``batches`` (HF keyword dicts, e.g. a DataLoader), in eval mode."""
    one_task(model, "calibrate_gates")
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
    """A copy of ``model`` with what folds folded into the frozen weights (``model`` is not changed).

    Without ``gates``: only submodules that fold (LoRA, BitFit) and fine-tuning, ungated; returns a plain
    transformers model. With ``gates`` (every gate's fixed value, e.g. from `calibrate_gates`; ``{}`` when
    nothing is gated): folded submodules take their fixed gate as scale; those that stay as modules
    (adapter, prefix) keep constant gates (a unipelt model then, for inference).
    """
    config = unslimmed(model)
    subs = config.submodules
    cannot = [name for name, sub in subs.items() if sub.merge is Merge.NONE]
    if cannot:
        raise PELTError(f"{_names(cannot)} cannot be merged into the backbone "
                        f"({'it declares' if len(cannot) == 1 else 'they declare'} no merge)")
    kept = [name for name, sub in subs.items() if sub.merge is Merge.KEEP]
    model_gates = gate_keys(model)
    if gates is None:
        if kept:
            raise PELTError(
                f"merge: {_names(kept)} cannot be folded into plain weights (not linear in any weight); pass "
                "gates=unipelt.calibrate_gates(model, batches) (gates={} when ungated) to keep them as modules "
                "with fixed gates and merge the rest")
        if model_gates:
            raise PELTError(
                f"merge: the model is gated ({_kinds(model_gates)}): each input scales its submodules differently, "
                "so no single weight equals it; pass gates=unipelt.calibrate_gates(model, batches) to fix them")
    fixed = _check_gates(model_gates, gates or {})
    merged = copy.deepcopy(model)
    layers = len(spec_for(merged).layer_list(merged))
    for sub in subs.values():
        if sub.merge is Merge.FOLD:
            for layer in range(layers):
                sub.fold(merged, layer, fixed)
    for bank in (m for m in merged.modules() if isinstance(m, GateBank)):
        bank.hold(fixed)
    if kept or hasattr(merged, HEAD_ATTR):  # unipelt modules stay (a mean/cls_mlp head is one: heads.py)
        setattr(merged, MERGED_ATTR, True)
        return merged
    return _plain_model(merged)


def to_peft(model: nn.Module, path: str | os.PathLike, gates: Mapping[str, float] | None = None,
            base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT adapter folder for ``model`` (its one PEFT-expressible submodule + the trained head).

    A gated model needs ``gates`` (fixed values, e.g. from `calibrate_gates`); each submodule folds its
    fixed gates into its tensors (LoRA: into ``lora_B``, so PEFT's constant ``lora_alpha / r`` gives the
    fixed scale): an approximation of the gated model, which the folder's README states.
    """
    config = unslimmed(model)
    subs = config.submodules
    cannot = (["fine-tuning"] if config.finetune else []) + [f"{name!r}" for name, sub in subs.items()
                                                             if sub.peft_type is None]
    if config.head != "pooler":  # a pelt head, or a trained pooler inside the backbone (not in modules_to_save)
        cannot.append(f"the {config.head!r} head")
    if cannot or not subs:
        what = ", ".join(cannot) if cannot else "a model without submodules"
        raise PELTError(f"to_peft: PEFT cannot express {what}; use unipelt.save_pretrained, or merge for a "
                        "plain model")
    if len(subs) > 1:
        raise PELTError(f"to_peft: a PEFT adapter folder holds one method; this model has {', '.join(subs)} "
                        "(use unipelt.save_pretrained, or merge for a plain model)")
    (sub,) = subs.values()
    model_gates = gate_keys(model)
    if model_gates and gates is None:
        raise PELTError(
            f"to_peft: PEFT has no gates and this model is gated ({_kinds(model_gates)}); pass "
            "gates=unipelt.calibrate_gates(model, batches) to export it with the gates fixed (an approximation)")
    fixed = _check_gates(model_gates, gates or {})
    try:
        adapter = sub.peft(model, fixed)
    except PELTError as err:
        raise PELTError(f"to_peft: {one_line(err)}; use unipelt.save_pretrained, or merge for a plain model") from None
    prefix = "base_model.model."
    tensors = {prefix + name: t for name, t in adapter.tensors.items()}
    head = _head_names(model)
    for module_name in head:
        for name, p in model.get_submodule(module_name).named_parameters():
            tensors[f"{prefix}{module_name}.{name}"] = p.detach()
    base_name = base_model_name_or_path if base_model_name_or_path is not None else model.config.name_or_path
    adapter_config = {
        "peft_type": adapter.peft_type,
        "task_type": "CAUSAL_LM" if is_causal_lm(type(model).__name__) else "SEQ_CLS",
        "base_model_name_or_path": base_name or None,
        **adapter.config,
        "modules_to_save": head,
        "inference_mode": True,
    }
    path = check_output(path, folder=True)
    write_safetensors(path / "adapter_model.safetensors", tensors, {"format": "pt"})
    write_json(path / "adapter_config.json", adapter_config)
    note = (f"The gated submodules of this `{config.name}` model are exported with every gate fixed at the value "
            "given (e.g. its mean over a calibration set): an approximation of the gated model, whose gates vary "
            "with each input.") if model_gates else "Exact: the same logits as the unipelt model, to float rounding."
    if model_gates:
        warnings.warn(f"to_peft: {note}", stacklevel=2)
    kind = adapter.peft_type.lower()
    with atomic_write(path / "README.md") as f:
        f.write(f"---\nbase_model: {base_name}\nlibrary_name: peft\ntags:\n- unipelt\n- {kind}\n---\n\n"
                f"# {adapter.peft_type} adapter exported from unipelt (`{config.name}`)\n\n{note}\n\n```python\n"
                f"from peft import PeftModel\nmodel = PeftModel.from_pretrained(base, \"{path.name}\")  "
                f"# base: {type(model).__name__} of base_model\n```\n")
    return path


# ----------------------------------------------------------------------------- helpers
def unslimmed(model: nn.Module) -> PELTConfig:
    """The config of a model with its gates (not merged, not slimmed)."""
    config = config_of(model)
    if config.slim is not None:
        raise PELTError("this model is slimmed (for inference: its gates fixed or removed); use the model it was "
                        "slimmed from")
    return config


def one_task(model: nn.Module, what: str) -> PELTConfig:
    """The config of a model with its gates and one task: a multi-task model's batches carry no task, and its
    gates differ per task."""
    config = unslimmed(model)
    if config.tasks:
        raise PELTError(f"{what}: this model serves several tasks ({', '.join(config.tasks)}); take one task's "
                        "model first (unipelt.from_pretrained(folder, task=...))")
    return config


def _names(names: list[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def _kinds(keys: Iterable[str]) -> str:
    """The submodules these gates scale (``layer0.lora_query``: lora; ``layer0.parallel_adapter``: parallel_adapter)."""
    gate = (key.split(".", 1)[-1] for key in keys)
    return ", ".join(sorted({max((t for t in TUNERS if g == t or g.startswith(t + "_")), key=len, default=g)
                             for g in gate})) + " gates"


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


def _head_names(model: nn.Module) -> list[str]:
    """The trained head: the model's children outside the base model with trainable parameters (a
    decoder's frozen language-modelling head is the backbone's, not ours to ship)."""
    return [name for name, child in model.named_children()
            if child is not model.base_model and any(p.requires_grad for p in child.parameters())]


def _plain_model(merged: nn.Module) -> nn.Module:
    """The backbone's own class, built from its config, holding ``merged``'s weights (everything folded)."""
    ours = [name for name, m in merged.named_modules() if name and is_ours(m) and not _wraps(m)]
    state = {}
    for key, value in merged.state_dict().items():
        if not any(key.startswith(name + ".") for name in ours):  # gate banks: nothing of the backbone
            state[backbone_path(merged, key.rsplit(".", 1)[0]) + "." + key.rsplit(".", 1)[1]] = value
    ref = next(merged.parameters())
    with no_init_weights():  # every weight comes from the state dict below (strict)
        plain = type(merged)(copy.deepcopy(merged.config))
    plain.to(device=ref.device, dtype=ref.dtype)
    plain.load_state_dict(state, strict=True)
    return plain.train(merged.training)


def _wraps(module: nn.Module) -> bool:
    """A unipelt wrapper (explicit attention) keeps the original module as a child: its keys are the backbone's."""
    return any(isinstance(getattr(module, name, None), nn.Module) and not is_ours(getattr(module, name))
               for name in WRAPPED)
