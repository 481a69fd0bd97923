"""Every private (or undocumented) name of transformers and torch that unipelt uses, each with why no
public API serves. Nothing else in unipelt reaches past a library's public API; ``tests/test_core_compat.py``
names any of these that the installed versions no longer have.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from torch import nn


def is_causal_lm(architecture: str) -> bool:
    """Whether a model class name (``LlamaForCausalLM``) is a transformers causal language model.

    ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: the table ``AutoModelForCausalLM`` builds from; transformers
    exports no function that answers this for a class name (a saved record holds only the name)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


@contextmanager
def no_init_weights() -> Iterator[None]:
    """Build modules without drawing random weights that a state dict overwrites next.

    ``transformers.initialization.no_init_weights``: what ``from_pretrained`` itself uses; transformers
    has no public way to build a model from a config without initialising it."""
    from transformers.initialization import no_init_weights as skip

    with skip():
        yield


def attn_implementation(config: Any) -> str | None:
    """The attention implementation a model's config says it uses (``"sdpa"``, ``"unipelt_sdpa"``...).

    ``PretrainedConfig._attn_implementation``: transformers sets it through the public
    ``set_attn_implementation`` but offers no public way to read it back."""
    return config._attn_implementation


def eager_attention(module: nn.Module) -> Callable[..., Any]:
    """The eager attention function of the modeling file that defines ``module``'s class.

    Each modeling file has its own ``eager_attention_forward`` (not registered in
    ``ALL_ATTENTION_FUNCTIONS``, which holds only the optimised implementations); the prefix wraps
    the family's own, so the eager path stays the family's."""
    return sys.modules[type(module).__module__].eager_attention_forward


@functools.cache
def deberta_v2_functions() -> ModuleType:
    """DeBERTa-v2's modeling file, for its position helpers (``build_relative_position``, ``build_rpos``,
    ``scaled_size_sqrt``): unipelt's explicit DeBERTa attention recomputes DeBERTa's scores with them,
    as DeBERTa calls no attention interface a prefix could go through."""
    from transformers.models.deberta_v2 import modeling_deberta_v2

    return modeling_deberta_v2


# torch's CPU flash attention that also returns each query's log-sum-exp (public SDPA returns only the
# output); the decoder prefix merges the backbone's attention with the prefix's through it and checks
# the kernel's contract once per process before using it (unipelt/tuners/prefix/causal.py).
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def version_counter(tensor: torch.Tensor) -> int:
    """How many times ``tensor`` was changed in place (``Tensor._version``): the prefix's eval cache must
    notice an optimizer step or a ``copy_`` into its weights; torch has no public version counter."""
    return tensor._version


def checkpoint_function(layer: nn.Module) -> Callable[..., Any] | None:
    """The activation-checkpointing function a transformers layer calls (``_gradient_checkpointing_func``,
    set by ``gradient_checkpointing_enable``), if set on the layer itself; unipelt wraps it so the
    recomputation runs in its forward's context. transformers offers no public hook for that."""
    return layer.__dict__.get("_gradient_checkpointing_func")


def set_checkpoint_function(layer: nn.Module, function: Callable[..., Any]) -> None:
    layer._gradient_checkpointing_func = function
