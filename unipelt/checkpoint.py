"""Checkpoints holding only the trained weights, plus what is needed to check a rebuild."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import PELTConfig, PELTError
from .inject import PREFIX_ATTR, _prefix_encoder

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
    diffs = [f"{k}={v!r} (model: {cfg.to_dict()[k]!r})"
             for k, v in saved.to_dict().items() if cfg.to_dict()[k] != v]
    if diffs:
        raise PELTError(f"checkpoint config differs from the model's: {', '.join(diffs)}")
    mine = _backbone(model)
    diffs = [f"{k}={v!r} (model: {mine.get(k)!r})" for k, v in state["backbone"].items()
             if mine.get(k) != v]
    if diffs:
        raise PELTError(f"checkpoint backbone differs from the model's: {', '.join(diffs)}")

    weights = state["weights"]
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
