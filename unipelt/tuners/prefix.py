"""Prefix-tuning (Li & Liang): per-layer key/value vectors every query can attend to.

One reparameterisation network shared by all layers, ``Embedding(L, hidden) -> Linear(hidden,
mid) -> Tanh -> Linear(mid, layers * 2 * kv_heads * head_dim)``, runs once per forward (the
forward context holds its output); each layer scales its prefix by its gate and puts it in
front of the keys and values, with the mask extended so prefix positions are always
attendable. Prefix keys carry no position: in rotary models (ModernBERT) they are not
rotated; in DeBERTa they take part in the content scores only (see ``backbones``).

Families that call transformers' attention interface get it through two registered
implementations, ``unipelt_sdpa`` and ``unipelt_eager`` (each with its mask function: without
one transformers builds no padding mask for an unknown name and padding would be attended),
set with the public ``model.set_attn_implementation`` on a config of the model's own (a
config object the caller shares is never changed). Switching the implementation after
``apply_pelt`` to one without the prefix fails at the next forward.

Eval-mode cache: when gradients are off (``no_grad``/``inference_mode``) the network's output
is computed once and reused until a weight changes or ``train()`` is called (``eval()`` keeps
it); with gradients on it always runs, so a backward reaches the network in eval mode too.
``fold()`` replaces the network for good by a static parameter (the paper's parameter count;
smaller checkpoints).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..backbones import BackboneSpec
from ..causal import additive_mask, can_merge, extend_mask, gated_output, merged_prefix_attention, prefix_inputs
from ..context import current
from ..errors import PELTError
from ..gates import GateSlot
from .base import Merge, Target, TunerConfig

IMPL_PREFIX = "unipelt_"
BASE_IMPLEMENTATIONS = ("sdpa", "eager")
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

    def forward(self) -> torch.Tensor:
        if self.static is not None:
            return self.static
        if torch.is_grad_enabled():  # training, or a backward in eval mode: never cached
            self._cache = None
            return self.compute()
        if torch.compiler.is_compiling():  # run inside the graph: the key's data pointers would break it
            return self.compute()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        if self._cache is None or key != self._cache_key:
            self._cache = self.compute().contiguous()
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


def _fill_gate(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Pre-hook of a gated attention module: compute its input's gates (cached for this forward)."""
    module.pelt_prefix_gate.bank.values(args[0] if args else kwargs["hidden_states"])


