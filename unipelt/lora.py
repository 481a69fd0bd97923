"""LoRA as a side path on a frozen Linear: ``y = W x + b + s * B A x``.

``s`` is ``alpha / r`` ungated, or the per-example gate (which replaces alpha/r, as in
the paper). The update is never merged into a weight copy: the side path costs
``2 r (in + out)`` FLOPs per token, and the scale is applied to the r-wide activation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .gates import Gate


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float,
                 gate: Gate | None) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        # For BERT-like layers the query/value input *is* the layer input, which the paper's
        # LoRA gate reads.
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lora_A(self.dropout(x))
        if self.gate is not None:
            z = z * self.gate(x).view(-1, 1, 1)
        else:
            z = z * self.scaling
        return self.base(x) + self.lora_B(z)
