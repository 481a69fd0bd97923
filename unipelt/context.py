"""The per-forward context: what every injected module of one model needs for one batch.

A ``ForwardContext`` is built when the base model's forward starts (a forward pre-hook) and
made current in a ``ContextVar`` until it ends (a forward hook that also runs on errors):
the token weights of the gates (the attention mask, normalised per example), what tuners
compute once per forward for every layer (``shared``: the prefix network's keys and values),
and a cache of the gate values computed so far. Nothing of a batch is stored on a module, so nested
forwards and two models in one process never see each other's batch, and nothing outlives
the forward except the autograd graph and the detached gate values kept for
``gate_values()``.

Activation checkpointing replays a layer during the backward pass, after the context has
been left. ``bind_checkpointing`` wraps the layers' checkpoint function so the replay runs
inside a *replay* of its own forward's context (same mask and shared tensors, fresh gate cache: the
replay must recompute every tensor the first pass saved).

Under ``torch.compile`` (Dynamo cannot trace ``ContextVar.get``) the context lives on a plain list
while tracing (``Stack``): Dynamo keeps that list's mutations symbolic, so the compiled model reads
the context it entered and a whole encoder compiles to one graph (with the ContextVar, 27); eager
forwards keep the ContextVar (thread and task safety). The pooling heads keep their per-forward
frame on a ``Stack`` too (unipelt/heads.py).

Gate reduction (``reduce``) is the one place that knows how per-token gate values become a
scale: the mean over real tokens, one value per example (encoders), or with ``causal`` one
gate per token, so that no position's gate sees a later token and a KV cache needs no gate
state (decoders; ``BackboneSpec.causal``; why not a running mean: docs/decoders.md).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from functools import partial
from typing import Any

import torch
from torch import nn

from .compat import checkpoint_function, set_checkpoint_function
from .errors import PELTError


class Stack:
    """What the forwards now running keep for themselves, innermost last (one stack per kind of state).

    In eager a ``ContextVar`` holds it (thread- and task-safe); while Dynamo traces, a plain list
    (Dynamo cannot trace ``ContextVar.get``/``set`` and breaks the graph there; it keeps a list's
    mutations symbolic, so the compiled model reads what it pushed)."""

    def __init__(self, name: str) -> None:
        self._var: ContextVar[tuple[Any, ...]] = ContextVar(name, default=())
        self.traced: list[Any] = []

    def top(self) -> Any:
        if torch.compiler.is_compiling():
            return self.traced[-1] if self.traced else None
        entries = self._var.get()
        return entries[-1] if entries else None

    def push(self, entry: Any) -> None:
        if torch.compiler.is_compiling():
            self.traced.append(entry)
        else:
            self._var.set((*self._var.get(), entry))

    def pop(self) -> Any:
        if torch.compiler.is_compiling():
            return self.traced.pop()
        entries = self._var.get()
        self._var.set(entries[:-1])
        return entries[-1]


class ForwardContext:
    """State of one forward of one model; see the module docstring."""

    __slots__ = ("owner", "weights", "shared", "make_static", "causal", "gates", "record", "cache", "task")

    def __init__(self, owner: int, token_weights: torch.Tensor | Callable[[], torch.Tensor],
                 shared: dict[str, torch.Tensor] | None = None, causal: bool = False,
                 make_static: dict[str, str] | None = None, task: int | None = None) -> None:
        self.owner = owner  # id() of the base model whose forward this is
        self.causal = causal  # decoders: gates stay per token
        self.task = task  # a multi-task model: the index of this batch's task (its gates and head)
        self.weights = token_weights  # or a function computing them: decoders need them only on request
        # what a tuner computes once per forward for every layer (``Target.share``): the prefix network's output
        self.shared: dict[str, torch.Tensor] = shared or {}
        self.make_static = make_static or {}  # shared name -> how a user makes it a parameter
        self.gates: dict[nn.Module, torch.Tensor] = {}  # gate bank -> (batch, n), with grad
        self.record: dict[nn.Module, torch.Tensor] = {}  # the same, detached: gate_values() (per token if causal)
        self.cache: dict[object, Any] = {}  # tensors derived once per forward (extended masks, per-layer prefixes)

    @property
    def token_weights(self) -> torch.Tensor:
        """(batch, tokens), rows sum to 1 over real tokens."""
        if callable(self.weights):
            self.weights = self.weights()
        return self.weights

    def reduce(self, per_token: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, n) per-token gates -> (batch, n): the mean over real tokens; causal
        models keep one gate per token (a position's gate reads that position only)."""
        if self.causal:
            return per_token
        weights = self.token_weights
        return _token_mean(per_token, weights if weights.dtype == per_token.dtype else weights.to(per_token.dtype))

    def per_example(self, gates: torch.Tensor) -> torch.Tensor:
        """What gate_values() reports: (batch, n); per-token gates averaged over real tokens."""
        return per_example(gates, self.token_weights)

    def replay(self) -> ForwardContext:
        """The same batch with an empty gate cache, for a checkpointed layer's recomputation."""
        ctx = ForwardContext(self.owner, self.weights, self.shared, self.causal, self.make_static, self.task)
        ctx.record = self.record
        return ctx


