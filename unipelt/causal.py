"""What decoders need beyond encoders: per-token gates, a prefix under a causal mask, positions from the mask.

Causal gates are per token: position t's gate is sigmoid(W h_t + b) of its own hidden state,
so it depends on tokens up to t only, keeps no state across forwards (the KV cache, beam
reordering and cache cropping need nothing from us) and does not depend on padding. The paper's
mean over the sequence would leak later tokens into earlier positions. docs/decoders.md says
why not a running mean.

A gated prefix scales its keys and values by the gate (as the paper does per example); with a
gate per query token that is a different scale per query, which one attention call computes
exactly on head dims widened by the prefix length L (not doubled): queries ``[q, g (q P_k^T)]``,
keys ``[k, 0]`` / prefix ``[0, I_L]``, values ``[v, 0]`` / ``[0, I_L]``. A prefix slot's score is then
``g q.p_k`` and the extra output channels are the prefix's attention weights ``a``, so
``out = out[:d] + g a P_v`` equals attention with key ``g p_k`` and value ``g p_v`` for that
query. Head dim 64 + 10 keeps CPU SDPA's flash kernel and costs ~1.15x plain attention; doubling
cost ~1.8x.
"""

from __future__ import annotations

import torch
from torch.nn.functional import pad
from transformers.integrations.sdpa_attention import repeat_kv


def causal_mask_like(query: torch.Tensor, key: torch.Tensor, additive: bool) -> torch.Tensor:
    """The causal mask transformers skips (``None``) when it can: query i sits at key position kv - q + i."""
    q_len, kv_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    allowed = rows >= torch.arange(kv_len, device=query.device)[None, :]
    if not additive:
        return allowed[None, None]
    mask = torch.zeros((q_len, kv_len), dtype=query.dtype, device=query.device)
    return mask.masked_fill(~allowed, torch.finfo(query.dtype).min)[None, None]


def extend_mask(mask: torch.Tensor, length: int, blank: int = 0) -> torch.Tensor:
    """Prepend ``length`` key positions to a 4D bool or additive mask: always attendable, except
    the last ``blank`` of them, which are never (blank slots that align the key count)."""
    boolean = mask.dtype == torch.bool
    pad = torch.full((*mask.shape[:-1], length), True if boolean else 0.0, dtype=mask.dtype,
                     device=mask.device)
    if blank:
        pad[..., length - blank:] = False if boolean else torch.finfo(mask.dtype).min
    return torch.cat([pad, mask], dim=-1)


def prefix_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    gate: torch.Tensor | None,
    causal: bool,
    additive: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(query, key, value, mask) for an attention call that sees the prefix before every sequence.

    ``prefix_key``/``prefix_value``: (batch, kv heads, length, head dim), already scaled by a
    per-example gate if any; ``gate``: (batch, query tokens) per-token gates or None.
    The prefix is never masked. With ``gate``, the output must go through ``gated_output``.
    """
    length = prefix_key.shape[2]
    if mask is None and causal and query.shape[2] > 1:
        mask = causal_mask_like(query, key, additive)  # transformers skipped it; is_causal would misalign
    if mask is not None:
        mask = extend_mask(mask, length)
    if gate is None:
        return query, torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2), mask
    g = gate[:, None, :, None].to(query.dtype)
    scores = query @ repeat_kv(prefix_key, query.shape[1] // key.shape[1]).transpose(-1, -2)  # (b, heads, t, L)
    query = torch.cat([query, scores * g], dim=-1)
    slots = _prefix_slots(key, length)  # the same rows serve keys and values when their head dims agree
    key = torch.cat([slots, pad(key, (0, length))], dim=2)
    value = torch.cat([slots if value.shape[-1] == slots.shape[-1] - length else _prefix_slots(value, length),
                       pad(value, (0, length))], dim=2)
    return query, key, value, mask


def _prefix_slots(like: torch.Tensor, length: int) -> torch.Tensor:
    """The prefix positions' rows ``[0, I_L]``: (batch, kv heads, L, head dim + L), a broadcast view."""
    eye = torch.eye(length, dtype=like.dtype, device=like.device)
    return pad(eye, (like.shape[-1], 0)).expand(*like.shape[:2], length, like.shape[-1] + length)


def gated_output(output: torch.Tensor, gate: torch.Tensor, prefix_value: torch.Tensor) -> torch.Tensor:
    """Undo the widened head dims: ``out[:d] + g * (a @ P_v)``; ``output``: (batch, tokens, heads, d + L),
    ``prefix_value``: (batch, kv heads, L, d) as given to ``prefix_inputs``."""
    length = prefix_value.shape[2]
    d = output.shape[-1] - length
    values = repeat_kv(prefix_value, output.shape[2] // prefix_value.shape[1])  # (batch, heads, L, d)
    weights = output[..., d:].transpose(1, 2)  # (batch, heads, tokens, L)
    prefix = (weights @ values).transpose(1, 2)
    return output[..., :d] + gate[:, :, None, None].to(output.dtype) * prefix


def positions_from_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """Position ids that count real tokens only (left padding does not shift them), for the last ``tokens``."""
    positions = mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -tokens:]
