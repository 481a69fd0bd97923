"""Parallel adapter (He et al., ICLR 2022): a bottleneck beside the FFN, ``h = ffn(x) + s * up(relu(down(x)))``.

It reads the FFN's input ``x`` and adds its output, scaled by ``s`` (``scale``, 4 as in He et al.'s
scaled parallel adapter), to the FFN's output ``h``; with ``gate`` a gate reading ``x`` scales it too.
Initialised as He et al. did (their "lora" option): ``down`` Kaiming-uniform, ``up`` and the biases
zero, so it starts as the backbone. Sites (``BackboneSpec.ffn``): one FFN module (``mlp``, ``ffn``: the
adapter wraps it), or post-LN BERT's split FFN, whose output block ``LN(dropout(dense(f)) + x)`` also
receives ``x``: the adapter adds to that residual input, which is adding to the FFN's output. Beside a
series adapter (``adapter``), that one reads the FFN block's output with this one's contribution in it.

Not linear in any weight: ``merge`` keeps it as a module with its gate held fixed; PEFT has no parallel
adapter, so ``to_peft`` refuses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.functional import linear

from ..backbones import FFNModule, FFNSplit
from ..errors import PELTError
from ..gates import GateSlot
from .adapter import ACTIVATIONS
from .base import Merge, Target, TunerConfig, model_layer, replace_children, resolve


class ParallelAdapter(nn.Module):
    def __init__(self, hidden: int, bottleneck: int, activation: str, scale: float, gate: GateSlot | None) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for p in (self.up.weight, self.down.bias, self.up.bias):
            nn.init.zeros_(p)
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.scale = scale
        self.gate = gate  # reads the FFN input
        self.fixed: float | None = None  # a gate `unipelt.slim` fixed

    def extra_repr(self) -> str:
        return f"activation={self.activation}, scale={self.scale}"

    def add_to(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``h + g * s * up(act(down(x)))`` (functions, not module calls: fewer microseconds a step)."""
        up = linear(self.act(linear(x, self.down.weight, self.down.bias)), self.up.weight, self.up.bias)
        if self.gate is not None:
            return torch.addcmul(h, up, self.gate.scale(x) * self.scale)
        return torch.add(h, up, alpha=self.scale * (1.0 if self.fixed is None else self.fixed))


class ParallelFFN(nn.Module):
    """An FFN module ``base`` with the parallel adapter beside it."""

    def __init__(self, base: nn.Module, adapter: ParallelAdapter) -> None:
        super().__init__()
        self.base = base
        self.parallel_adapter = adapter

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.parallel_adapter.add_to(self.base(x, *args, **kwargs), x)


class ParallelResidual(nn.Module):
    """Post-LN BERT's FFN output block ``base(f, x) = LN(dropout(dense(f)) + x)``, given ``x + s PA(x)``."""

    def __init__(self, base: nn.Module, adapter: ParallelAdapter) -> None:
        super().__init__()
        self.base = base
        self.parallel_adapter = adapter

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.base(hidden_states, self.parallel_adapter.add_to(input_tensor, input_tensor), *args, **kwargs)


@dataclass(frozen=True)
class ParallelAdapterConfig(TunerConfig):
    name: ClassVar[str] = "parallel_adapter"
    merge: ClassVar[Merge] = Merge.KEEP  # not linear in any weight: stays, its gate held fixed
    bottleneck: int = 48
    scale: float = 4.0
    activation: str = "relu"

    def validate(self) -> None:
        self._positive_int("bottleneck")
        self._positive_number("scale")
        if self.activation not in ACTIVATIONS:
            raise PELTError(f"parallel_adapter_activation {self.activation!r} is not one of: {', '.join(ACTIVATIONS)}")

    def inject(self, target: Target) -> None:
        site = target.spec.ffn
        for i, layer in enumerate(target.layers):
            gate = target.gate(self.gate, i, "ffn", "parallel_adapter")
            adapter = ParallelAdapter(target.dims.hidden, self.bottleneck, self.activation, self.scale, gate)
            adapter = target.new(adapter)
            if isinstance(site, FFNSplit):  # outside a series adapter's block: it then reads x + s PA(x) too
                parent, child = resolve(layer, site.block)
                setattr(parent, child, ParallelResidual(getattr(parent, child), adapter))
            elif isinstance(site, FFNModule):  # the FFN itself, inside a series adapter wrapping it
                parent, child = resolve(layer, site.path, inside=True)
                setattr(parent, child, ParallelFFN(getattr(parent, child), adapter))
            else:
                raise PELTError(f"unknown FFN site {site!r}")

    def settle(self, model: nn.Module, layer: int, gates: Mapping[str, float]) -> None:
        def settled(wrapper: ParallelFFN | ParallelResidual) -> nn.Module:
            adapter = wrapper.parallel_adapter
            if adapter.gate is None:
                return wrapper
            if adapter.gate.key not in gates:
                return wrapper.base
            adapter.fixed, adapter.gate = gates[adapter.gate.key], None
            return wrapper

        replace_children(model_layer(model, layer), (ParallelFFN, ParallelResidual), settled)
