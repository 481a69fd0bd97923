"""The prefix in decoders: before every sequence, under the causal mask, scaled by per-token gates.

transformers may skip the causal mask (SDPA's ``is_causal`` stands in when nothing is padded); with a
prefix the keys no longer align with the queries, so the mask is built here. Causal gates are per
token (unipelt/context.py: no position's gate sees a later token).

A gated prefix scales its keys and values by the gate (as the paper does per example); with a
gate per query token that is a different scale per query, which one attention call computes
exactly on head dims widened by the prefix length L (not doubled): queries ``[q, g (q P_k^T)]``,
keys ``[k, 0]`` / prefix ``[0, I_L]``, values ``[v, 0]`` / ``[0, I_L]``. A prefix slot's score is then
``g q.p_k`` and the extra output channels are the prefix's attention weights ``a``, so
``out = out[:d] + g a P_v`` equals attention with key ``g p_k`` and value ``g p_v`` for that
query. Head dim 64 + 10 keeps CPU SDPA's flash kernel and costs ~1.15x plain attention; doubling
cost ~1.8x.

On the CPU, where torch's flash kernel also returns each query's log-sum-exp, ``merged_prefix_attention``
does better: the tokens' attention is exactly the backbone's call (``is_causal``, which skips the
blocks above the diagonal, head dim unchanged, grouped-query heads without copies), the prefix's L
scores are computed apart, and the two softmaxes are merged by their log-sum-exps. Same result as
the widened call; a 12-layer train step ~6 % faster (docs/decoders.md).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.functional import pad

from ...compat import FLASH_CPU, FLASH_CPU_BACKWARD
from .encoder import gated_prefix, layer_prefix
from .masks import additive, additive_mask, extend_mask, extended_mask

_FLASH_CPU = FLASH_CPU  # module attributes: a test replaces them with a kernel that breaks the contract
_FLASH_CPU_BACKWARD = FLASH_CPU_BACKWARD


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, n, d) -> (batch, kv_heads * groups, n, d): each key/value head serves ``groups``
    query heads (grouped-query attention), as transformers' own ``repeat_kv`` does."""
    if groups == 1:
        return states
    batch, heads, n, d = states.shape
    return states[:, :, None].expand(batch, heads, groups, n, d).reshape(batch, heads * groups, n, d)


def causal_mask(queries: int, like: torch.Tensor, additive: bool) -> torch.Tensor:
    """The (1, 1, queries, queries) causal mask that transformers skips (``None``) when SDPA's
    ``is_causal`` can stand in for it; bool, or additive in ``like``'s dtype."""
    allowed = torch.ones(1, 1, queries, queries, dtype=torch.bool, device=like.device).tril()
    return additive_mask(allowed, like.dtype) if additive else allowed


