"""Gates (Linear(hidden, 1) + sigmoid per token, mean over real tokens) and the shared context.

The mean runs over the attention mask, not the padded length, so that padding a batch
cannot change any example's gate (the authors' code padded every input to 128).
"""

from __future__ import annotations

import torch
from torch import nn


class PELTContext:
    """Per-forward state shared by every injected module of one model.

    Filled by a forward pre-hook on the base model: ``token_weights`` is the attention
    mask normalised to sum to 1 per example, so a gate's masked mean is one weighted sum.
    """

    def __init__(self) -> None:
        self.token_weights: torch.Tensor | None = None
        self.prefix_kv: torch.Tensor | None = None  # (layers, 2, heads, length, head_dim)

    def weights(self) -> torch.Tensor:
        if self.token_weights is None:
            raise RuntimeError("unipelt module called outside the model's forward")
        return self.token_weights


class Gate(nn.Module):
    """Scalar gate per example: mean over real tokens of sigmoid(W x + b)."""

    def __init__(self, hidden: int, ctx: PELTContext, key: str, init_std: float = 0.02) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, 1)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)
        self.ctx = ctx
        self.key = key  # e.g. "layer3.adapter", the name gate_values() reports
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_token = torch.sigmoid(self.proj(x)).squeeze(-1)  # (batch, tokens)
        gate = (per_token * self.ctx.weights()).sum(dim=1)  # (batch,)
        self.last = gate.detach()
        return gate


class ConstantGate(nn.Module):
    """A gate forced to a constant; used to check that NoGate equals a forced gated model."""

    def __init__(self, value: float, key: str) -> None:
        super().__init__()
        self.value = value
        self.key = key
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.new_full((x.shape[0],), self.value)
        self.last = gate
        return gate