def per_example(gates: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """(batch, n) gates as they are; (batch, tokens, n) per-token gates averaged over real tokens."""
    if gates.dim() == 2:
        return gates
    return _token_mean(gates.float(), token_weights.float())


def _token_mean(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, n) weighted by (batch, tokens) -> (batch, n). bmm, not einsum: one op, 10 vs
    27 us a call at 1 x 32 (einsum plans and permutes); ~3 % of a batch-1 MiniLM forward (12 gate banks)."""
    return torch.bmm(weights.unsqueeze(1), per_token).squeeze(1)


FORWARDS = Stack("unipelt_forward_context")  # the ForwardContexts of the base models now running
# A multi-task model's forward (``model(**batch, task=...)``): (id of its base model, the task's index).
TASKS = Stack("unipelt_task")


def task_of(owner: int) -> int | None:
    """The task index the running forward of base model ``owner`` was called with (None: single-task)."""
    entry = TASKS.top()
    return entry[1] if entry is not None and entry[0] == owner else None


def current() -> ForwardContext:
    ctx = FORWARDS.top()
    if ctx is None:
        raise PELTError("a unipelt module was called outside its model's forward "
                        "(call the model, not one of its layers)")
    return ctx


def enter(ctx: ForwardContext) -> None:
    FORWARDS.push(ctx)


def leave(owner: int | None = None) -> ForwardContext | None:
    """Leave the current context (``owner``'s only: a forward that failed before entering its
    own context leaves nothing)."""
    ctx = FORWARDS.top()
    if ctx is None or (owner is not None and ctx.owner != owner):
        return None
    return FORWARDS.pop()


def check_mask(mask: torch.Tensor | None) -> None:
    if mask is not None and mask.dim() != 2:
        raise PELTError(f"unipelt needs a 2D (batch, tokens) attention_mask of 0/1, got shape "
                        f"{tuple(mask.shape)}")


def token_weights(mask: torch.Tensor | None, shape: tuple[int, int], device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """The attention mask as weights summing to 1 per example (uniform without a mask);
    ``shape``: (batch, tokens) of this forward's input."""
    batch, tokens = shape
    if mask is None:
        return torch.full((batch, tokens), 1.0 / tokens, dtype=dtype, device=device)
    check_mask(mask)
    weights = mask[:, -tokens:].to(dtype)  # with a KV cache the mask also covers past tokens
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=1)


def positions_from_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """Position ids that count real tokens only (left padding does not shift them), for the last ``tokens``."""
    positions = mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -tokens:]


class _InContext:
    """A layer's checkpoint function that replays the layer inside its forward's context."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        ctx = current()
        trained = [name for name, value in ctx.shared.items() if value.grad_fn is not None]
        if trained and _reentrant(self.inner, kwargs):
            raise PELTError(f"activation checkpointing with use_reentrant=True runs each layer's backward on its own "
                            f"and cannot reach {trained[0]!r}, which all layers share; use use_reentrant=False "
                            f"(the default) or make it static first ({ctx.make_static[trained[0]]})")
        return self.inner(partial(_run_in, ctx, function), *args, **kwargs)


def _reentrant(func: Callable[..., Any], kwargs: dict) -> bool:
    keywords = getattr(func, "keywords", None) or {}
    return bool(kwargs.get("use_reentrant", keywords.get("use_reentrant", False)))


def _run_in(ctx: ForwardContext, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``function`` (the first pass or its recomputation) in a fresh replay of ``ctx``."""
    enter(ctx.replay())
    try:
        return function(*args, **kwargs)
    finally:
        leave()


def bind_checkpointing(layers: nn.ModuleList) -> None:
    """Make activation checkpointing (``gradient_checkpointing_enable()``) replay in context.

    transformers' ``GradientCheckpointingLayer`` calls its checkpoint function (unipelt/compat.py);
    enabling checkpointing (at any time, before or after ``apply_pelt``) sets it, so this
    runs at the start of each training forward: a few attribute reads when nothing changed.
    """
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            func = checkpoint_function(layer)
            if func is not None and not isinstance(func, _InContext):
                set_checkpoint_function(layer, _InContext(func))
