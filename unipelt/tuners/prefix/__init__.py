"""Prefix-tuning (Li & Liang): per-layer key/value vectors every query can attend to.

A package: ``encoder.py`` (the reparameterisation network, run once per forward, and each layer's
gated slice of it), ``attention.py`` (the prefix through transformers' attention interface, the
encoders' path), ``causal.py`` (decoders: the prefix under the causal mask with per-token gates),
``masks.py`` (masks widened by the prefix), ``deberta.py`` (DeBERTa-v2's attention written out, as it
calls no attention interface). This file: the config, its injection and what it declares.

Each layer scales its prefix by its gate and puts it in front of the keys and values, with the
mask extended so prefix positions are always attendable. Prefix keys carry no position: in rotary
models (ModernBERT, decoders) they are not rotated; in DeBERTa they take part in the content scores
only. ``merge`` keeps the prefix (it is not linear in any weight); checkpoints save it folded (its
network's output, the paper's parameter count); PEFT's prefix tuning is not exported (PEFT numbers the
real tokens after its prefix; here they keep positions 0..n).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...backbones import BackboneSpec, spec_for
from ...errors import PELTError
from ..base import Merge, Target, TunerConfig, innermost
from .attention import use_prefix_attention
from .deberta import DebertaV2Attention
from .encoder import PREFIX_ATTR, PrefixEncoder

# Explicit attention code for families that do not call transformers' attention interface
# (``BackboneSpec.explicit_attention`` names one): it replaces the attention module whenever a
# submodule changes attention (prefix, LoRA).
EXPLICIT_ATTENTION: dict[str, type[nn.Module]] = {"deberta-v2": DebertaV2Attention}

__all__ = ["EXPLICIT_ATTENTION", "PREFIX_ATTR", "PrefixConfig", "PrefixEncoder", "fold_prefix", "prefix_encoder"]


def _fill_gate(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Pre-hook of a gated attention module: compute its input's gates (cached for this forward); nothing
    once `unipelt.slim` fixed or removed the gate."""
    if module.pelt_prefix_gate is not None:
        module.pelt_prefix_gate.bank.values(args[0] if args else kwargs["hidden_states"])


@dataclass(frozen=True)
class PrefixConfig(TunerConfig):
    name: ClassVar[str] = "prefix"
    changes_attention: ClassVar[bool] = True
    merge: ClassVar[Merge] = Merge.KEEP  # not linear in any weight: stays, its gates held fixed
    length: int = 10
    mid_dim: int = 512

    def validate(self) -> None:
        self._positive_int("length", "mid_dim")

    def inject(self, target: Target) -> None:
        model, spec, d = target.model, target.spec, target.dims
        if spec.explicit_attention is None:  # else the explicit attention code adds it (EXPLICIT_ATTENTION)
            use_prefix_attention(model)
        encoder = PrefixEncoder(d.layers, d.hidden, d.kv_heads, d.head_dim, self.length,
                                self.mid_dim, target.init_std)
        target.share(PREFIX_ATTR, encoder, make_static="unipelt.fold_prefix(model)")
        for i, layer in enumerate(target.layers):
            attention = layer.get_submodule(spec.attention)
            attention.pelt_prefix_layer = i
            attention.pelt_prefix_gate = target.gate(self.gate, i, "attention", "prefix")
            if self.gate and spec.explicit_attention is None:
                attention.register_forward_pre_hook(_fill_gate, with_kwargs=True)

    def settle(self, model: nn.Module, layer: int, gates: Mapping[str, float]) -> None:
        """The prefix becomes static (``fold_prefix``); a fixed gate scales the layer's slice of it (applied
        once to the cached prefix, not per forward), a removed one takes the layer's prefix away; with no
        layer left reading it, the prefix goes (nothing runs it once per forward)."""
        encoder = prefix_encoder(model)
        encoder.fold()
        attentions = [innermost(block.get_submodule(spec_for(model).attention))  # DeBERTa's: the wrapped one
                      for block in spec_for(model).layer_list(model)]
        attention = attentions[layer]
        slot = attention.pelt_prefix_gate
        attention.pelt_prefix_gate = None
        if slot is not None and slot.key in gates:
            encoder.scale_layer(layer, gates[slot.key])
        elif slot is not None:
            attention.pelt_prefix_layer = None
        if layer == len(attentions) - 1 and all(a.pelt_prefix_layer is None for a in attentions):
            delattr(model.base_model, PREFIX_ATTR)
            del model.base_model._pelt_shared[PREFIX_ATTR]

    def saved_form(self, model: nn.Module) -> tuple[list[nn.Parameter], dict[str, torch.Tensor]]:
        """An unfolded prefix is saved (and counted, as the paper counts it) as its output, the static prefix."""
        encoder = prefix_encoder(model)
        if encoder is None or encoder.folded:  # None: `unipelt.slim` removed it from every layer
            return [], {}
        return list(encoder.parameters()), {_static_name(model): encoder.folded_value()}

    def load_saved_form(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        encoder = prefix_encoder(model)
        if encoder is None:
            return
        if _static_name(model) in weights and not encoder.folded:
            encoder.fold()  # a folded checkpoint: the network is gone for good
        elif encoder.folded and _static_name(model) not in weights:
            raise PELTError("checkpoint has an unfolded prefix but the model's prefix is folded; "
                            "load it into a fresh apply_pelt model")

    def v1_gate_path(self, spec: BackboneSpec, key: str) -> str | None:
        return f"{spec.attention}.prefix_gate" if key == "prefix" else None


def prefix_encoder(model: nn.Module) -> PrefixEncoder | None:
    return getattr(model.base_model, PREFIX_ATTR, None)


def _static_name(model: nn.Module) -> str:
    return f"{model.base_model_prefix}.{PREFIX_ATTR}.static"


def fold_prefix(model: nn.Module) -> nn.Module:
    """Replace the prefix reparameterisation MLP by static per-layer prefixes, for good.

    Not needed for inference speed: without gradients the MLP output is cached automatically.
    Use it to keep training the static prefix or to drop the MLP from memory.
    """
    encoder = prefix_encoder(model)
    if encoder is None:
        raise PELTError("fold_prefix: this model has no prefix (apply_pelt with a prefix preset)")
    encoder.fold()
    return model
