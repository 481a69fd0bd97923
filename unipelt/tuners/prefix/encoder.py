"""The prefix's reparameterisation network and how a layer reads this forward's prefix.

One network shared by all layers, ``Embedding(L, hidden) -> Linear(hidden, mid) -> Tanh ->
Linear(mid, layers * 2 * kv_heads * head_dim)``, runs once per forward (the forward context holds its
output, ``shared[PREFIX_ATTR]``); each layer takes its slice, scaled by its gate.

Eval-mode cache: when gradients are off (``no_grad``/``inference_mode``) the network's output
is computed once and reused until a weight changes or ``train()`` is called (``eval()`` keeps
it); with gradients on it always runs, so a backward reaches the network in eval mode too.
``fold()`` replaces the network for good by a static parameter (the paper's parameter count;
smaller checkpoints).
"""

from __future__ import annotations

import torch
from torch import nn

from ...compat import version_counter
from ...context import current
from ...errors import PELTError
from ...gates import GateSlot

PREFIX_ATTR = "pelt_prefix"  # the shared PrefixEncoder lives at model.base_model.pelt_prefix


class PrefixEncoder(nn.Module):
    """The reparameterisation network; ``forward()`` gives (layers, 2, kv_heads, length, head_dim)."""

    def __init__(self, n_layers: int, hidden: int, kv_heads: int, head_dim: int, length: int,
                 mid_dim: int, init_std: float) -> None:
        super().__init__()
        self.kv_shape = (length, n_layers, 2, kv_heads, head_dim)
        self.embedding: nn.Embedding | None = nn.Embedding(length, hidden)
        self.mlp: nn.Sequential | None = nn.Sequential(
            nn.Linear(hidden, mid_dim), nn.Tanh(), nn.Linear(mid_dim, n_layers * 2 * kv_heads * head_dim))
        nn.init.normal_(self.embedding.weight, std=init_std)
        for linear in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)
        self.static: nn.Parameter | None = None
        self.register_buffer("layer_scale", None, persistent=False)  # per-layer gates `unipelt.slim` fixed
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    @property
    def folded(self) -> bool:
        return self.static is not None

    @property
    def folded_numel(self) -> int:
        length, n_layers, _, kv_heads, head_dim = self.kv_shape
        return n_layers * 2 * kv_heads * head_dim * length

    def compute(self) -> torch.Tensor:
        out = self.mlp(self.embedding.weight)
        return out.view(self.kv_shape).permute(1, 2, 3, 0, 4)

    def scaled(self) -> torch.Tensor:
        """The prefix (static or computed), each layer's slice times its fixed gate when `unipelt.slim` fixed them."""
        out = self.static if self.static is not None else self.compute()
        return out if self.layer_scale is None else out * self.layer_scale.view(-1, 1, 1, 1, 1)

    def scale_layer(self, layer: int, value: float) -> None:
        if self.layer_scale is None:
            ref = self.static if self.static is not None else self.embedding.weight
            self.layer_scale = torch.ones(self.kv_shape[1], dtype=ref.dtype, device=ref.device)
        self.layer_scale[layer] = value
        self._cache = None

    def forward(self) -> torch.Tensor:
        if self.static is not None and self.layer_scale is None:
            return self.static
        if torch.is_grad_enabled():  # training, or a backward in eval mode: never cached
            self._cache = None
            return self.scaled()
        if torch.compiler.is_compiling():  # run inside the graph: the key's data pointers would break it
            return self.scaled()
        key = tuple((p.data_ptr(), version_counter(p), p.dtype, p.device)
                    for p in (*self.parameters(), *self.buffers()))
        if self._cache is None or key != self._cache_key:
            self._cache = self.scaled().contiguous()
            self._cache_key = key
        return self._cache

    def train(self, mode: bool = True) -> PrefixEncoder:
        """Training drops the cache (its forwards never read it); ``eval()`` keeps it: serving code
        that calls ``model.eval()`` per request would otherwise rerun the network every time (the
        cache key, each weight's pointer and version, still catches any weight change)."""
        if mode:
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


def layer_prefix(module: nn.Module, dtype: torch.dtype, blank: int = 0) -> torch.Tensor:
    """This forward's prefix of ``module``'s layer, (2, kv_heads, length + blank, head_dim) in ``dtype``,
    ``blank`` zero rows last: one pad and one unbind per forward, not a select per layer."""
    ctx = current()
    layers = ctx.cache.get(("prefix layers", blank))
    if layers is None:
        prefix = ctx.shared[PREFIX_ATTR]  # (layers, 2, kv_heads, length, head_dim)
        prefix = nn.functional.pad(prefix, (0, 0, 0, blank)) if blank else prefix
        layers = ctx.cache[("prefix layers", blank)] = prefix.unbind(0)
    kv = layers[module.pelt_prefix_layer]
    return kv if kv.dtype == dtype else kv.to(dtype)


def gated_prefix(module: nn.Module, batch: int, dtype: torch.dtype, gate: torch.Tensor | None,
                 blank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This forward's prefix keys and values of ``module``'s layer, (batch, kv_heads, length, head_dim),
    followed by ``blank`` zero rows."""
    kv = layer_prefix(module, dtype, blank)
    if gate is None:
        key, value = kv.unbind(0)
        return key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
    if gate.dim() != 1:  # a per-position (causal) gate cannot scale keys shared by all queries
        raise PELTError("a gated prefix needs one gate per example; causal (per-position) "
                        "prefix gates are not supported")
    return (kv * gate.view(-1, 1, 1, 1, 1)).unbind(1)  # keys and values in one multiply


def prefix_for(module: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For explicit attention code: the gated prefix, the gate reading ``hidden_states``."""
    slot: GateSlot | None = module.pelt_prefix_gate
    gate = slot(hidden_states) if slot is not None else None
    return gated_prefix(module, hidden_states.shape[0], hidden_states.dtype, gate)
