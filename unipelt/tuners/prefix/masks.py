"""Attention masks widened by the prefix, built once per forward (every layer gets the same tensor)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...context import current


def extend_mask(mask: torch.Tensor, length: int, blank: int = 0) -> torch.Tensor:
    """Prepend ``length`` key positions to a 4D bool or additive mask: always attendable, except
    the last ``blank`` of them, which are never (blank slots that align the key count)."""
    boolean = mask.dtype == torch.bool
    pad = torch.full((*mask.shape[:-1], length), True if boolean else 0.0, dtype=mask.dtype,
                     device=mask.device)
    if blank:
        pad[..., length - blank:] = False if boolean else torch.finfo(mask.dtype).min
    return torch.cat([pad, mask], dim=-1)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as the additive mask in ``dtype`` that the CPU flash kernel takes."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def once_per_forward(mask: torch.Tensor, tag: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()``, derived from ``mask``, computed once per forward: every layer gets the same object."""
    masks = current().cache
    key = (*tag, id(mask))
    hit = masks.get(key)
    if hit is None or hit[0] is not mask:
        hit = masks[key] = (mask, build())  # holding ``mask`` keeps its id from being reused
    return hit[1]


def extended_mask(mask: torch.Tensor, length: int, blank: int = 0) -> torch.Tensor:
    """``extend_mask`` once per forward and mask (a padded generation step would build it per layer)."""
    return once_per_forward(mask, ("extended", length, blank), lambda: extend_mask(mask, length, blank))


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``additive_mask`` once per forward and mask."""
    return once_per_forward(mask, ("additive", dtype), lambda: additive_mask(mask, dtype))


def unmasked(query: torch.Tensor, keys: int) -> torch.Tensor:
    """An all-attendable boolean mask (1, 1, 1, keys), one per forward and key count."""
    masks = current().cache
    hit = masks.get(("unmasked", keys))
    if hit is None:
        hit = masks[("unmasked", keys)] = torch.ones(1, 1, 1, keys, dtype=torch.bool, device=query.device)
    return hit
