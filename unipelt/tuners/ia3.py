"""(IA)^3 (Liu et al., 2022): learned vectors that scale keys, values and the FFN's intermediate activation.

Where, per family, is data (``BackboneSpec.ia3``): PEFT's default targets where it has them (BERT,
RoBERTa, DeBERTa-v2: keys, values and the *input* of every ``output.dense``, which PEFT's suffix match
makes both the attention's output projection and the FFN's down projection; Llama, Mistral: k, v and
the input of ``down_proj``; Qwen2/3: q, v, ``down_proj``; GPT-2: all of ``c_attn``'s output and the input
of the MLP's ``c_proj``), and where PEFT has none the analogous ones (ELECTRA, XLM-R: BERT's; DistilBERT:
``k_lin``, ``v_lin`` and the input of ``ffn.lin2``; ModernBERT: all of ``Wqkv`` and the input of
``mlp.Wo``, as GPT-2's fused projection). A vector ``l`` starts at ones (the backbone).

Gated, each vector becomes ``1 + g (l - 1)``: a gate of 0 gives the frozen backbone, as for every other
submodule (where ``g * l`` would zero the keys), and a gate of 1 gives (IA)^3. One gate per layer
scales all of the layer's vectors; it reads the attention input, as the prefix's and LoRA's do (the FFN's
vectors read the value that the layer's attention projections computed).

Linear in each weight it scales, so ``merge`` folds it exactly (rows or columns of the weight, and the
bias of an output-scaled projection), ungated or with a fixed gate; ``to_peft`` writes PEFT's ``IA3``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..backbones import spec_for
from ..errors import PELTError
from ..gates import GateSlot
from .base import (
    Merge,
    PeftAdapter,
    Target,
    TunerConfig,
    backbone_path,
    innermost,
    is_ours,
    model_layer,
    replace_children,
    resolve,
)
from .lora import is_conv1d


class IA3Linear(nn.Module):
    """A projection ``base`` (Linear or GPT-2's Conv1D) whose output, or with ``on_input`` its input, is
    scaled feature by feature by ``ia3_l``."""

    def __init__(self, base: nn.Module, on_input: bool, gate: GateSlot | None) -> None:
        super().__init__()
        self.base = base
        self.on_input = on_input
        weight = innermost(base).weight
        in_features, out_features = weight.shape if is_conv1d(innermost(base)) else weight.shape[::-1]
        self.ia3_l = nn.Parameter(torch.ones(in_features if on_input else out_features))
        self.gate = gate  # reads the attention input
        self.fixed: float | None = None  # a gate `unipelt.slim` fixed

    def extra_repr(self) -> str:
        return f"on_input={self.on_input}"

    def vector(self, gates: Mapping[str, float] | None = None) -> torch.Tensor:
        """The scale ``1 + g (l - 1)`` with the fixed gate (``gates[key]`` or the settled one); ``l`` ungated."""
        g = gates[self.gate.key] if self.gate is not None and gates is not None else self.fixed
        return self.ia3_l if g is None else torch.lerp(torch.ones_like(self.ia3_l), self.ia3_l, g)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.vector()
        # an output-scaled projection reads the attention input; the FFN's vectors read its gate computed already
        return torch.lerp(torch.ones_like(self.ia3_l), self.ia3_l, self.gate.scale(None if self.on_input else x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_input:
            return self.base(x * self.scale(x))
        return self.base(x) * self.scale(x)


def folded_base(ia3: IA3Linear, gates: Mapping[str, float]) -> nn.Module:
    """The wrapped projection with the scale folded into its weight: rows and bias (output) or columns (input)
    of a Linear's weight; GPT-2's Conv1D keeps its weight as (in, out), the transpose."""
    base = ia3.base
    if is_ours(base):
        raise PELTError(f"IA3 folds into a plain projection; this one is still wrapped ({type(base).__name__})")
    with torch.no_grad():
        v = ia3.vector(gates).detach().float()
        along_rows = ia3.on_input == is_conv1d(base)  # a Linear's output features are its weight's rows
        weight = base.weight.float()
        weight = weight * (v[:, None] if along_rows else v[None, :])
        base.weight.copy_(weight.to(base.weight.dtype))
        if not ia3.on_input and base.bias is not None:
            base.bias.copy_((base.bias.float() * v).to(base.bias.dtype))
    return base


@dataclass(frozen=True)
class IA3Config(TunerConfig):
    name: ClassVar[str] = "ia3"
    changes_attention: ClassVar[bool] = True  # DeBERTa's keys: explicit attention gives each example its scale
    merge: ClassVar[Merge] = Merge.FOLD
    peft_type: ClassVar[str] = "IA3"

    def inject(self, target: Target) -> None:
        sites = target.spec.ia3
        if sites is None:
            raise PELTError(f"ia3 has no sites for {target.spec.family}")
        for i, layer in enumerate(target.layers):
            gate = target.gate(self.gate, i, "attention", "ia3")
            for path, on_input in [(p, False) for p in sites.outputs] + [(p, True) for p in sites.inputs]:
                parent, name = resolve(layer, path)
                setattr(parent, name, target.new(IA3Linear(getattr(parent, name), on_input, gate)))

    def fold(self, model: nn.Module, layer: int, gates: Mapping[str, float]) -> None:
        replace_children(model_layer(model, layer), (IA3Linear,), lambda m: folded_base(m, gates))

    def settle(self, model: nn.Module, layer: int, gates: Mapping[str, float]) -> None:
        for module in model_layer(model, layer).modules():
            if isinstance(module, IA3Linear) and module.gate is not None and module.gate.key in gates:
                module.fixed, module.gate = gates[module.gate.key], None
        replace_children(model_layer(model, layer), (IA3Linear,),
                         lambda m: m.base if m.gate is not None else m)

    def peft(self, model: nn.Module, gates: Mapping[str, float]) -> PeftAdapter:
        """PEFT's IA3 with the family's sites as ``target_modules`` (PEFT matches them as name suffixes) and
        each vector with its fixed gate folded in, ``1 + g (l - 1)``: (out, 1), or (1, in) for an input."""
        sites = spec_for(model).ia3
        tensors: dict[str, torch.Tensor] = {}
        conv1d = False
        for name, module in model.named_modules():
            if isinstance(module, IA3Linear):
                v = module.vector(gates).detach()
                tensors[f"{backbone_path(model, name)}.ia3_l"] = v[None, :] if module.on_input else v[:, None]
                conv1d = conv1d or is_conv1d(module.base)
        config = {"target_modules": sorted(sites.outputs + sites.inputs), "feedforward_modules": sorted(sites.inputs),
                  "fan_in_fan_out": conv1d, "init_ia3_weights": True}
        return PeftAdapter(self.peft_type, config, tensors)