def without_empty_slots(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values for the queries when transformers passed no mask: it does so only when the
    keys are the queries' own (a square call) or, with more keys, at the prefill of an empty static
    cache, whose later slots are empty (its SDPA function drops them too)."""
    queries = query.shape[2]
    return (key, value) if key.shape[2] == queries else (key[:, :, :queries], value[:, :, :queries])


def prefix_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                  prefix_key: torch.Tensor, prefix_value: torch.Tensor, gate: torch.Tensor | None, causal: bool,
                  additive: bool, extend: Callable[[torch.Tensor, int], torch.Tensor] = extend_mask,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(query, key, value, mask) for an attention call that sees the prefix before every sequence.

    ``prefix_key``/``prefix_value``: (batch, kv heads, length, head dim), already scaled by a
    per-example gate if any; ``gate``: (batch, query tokens) per-token gates or None.
    The prefix is never masked. With ``gate``, the output must go through ``gated_output``.
    ``extend``: ``extend_mask`` or a function giving the same (a caller may compute it once per
    forward: every layer gets the same mask).
    """
    length = prefix_key.shape[2]
    if mask is None and causal and query.shape[2] > 1:  # transformers skipped it; is_causal would misalign
        key, value = without_empty_slots(query, key, value)
        mask = causal_mask(query.shape[2], query, additive)
    if mask is not None:
        mask = extend(mask, length)
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


def can_merge(query: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Whether ``merged_prefix_attention`` applies: CPU tensors; several queries (at one, a
    generation step, the kernel costs more than the copies it saves: 290 vs 112 us per layer);
    no attention dropout (the kernel's dropout is not exposed); equal key and value head dims; not
    while ``torch.compile`` traces (the widened call compiles to one graph; the private kernel and its
    check would break it); a torch build whose CPU flash kernel keeps the contract this path relies
    on (``kernel_checked``)."""
    return (query.shape[2] > 1 and query.device.type == "cpu" and not dropout
            and query.shape[-1] == value.shape[-1] and not torch.compiler.is_compiling() and kernel_checked())


@functools.cache
def kernel_checked() -> bool:
    """Once per process: torch's private CPU flash ops give, on tiny tensors with grouped-query heads,
    a causal call and an additive mask, the output, log-sum-exp and gradients of the written-out
    softmax. A build where they differ or are missing (torch's private API may change) keeps the
    widened call, which is exact too, and says so once."""
    if _FLASH_CPU is None or _FLASH_CPU_BACKWARD is None:
        return False
    try:
        # the first decoder forward may run under inference_mode (Lightning's predict) or autocast
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            generator = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, heads, 5, 8, generator=generator, requires_grad=True) for heads in (4, 2, 2))
            blocked = torch.zeros(1, 1, 5, 5).masked_fill(torch.rand(1, 1, 5, 5, generator=generator) < 0.3, -1e9)
            for causal, mask in ((True, None), (False, blocked)):
                scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3
                scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -1e9) if causal \
                    else scores + mask
                expected = _with_gradients(scores.softmax(-1) @ v.repeat_interleave(2, 1), scores.logsumexp(-1),
                                           q, k, v)
                got = _with_gradients(*_FlashWithLogsumexp.apply(q, k, v, mask, causal, 0.3), q, k, v)
                if not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, expected, strict=True)):
                    raise ValueError("results differ")
        return True
    except Exception as error:  # noqa: BLE001 - any failure of a private op means: do not use it
        warnings.warn(f"unipelt: torch {torch.__version__}'s CPU flash attention does not behave as the fast "
                      f"decoder prefix path needs ({error}); using the general path", stacklevel=2)
        return False


def _with_gradients(out: torch.Tensor, lse: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """``[out, lse, d/d inputs]`` of a loss that reaches both outputs."""
    loss = out.sin().sum() + (lse * torch.arange(lse.numel(), dtype=lse.dtype).view_as(lse)).sum()
    return [out, lse, *torch.autograd.grad(loss, inputs)]


class _FlashWithLogsumexp(torch.autograd.Function):
    """Attention output and its log-sum-exp per query, both differentiable, from torch's CPU flash kernel.

    The kernel's backward takes only the output's gradient: it forms ``ds = p * (dO.v - D)`` with
    ``D = rowsum(dO * O)``. A log-sum-exp gradient ``c`` adds ``c * p`` to ``ds``, i.e. lowers ``D``
    by ``c``; passing ``O' = O - c dO / |dO|^2`` (so that ``dO.O' = D - c``) gets it exactly from the
    same kernel. Rows with ``dO = 0`` keep ``O``: their ``c`` is 0 too (``c`` only reaches a row's
    own output, through the merge weight that also scales ``dO``)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, causal: bool, scale: float):
        out, lse = _FLASH_CPU(query, key, value, 0.0, causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(query, key, value, out, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse, mask = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if grad_lse is not None:
            squared = grad_out.float().square().sum(-1, keepdim=True)
            shift = torch.where(squared > 0, grad_lse[..., None] / squared.clamp(min=torch.finfo(torch.float).tiny), 0)
            out = torch.addcmul(out.float(), shift, grad_out.float(), value=-1).to(out.dtype)
        grads = _FLASH_CPU_BACKWARD(grad_out, query, key, value, out, lse, 0.0, ctx.causal,
                                    attn_mask=mask, scale=ctx.scale)
        return *grads, None, None, None


def merged_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                            prefix_key: torch.Tensor, prefix_value: torch.Tensor, gate: torch.Tensor | None,
                            scale: float) -> torch.Tensor:
    """Attention over ``[g p; tokens]`` per query as two softmaxes merged by their log-sum-exps:
    ``out = w o_tokens + (1 - w) g softmax(g q P_k^T) P_v``, ``w = sigmoid(lse_tokens - lse_prefix)``.

    ``mask``: transformers' 4D SDPA mask over the tokens only (bool, or additive in the query dtype,
    which saves a conversion per layer), or None (causal: the kernel's ``is_causal``).
    ``gate``: (batch, queries) or None.
    Returns (batch, queries, heads, head dim), as transformers' attention functions do.
    """
    if torch.is_autocast_enabled(query.device.type):  # as autocast casts SDPA's inputs (the kernel is not listed)
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    causal = mask is None
    if causal:
        key, value = without_empty_slots(query, key, value)
    elif mask.dtype != query.dtype:
        mask = additive_mask(mask, query.dtype)
    tokens, lse = _FlashWithLogsumexp.apply(query, key, value, mask, causal, scale)
    groups = query.shape[1] // prefix_key.shape[1]
    scores = query @ repeat_kv(prefix_key, groups).transpose(-1, -2) * scale  # (batch, heads, queries, L)
    g = None if gate is None else gate[:, None, :, None].to(query.dtype)
    if g is not None:
        scores = scores * g
    prefix_lse = scores.logsumexp(-1, keepdim=True)
    w = torch.sigmoid(lse[..., None] - prefix_lse.float()).to(query.dtype)
    weights = torch.exp(scores - prefix_lse) * (1 - w if g is None else (1 - w) * g)
    out = torch.addcmul(weights @ repeat_kv(prefix_value, groups), w, tokens)
    return out.transpose(1, 2).contiguous()


def causal_prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            *args: Any, base_impl: str, base_fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Decoders: the prefix before every sequence under the causal mask, one gate per query token.

    Transformers may skip the causal mask (SDPA, no padding), and a per-token gate scales the prefix
    per query, which runs on head dims widened by the prefix length (``base_fn``, the backbone's own
    attention function, on ``prefix_inputs``), or on the CPU as the backbone's own attention call
    merged with the prefix's by log-sum-exps (module docstring)."""
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
            attention_mask = additive(attention_mask, query.dtype)
        return merged_prefix_attention(query, key, value, attention_mask, pk, pv, gate, kwargs["scaling"]), None
    query, key, value, attention_mask = prefix_inputs(
        query, key, value, attention_mask, pk, pv, gate, causal=True, additive=base_impl == "eager",
        extend=extended_mask)
    out, weights = base_fn(module, query, key, value, attention_mask, *args, **kwargs)
    return (out if gate is None else gated_output(out, gate, pv)), weights
