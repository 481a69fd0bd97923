"""Checkpoints holding only the trained weights, plus what is needed to check a rebuild."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backbones import BackboneSpec, PostLNOutput, spec_for
from .config import PELTConfig, PELTError
from .gates import GateBank
from .inject import _prefix_encoder
from .tuners.prefix import PREFIX_ATTR

BACKBONE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "vocab_size", "num_labels")


def _config_of(model: nn.Module) -> PELTConfig:
    cfg = getattr(model, "pelt_config", None)
    if cfg is None:
        raise PELTError("this model has no PELT config; call apply_pelt(model, config) first")
    return cfg


def _backbone(model: nn.Module) -> dict[str, Any]:
    return {k: getattr(model.config, k, None) for k in BACKBONE_KEYS}


def _static_name(model: nn.Module) -> str:
    return f"{model.base_model_prefix}.{PREFIX_ATTR}.static"


def pelt_state_dict(model: nn.Module, fold: bool = True) -> dict[str, Any]:
    """{"config", "backbone", "weights"}: trainable weights only (detached CPU-agnostic clones).

    With ``fold`` (default) an unfolded prefix is saved as its static per-layer prefixes
    (the model itself is not changed); ``fold=False`` keeps the MLP to resume training it.
    """
    cfg = _config_of(model)
    encoder = _prefix_encoder(model)
    fold_here = fold and encoder is not None and not encoder.folded
    mlp = {id(p) for p in encoder.parameters()} if fold_here else set()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()
               if p.requires_grad and id(p) not in mlp}
    if fold_here:
        weights[_static_name(model)] = encoder.folded_value()
    return {"config": cfg.to_dict(), "backbone": _backbone(model), "weights": weights}


def load_pelt_state_dict(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Load a pelt_state_dict into a model built with apply_pelt(same config); strict checks."""
    cfg = _config_of(model)
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
    encoder = _prefix_encoder(model)
    if encoder is not None:
        if _static_name(model) in weights and not encoder.folded:
            encoder.fold()  # a folded checkpoint: the MLP is gone for good
        elif encoder.folded and _static_name(model) not in weights:
            raise PELTError("checkpoint has an unfolded prefix but the model's prefix is folded; "
                            "load it into a fresh apply_pelt model")
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise PELTError(f"checkpoint weights do not match the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    for name, tensor in weights.items():
        if params[name].shape != tensor.shape:
            raise PELTError(f"checkpoint weight {name} has shape {tuple(tensor.shape)} but the "
                            f"model's has {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    return model


def convert_v1_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved by unipelt v1 (one ``Linear(hidden, 1)`` per gate, kept in the module it
    scales) under today's names (one ``GateBank`` per layer and input). Others pass unchanged."""
    spec = spec_for(model)
    out = dict(weights)
    for bank_name, bank in model.named_modules():
        if not isinstance(bank, GateBank):
            continue
        layer_name = bank_name.rsplit(".pelt_gates.", 1)[0]
        v1 = [f"{layer_name}.{_v1_gate_path(spec, key)}.proj" for key in bank.keys]
        if all(f"{n}.weight" in out for n in v1):
            for part in ("weight", "bias"):
                out[f"{bank_name}.proj.{part}"] = torch.cat([out.pop(f"{n}.{part}") for n in v1])
    return out


def _v1_gate_path(spec: BackboneSpec, key: str) -> str:
    if key == "adapter" and isinstance(spec.adapter, PostLNOutput):
        return f"{spec.adapter.block}.adapter.gate"
    if key == "prefix":
        return f"{spec.attention}.prefix_gate"
    if key.startswith("lora_") and key[5:] in spec.projections:
        return f"{spec.attention}.{spec.projections[key[5:]]}.gate"
    return f"(no v1 name for {key})"