def _once_per_forward(mask: torch.Tensor, tag: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()``, derived from ``mask``, computed once per forward: every layer gets the same object."""
    masks = current().cache
    key = (*tag, id(mask))
    hit = masks.get(key)
    if hit is None or hit[0] is not mask:
        hit = masks[key] = (mask, build())  # holding ``mask`` keeps its id from being reused
    return hit[1]


def _extended_mask(mask: torch.Tensor, length: int, blank: int = 0) -> torch.Tensor:
    """``extend_mask`` once per forward and mask (a padded generation step would build it per layer)."""
    return _once_per_forward(mask, ("extended", length, blank), lambda: extend_mask(mask, length, blank))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _once_per_forward(mask, ("additive", dtype), lambda: additive_mask(mask, dtype))


ALIGN = 16  # CPU flash attention runs 138 keys ~30 % slower than 144: blank prefix slots round the keys up


def _alignment(base_impl: str, key: torch.Tensor, length: int, dropout: float) -> int:
    """Blank prefix slots that round the key count up to a multiple of ``ALIGN``, where SDPA runs
    its CPU flash kernel. Not with attention dropout (CPU SDPA then runs the math path, whose cost
    grows with every key), nor on GPU (an explicit mask could move SDPA off its fastest kernel)."""
    if base_impl != "sdpa" or key.device.type != "cpu" or dropout:
        return 0
    return -(key.shape[2] + length) % ALIGN


def _unmasked(query: torch.Tensor, keys: int) -> torch.Tensor:
    """An all-attendable boolean mask (1, 1, 1, keys), one per forward and key count."""
    masks = current().cache
    hit = masks.get(("unmasked", keys))
    if hit is None:
        hit = masks[("unmasked", keys)] = torch.ones(1, 1, 1, keys, dtype=torch.bool, device=query.device)
    return hit


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             *args: Any, base_impl: str, **kwargs: Any) -> Any:
    if getattr(module, "pelt_prefix_layer", None) is not None and current().causal:
        return _causal_prefix_attention(module, query, key, value, attention_mask, *args,
                                        base_impl=base_impl, **kwargs)
    if getattr(module, "pelt_prefix_layer", None) is not None:
        slot = module.pelt_prefix_gate
        blank = _alignment(base_impl, key, current().shared[PREFIX_ATTR].shape[-2], kwargs.get("dropout", 0.0))
        if blank and attention_mask is None:
            attention_mask = _unmasked(query, key.shape[2])
        pk, pv = gated_prefix(module, query.shape[0], key.dtype,
                              slot.cached() if slot is not None else None, blank)
        key = torch.cat([pk, key], dim=2)
        value = torch.cat([pv, value], dim=2)
        if attention_mask is not None:
            attention_mask = _extended_mask(attention_mask, pk.shape[2], blank)
    if base_impl == "eager":  # each modeling file has its own eager function
        fn = sys.modules[type(module).__module__].eager_attention_forward
    else:
        fn = ALL_ATTENTION_FUNCTIONS[base_impl]
    return fn(module, query, key, value, attention_mask, *args, **kwargs)


def _causal_prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             *args: Any, base_impl: str, **kwargs: Any) -> Any:
    """Decoders: the prefix before every sequence under the causal mask, one gate per query token.

    See ``unipelt/causal.py``: transformers may skip the causal mask (SDPA, no padding), and a
    per-token gate scales the prefix per query, which runs on head dims widened by the prefix length,
    or on the CPU as the backbone's own attention call merged with the prefix's by log-sum-exps."""
    slot = module.pelt_prefix_gate
    gate = slot.cached() if slot is not None else None  # (batch, tokens)
    if gate is not None and query.shape[2] == 1:  # one query (a generation step): scaling the prefix is exact
        kv = layer_prefix(module, key.dtype)  # keys and values scaled in one multiply (few ops per step)
        g = gate.view(-1, 1, 1, 1, 1)
        pk, pv = (kv * (g if g.dtype == kv.dtype else g.to(kv.dtype))).unbind(1)
        gate = None
    else:  # no blank slots here: under a causal mask 266 -> 272 keys ran slower (fwd + bwd, 1 thread)
        pk, pv = gated_prefix(module, query.shape[0], key.dtype, None)
    if kwargs.get("scaling") is None:  # widened head dims must keep the original scale
        kwargs["scaling"] = query.shape[-1] ** -0.5
    if base_impl == "sdpa" and can_merge(query, value, kwargs.get("dropout", 0.0)):
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = _additive(attention_mask, query.dtype)
        return merged_prefix_attention(query, key, value, attention_mask, pk, pv, gate, kwargs["scaling"]), None
    query, key, value, attention_mask = prefix_inputs(
        query, key, value, attention_mask, pk, pv, gate, causal=True, additive=base_impl == "eager",
        extend=_extended_mask)
    fn = sys.modules[type(module).__module__].eager_attention_forward if base_impl == "eager" \
        else ALL_ATTENTION_FUNCTIONS[base_impl]
    out, weights = fn(module, query, key, value, attention_mask, *args, **kwargs)
    return (out if gate is None else gated_output(out, gate, pv)), weights


for _base in BASE_IMPLEMENTATIONS:
    AttentionInterface.register(IMPL_PREFIX + _base, partial(prefix_attention_forward, base_impl=_base))
    AttentionMaskInterface.register(IMPL_PREFIX + _base, ALL_MASK_ATTENTION_FUNCTIONS[_base])


def _check_implementation(base: nn.Module, args: tuple, kwargs: dict) -> None:
    """Base-model pre-hook: the attention implementation must still be one that adds the prefix."""
    impl = base.config._attn_implementation
    if not impl.startswith(IMPL_PREFIX):
        choices = ", ".join(IMPL_PREFIX + b for b in BASE_IMPLEMENTATIONS)
        raise PELTError(f"the model's attention implementation is now {impl!r}, which drops the "
                        f"prefix; after apply_pelt use one of: {choices} "
                        f"(model.set_attn_implementation({IMPL_PREFIX + 'sdpa'!r}))")


def _own_config(model: nn.Module) -> None:
    """Give the model a config object of its own, so set_attn_implementation changes no one else's."""
    shared = model.config
    own = copy.deepcopy(shared)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = own


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
        if spec.explicit_attention is None:
            impl = model.config._attn_implementation or "eager"
            if impl not in BASE_IMPLEMENTATIONS:
                raise PELTError(f"prefix needs attention implementation sdpa or eager, the model "
                                f"uses {impl!r}")
            _own_config(model)
            model.set_attn_implementation(IMPL_PREFIX + impl)
            if model.config._attn_implementation != IMPL_PREFIX + impl:
                raise PELTError(f"{type(model).__name__} did not accept attention implementation "
                                f"{IMPL_PREFIX + impl!r}: the prefix would have no effect")
            model.base_model.register_forward_pre_hook(_check_implementation, with_kwargs=True)
        encoder = PrefixEncoder(d.layers, d.hidden, d.kv_heads, d.head_dim, self.length,
                                self.mid_dim, target.init_std)
        target.share(PREFIX_ATTR, encoder, make_static="unipelt.fold_prefix(model)")
        for i, layer in enumerate(target.layers):
            attention = layer.get_submodule(spec.attention)
            attention.pelt_prefix_layer = i
            attention.pelt_prefix_gate = target.gate(self.gate, i, "attention", "prefix")
            if self.gate and spec.explicit_attention is None:
                attention.register_forward_pre_hook(_fill_gate, with_kwargs=True)

    def saved_form(self, model: nn.Module) -> tuple[list[nn.Parameter], dict[str, torch.Tensor]]:
        """An unfolded prefix is saved (and counted, as the paper counts it) as its output, the static prefix."""
        encoder = prefix_encoder(model)
        if encoder.folded:
            return [], {}
        return list(encoder.parameters()), {_static_name(model): encoder.folded_value()}

    def load_saved_form(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        encoder = prefix_encoder(model)
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
