"""Prefix-tuning through transformers' attention interface (SDPA or eager).

One reparameterisation network shared by all layers produces per-layer prefix keys and
values; a pre-hook on each self-attention module scales them by the layer's gate and a
registered attention function prepends them to the keys/values, extending the mask so
that prefix positions are always attendable. The matching *mask* function is registered
too: without it transformers builds no padding mask for an unknown implementation name
and padding is silently attended.

Folding: in eval mode the network's output is computed once and cached (invalidated when
any of its weights changes or ``train()`` is called), so inference runs no MLP and
``train()`` after ``eval()`` trains the MLP as before. ``fold()`` replaces the network
for good by a static parameter (the paper's parameter count; smaller checkpoints).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .gates import Gate, PELTContext

IMPL_PREFIX = "unipelt_"
BASE_IMPLEMENTATIONS = ("sdpa", "eager")


class PrefixEncoder(nn.Module):
    """Embedding(L, hidden) -> Linear(hidden, mid) -> Tanh -> Linear(mid, layers*2*hidden)."""

    def __init__(self, n_layers: int, hidden: int, n_heads: int, length: int, mid_dim: int,
                 init_std: float) -> None:
        super().__init__()
        self.kv_shape = (length, n_layers, 2, n_heads, hidden // n_heads)
        self.embedding: nn.Embedding | None = nn.Embedding(length, hidden)
        self.mlp: nn.Sequential | None = nn.Sequential(
            nn.Linear(hidden, mid_dim), nn.Tanh(), nn.Linear(mid_dim, n_layers * 2 * hidden))
        nn.init.normal_(self.embedding.weight, std=init_std)
        for linear in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)
        self.static: nn.Parameter | None = None
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    @property
    def folded(self) -> bool:
        return self.static is not None

    @property
    def folded_numel(self) -> int:
        length, n_layers, _, n_heads, head_dim = self.kv_shape
        return n_layers * 2 * n_heads * head_dim * length

    def compute(self) -> torch.Tensor:
        """Run the network: (layers, 2, heads, length, head_dim)."""
        out = self.mlp(self.embedding.weight)
        return out.view(self.kv_shape).permute(1, 2, 3, 0, 4)

    def forward(self) -> torch.Tensor:
        if self.static is not None:
            return self.static
        if self.training:
            self._cache = None
            return self.compute()
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
        if self._cache is None or key != self._cache_key:
            with torch.no_grad():
                self._cache = self.compute().contiguous()
            self._cache_key = key
        return self._cache

    def train(self, mode: bool = True) -> PrefixEncoder:
        self._cache = None
        return super().train(mode)

    @torch.no_grad()
    def folded_value(self) -> torch.Tensor:
        return self.static.detach().clone() if self.static is not None else self.compute().contiguous()

    def fold(self) -> None:
        """Replace the network by its output, a trainable static prefix (irreversible)."""
        if self.static is not None:
            return
        trainable = any(p.requires_grad for p in self.parameters())
        self.static = nn.Parameter(self.folded_value(), requires_grad=trainable)
        self.embedding = None
        self.mlp = None
        self._cache = None


def attach_prefix(self_attention: nn.Module, layer_idx: int, ctx: PELTContext,
                  gate: Gate | None) -> None:
    """Give one self-attention module its (gated) prefix for every forward."""
    self_attention.prefix_gate = gate  # reads the layer input, scales prefix keys and values
    self_attention._pelt_ctx = ctx
    self_attention._pelt_layer_idx = layer_idx
    self_attention.register_forward_pre_hook(_prefix_pre_hook, with_kwargs=True)


def _prefix_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # A module-level function reading state from ``module`` (no closure), so deepcopy works.
    hidden = args[0] if args else kwargs["hidden_states"]
    kv = module._pelt_ctx.prefix_kv[module._pelt_layer_idx].to(hidden.dtype)
    key, value = kv.unbind(0)  # (heads, length, head_dim) each
    batch = hidden.shape[0]
    if module.prefix_gate is not None:
        g = module.prefix_gate(hidden).view(batch, 1, 1, 1)
        key, value = key * g, value * g
    else:
        key = key.expand(batch, -1, -1, -1)
        value = value.expand(batch, -1, -1, -1)
    module._pelt_prefix_kv = (key, value)


def _extend_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Prepend ``length`` always-attendable key positions to a 4D bool or additive mask."""
    fill = True if mask.dtype == torch.bool else 0.0
    pad = torch.full((*mask.shape[:-1], length), fill, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    prefix = module.__dict__.pop("_pelt_prefix_kv", None)
    if prefix is not None:
        key = torch.cat([prefix[0], key], dim=2)
        value = torch.cat([prefix[1], value], dim=2)
        if attention_mask is not None:
            attention_mask = _extend_mask(attention_mask, prefix[0].shape[2])
    base = module.config._attn_implementation.removeprefix(IMPL_PREFIX)
    if base == "eager":  # each modeling file has its own eager function
        fn = sys.modules[type(module).__module__].eager_attention_forward
    else:
        fn = ALL_ATTENTION_FUNCTIONS[base]
    return fn(module, query, key, value, attention_mask, **kwargs)


for _base in BASE_IMPLEMENTATIONS:
    AttentionInterface.register(IMPL_PREFIX + _base, prefix_attention_forward)
    AttentionMaskInterface.register(IMPL_PREFIX + _base, ALL_MASK_ATTENTION_FUNCTIONS[_base])
