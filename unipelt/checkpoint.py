"""Checkpoints holding only the trained weights, plus what is needed to check a rebuild."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .backbones import spec_for
from .config import PELTConfig, PELTError
from .gates import GateBank
from .inject import SLIM_WEIGHTS, config_of, fold_settled
from .record import check_record, mapping

STATE_SCHEMA = {"config": mapping(), "backbone": mapping(), "weights": mapping()}  # what pelt_state_dict returns
BACKBONE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "vocab_size", "num_labels")


def check_tensors(tensors: Mapping[str, Any], where: str, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """PELTError in one line naming ``where`` and the tensor, for the first saved tensor that is not finite
    (a damaged or diverged file) or, given ``shapes`` (name -> the model's), whose shape differs."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise PELTError(f"{where}: {name} is a {type(tensor).__name__}, not a tensor")
        if shapes is not None and name in shapes and tuple(tensor.shape) != tuple(shapes[name]):
            raise PELTError(f"{where}: tensor {name} has shape {tuple(tensor.shape)} but the model's has "
                            f"{tuple(shapes[name])}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise PELTError(f"{where}: tensor {name} holds NaN or infinite values (a damaged file, or a diverged run)")


def _backbone(model: nn.Module) -> dict[str, Any]:
    return {k: getattr(model.config, k, None) for k in BACKBONE_KEYS}


def pelt_state_dict(model: nn.Module, fold: bool = True) -> dict[str, Any]:
    """{"config", "backbone", "weights"}: trainable weights only (detached CPU-agnostic clones).

    With ``fold`` (default) what a tuner saves in another form is saved in it (an unfolded prefix as
    its static per-layer prefixes; the model itself is not changed); ``fold=False`` keeps the training
    form (the prefix's MLP, to resume training it).
    """
    cfg = config_of(model)
    held = getattr(model, SLIM_WEIGHTS, None)
    if held is not None:  # a slimmed model: what it was built from, before its folds (fold_settled)
        params = dict(model.named_parameters())
        changed = [k for k, v in held.items() if k in params and not torch.equal(params[k].detach(), v)]
        if changed:  # trained after slim: what it holds now is not what the saved form rebuilds
            raise PELTError(f"this slimmed model changed since slim ({changed[0]}); slim the trained model again")
        return {"config": cfg.to_dict(), "backbone": _backbone(model),
                "weights": {k: v.clone() for k, v in held.items()}}
    replaced: set[int] = set()
    forms: dict[str, torch.Tensor] = {}
    for sub in cfg.submodules.values() if fold else ():
        params, form = sub.saved_form(model)
        replaced.update(id(p) for p in params)
        forms.update(form)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()
               if p.requires_grad and id(p) not in replaced}
    weights.update(forms)
    return {"config": cfg.to_dict(), "backbone": _backbone(model), "weights": weights}


def load_pelt_state_dict(model: nn.Module, state: dict[str, Any], where: str = "checkpoint") -> nn.Module:
    """Load a pelt_state_dict into a model built with apply_pelt(same config); strict checks (``where``: the
    file, for the messages about its tensors). A slim config's model then folds what folds (`unipelt.slim`'s
    last step), so it equals the slimmed model it was saved from."""
    cfg = config_of(model)
    check_record(state, STATE_SCHEMA, where)
    saved = PELTConfig.from_dict(state["config"])
    if saved.name != cfg.name:
        raise PELTError(
            f"checkpoint was made with method {saved.name!r} but the model uses {cfg.name!r}")
    mine, theirs = cfg.flat(), saved.flat()
    diffs = [f"{k}={theirs.get(k)!r} (model: {mine.get(k)!r})"
             for k in dict.fromkeys([*theirs, *mine]) if theirs.get(k) != mine.get(k)]
    if diffs:
        raise PELTError(f"checkpoint config differs from the model's: {', '.join(diffs)}")
    mine = _backbone(model)
    diffs = [f"{k}={v!r} (model: {mine.get(k)!r})" for k, v in state["backbone"].items()
             if mine.get(k) != v]
    if diffs:
        raise PELTError(f"checkpoint backbone differs from the model's: {', '.join(diffs)}")

    weights = convert_v1_weights(model, state["weights"])
    for sub in cfg.submodules.values():
        sub.load_saved_form(model, weights)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise PELTError(f"checkpoint weights do not match the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    check_tensors(weights, where, {name: tuple(params[name].shape) for name in weights})
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    if cfg.slim is not None:  # a slim config's folds, now that the weights are in
        fold_settled(model)
        setattr(model, SLIM_WEIGHTS, {k: v.detach().clone() for k, v in weights.items()})
    return model


def convert_v1_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved by unipelt v1 (one ``Linear(hidden, 1)`` per gate, kept in the module it
    scales) under today's names (one ``GateBank`` per layer and input). Others pass unchanged."""
    spec = spec_for(model)
    subs = config_of(model).submodules.values()
    out = dict(weights)
    for bank_name, bank in model.named_modules():
        if not isinstance(bank, GateBank):
            continue
        layer_name = bank_name.rsplit(".pelt_gates.", 1)[0]
        paths = [next((p for sub in subs if (p := sub.v1_gate_path(spec, key)) is not None), None)
                 for key in bank.keys]
        v1 = [f"{layer_name}.{path}.proj" for path in paths if path is not None]
        if len(v1) == len(paths) and all(f"{n}.weight" in out for n in v1):
            for part in ("weight", "bias"):
                out[f"{bank_name}.proj.{part}"] = torch.cat([out.pop(f"{n}.{part}") for n in v1])
    return out
