"""Bottleneck adapter (Houlsby et al.) at the Pfeiffer position, as the paper's authors used it.

Post-LN block ``y = LN(h + x)`` (``h`` the sublayer output, ``x`` the residual): the adapter
reads ``a = LN(h + x)`` and the block becomes ``y = LN(h + g * up(act(down(a))) + x)``,
re-using the block's LayerNorm (adapter-transformers' Pfeiffer config). A pre-norm block
``y = r + mlp(norm(r))`` has no LayerNorm there: the adapter reads ``a = y`` and the block
becomes ``y + g * up(act(down(y)))``. Either way an adapter whose output is zero leaves the
block unchanged. ``g`` is the gate (reading ``a``) or 1.

Not linear in any weight, so ``merge`` keeps it as a module (with its gate held at a fixed value);
PEFT has no adapter of this kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.functional import linear

from ..backbones import BackboneSpec, LayerOutput, MLPOutput, PostLNOutput, PostLNSublayer
from ..errors import PELTError
from ..gates import GateSlot
from .base import Merge, Target, TunerConfig, model_layer, replace_children

ACTIVATIONS = {"relu": torch.relu, "gelu": nn.functional.gelu, "tanh": torch.tanh, "silu": nn.functional.silu}


class Adapter(nn.Module):
    def __init__(self, hidden: int, bottleneck: int, activation: str, gate: GateSlot | None,
                 init_std: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.up = nn.Linear(bottleneck, hidden)
        for layer in (self.down, self.up):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)
        self.gate = gate  # reads the adapter input, scales the adapter output
        self.fixed: float | None = None  # a gate `unipelt.slim` fixed

    def extra_repr(self) -> str:
        return f"activation={self.activation}"

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """The scaled adapter output ``g * up(act(down(a)))``."""
        return self.add_to(torch.zeros((), dtype=a.dtype, device=a.device), a)

    def add_to(self, residual: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``residual + g * up(act(down(a)))`` (one fused multiply-add when gated)."""
        # functions, not module calls (each costs microseconds in a decoder's generation step)
        up = linear(self.act(linear(a, self.down.weight, self.down.bias)), self.up.weight, self.up.bias)
        if self.gate is not None:
            return torch.addcmul(residual, up, self.gate.scale(a))
        return residual + up if self.fixed is None else torch.add(residual, up, alpha=self.fixed)


class AdapterOutput(nn.Module):
    """BERT's FFN output block ``base`` (dense, dropout, LayerNorm) with the adapter."""

    def __init__(self, base: nn.Module, adapter: Adapter, site: PostLNOutput) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.names = (site.dense, site.dropout, site.norm)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        dense, dropout, norm = (getattr(self.base, n) for n in self.names)
        s = dropout(dense(hidden_states)) + input_tensor
        return norm(self.adapter.add_to(s, norm(s)))


class AdapterSublayer(nn.Module):
    """A sublayer ``base`` whose layer computes ``norm(base(x) + x)``: returns ``h + adapter(norm(h + x))``."""

    def __init__(self, base: nn.Module, adapter: Adapter, norm: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self._norm = (norm,)  # the layer's own LayerNorm, not registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return self.adapter.add_to(h, self._norm[0](h + x))  # the layer adds x and normalises


class AdapterMLP(nn.Module):
    """A pre-norm block's MLP ``base`` with the adapter on its output: ``h + adapter(h)``, ``h = base(x)``."""

    def __init__(self, base: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return self.adapter.add_to(h, h)


def _after_layer(layer: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook of a pre-norm layer: ``y + adapter(y)`` (a module-level function: deepcopy works);
    nothing once `unipelt.slim` removed the adapter."""
    if not hasattr(layer, "adapter"):
        return None
    if isinstance(output, tuple):
        return (layer.adapter.add_to(output[0], output[0]), *output[1:])
    return layer.adapter.add_to(output, output)


@dataclass(frozen=True)
class AdapterConfig(TunerConfig):
    name: ClassVar[str] = "adapter"
    merge: ClassVar[Merge] = Merge.KEEP
    bottleneck: int = 48
    activation: str = "relu"

    def validate(self) -> None:
        self._positive_int("bottleneck")
        if self.activation not in ACTIVATIONS:
            raise PELTError(f"adapter_activation {self.activation!r} is not one of: "
                            f"{', '.join(ACTIVATIONS)}")

    def inject(self, target: Target) -> None:
        site = target.spec.adapter
        for i, layer in enumerate(target.layers):
            gate = target.gate(self.gate, i, "adapter", "adapter")
            adapter = target.new(Adapter(target.dims.hidden, self.bottleneck, self.activation, gate,
                                         target.init_std))
            if isinstance(site, PostLNOutput):
                parent, child = _split(layer, site.block)
                setattr(parent, child, AdapterOutput(getattr(parent, child), adapter, site))
            elif isinstance(site, PostLNSublayer):
                parent, child = _split(layer, site.sublayer)
                setattr(parent, child, AdapterSublayer(getattr(parent, child), adapter,
                                                       layer.get_submodule(site.norm)))
            elif isinstance(site, MLPOutput):
                parent, child = _split(layer, site.mlp)
                setattr(parent, child, AdapterMLP(getattr(parent, child), adapter))
            elif isinstance(site, LayerOutput):
                layer.add_module("adapter", adapter)
                layer.register_forward_hook(_after_layer)
            else:
                raise PELTError(f"unknown adapter site {site!r}")

    def settle(self, model: nn.Module, layer: int, gates: Mapping[str, float]) -> None:
        block = model_layer(model, layer)
        adapter = next((m for m in block.modules() if isinstance(m, Adapter)), None)
        if adapter is None or adapter.gate is None:
            return
        if adapter.gate.key in gates:
            adapter.fixed, adapter.gate = gates[adapter.gate.key], None
        elif isinstance(getattr(block, "adapter", None), Adapter):  # after a pre-norm layer (its hook then passes)
            del block.adapter
        else:
            replace_children(block, (AdapterOutput, AdapterSublayer, AdapterMLP), lambda m: m.base)

    def v1_gate_path(self, spec: BackboneSpec, key: str) -> str | None:
        if key == "adapter" and isinstance(spec.adapter, PostLNOutput):
            return f"{spec.adapter.block}.adapter.gate"
        return None


def _split(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, child = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), child
