"""The prefix through transformers' attention interface (every family but DeBERTa-v2).

Two registered implementations, ``unipelt_sdpa`` and ``unipelt_eager`` (each with its mask function:
without one transformers builds no padding mask for an unknown name and padding would be attended),
set with the public ``model.set_attn_implementation`` on a config of the model's own (a config
object the caller shares is never changed). Each puts the layer's prefix in front of the keys and
values and extends the mask so prefix positions are always attendable, then calls the backbone's own
attention function; decoders go to ``causal.causal_prefix_attention``. Switching the implementation
after ``apply_pelt`` to one without the prefix fails at the next forward.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ...compat import attn_implementation, eager_attention
from ...context import current
from ...errors import PELTError
from .causal import causal_prefix_attention
from .encoder import PREFIX_ATTR, gated_prefix
from .masks import extended_mask, unmasked

IMPL_PREFIX = "unipelt_"
BASE_IMPLEMENTATIONS = ("sdpa", "eager")
ALIGN = 16  # CPU flash attention runs 138 keys ~30 % slower than 144: blank prefix slots round the keys up


def _alignment(base_impl: str, key: torch.Tensor, length: int, dropout: float) -> int:
    """Blank prefix slots that round the key count up to a multiple of ``ALIGN``, where SDPA runs
    its CPU flash kernel. Not with attention dropout (CPU SDPA then runs the math path, whose cost
    grows with every key), nor on GPU (an explicit mask could move SDPA off its fastest kernel)."""
    if base_impl != "sdpa" or key.device.type != "cpu" or dropout:
        return 0
    return -(key.shape[2] + length) % ALIGN


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             *args: Any, base_impl: str, **kwargs: Any) -> Any:
    fn = eager_attention(module) if base_impl == "eager" else ALL_ATTENTION_FUNCTIONS[base_impl]
    if getattr(module, "pelt_prefix_layer", None) is not None and current().causal:
        return causal_prefix_attention(module, query, key, value, attention_mask, *args,
                                       base_impl=base_impl, base_fn=fn, **kwargs)
    if getattr(module, "pelt_prefix_layer", None) is not None:
        slot = module.pelt_prefix_gate
        blank = _alignment(base_impl, key, current().shared[PREFIX_ATTR].shape[-2], kwargs.get("dropout", 0.0))
        if blank and attention_mask is None:
            attention_mask = unmasked(query, key.shape[2])
        pk, pv = gated_prefix(module, query.shape[0], key.dtype,
                              slot.cached() if slot is not None else None, blank)
        key = torch.cat([pk, key], dim=2)
        value = torch.cat([pv, value], dim=2)
        if attention_mask is not None:
            attention_mask = extended_mask(attention_mask, pk.shape[2], blank)
    return fn(module, query, key, value, attention_mask, *args, **kwargs)


for _base in BASE_IMPLEMENTATIONS:
    AttentionInterface.register(IMPL_PREFIX + _base, partial(prefix_attention_forward, base_impl=_base))
    AttentionMaskInterface.register(IMPL_PREFIX + _base, ALL_MASK_ATTENTION_FUNCTIONS[_base])


def _check_implementation(base: nn.Module, args: tuple, kwargs: dict) -> None:
    """Base-model pre-hook: the attention implementation must still be one that adds the prefix."""
    impl = attn_implementation(base.config)
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


def use_prefix_attention(model: nn.Module) -> None:
    """Switch ``model`` (on a config of its own) to the implementation adding the prefix to its own."""
    impl = attn_implementation(model.config) or "eager"
    if impl not in BASE_IMPLEMENTATIONS:
        raise PELTError(f"prefix needs attention implementation sdpa or eager, the model uses {impl!r}")
    _own_config(model)
    model.set_attn_implementation(IMPL_PREFIX + impl)
    if attn_implementation(model.config) != IMPL_PREFIX + impl:
        raise PELTError(f"{type(model).__name__} did not accept attention implementation {IMPL_PREFIX + impl!r}: "
                        "the prefix would have no effect")
    model.base_model.register_forward_pre_hook(_check_implementation, with_kwargs=True)
