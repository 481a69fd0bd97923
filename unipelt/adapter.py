"""Bottleneck adapter at the Pfeiffer position of a BERT-style FFN output block.

Backbone block: ``y = LN(h + x)`` with ``h = dropout(dense(ffn))``. With the adapter
(adapter-transformers' Pfeiffer config, as the authors used): ``a = LN(h + x)`` is the
adapter input and ``y = LN(h + gate * up(act(down(a))) + x)``, re-using the original
LayerNorm. An adapter whose output is zero leaves the block unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .gates import Gate

_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Adapter(nn.Module):
    def __init__(self, hidden: int, bottleneck: int, activation: str, gate: Gate | None,
                 init_std: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = _ACT[activation]()
        self.up = nn.Linear(bottleneck, hidden)
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)
        self.gate = gate  # reads the adapter input, scales the adapter output

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        out = self.up(self.act(self.down(a)))
        if self.gate is not None:
            out = out * self.gate(a).view(-1, 1, 1)
        return out


class AdapterOutput(nn.Module):
    """Wraps the FFN output block ``base`` (dense, dropout, LayerNorm) with a Pfeiffer adapter."""

    def __init__(self, base: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        base = self.base
        h = base.dropout(base.dense(hidden_states))
        a = base.LayerNorm(h + input_tensor)
        return base.LayerNorm(h + self.adapter(a) + input_tensor)
