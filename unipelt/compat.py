"""Every private (or undocumented) name of transformers and torch that unipelt uses, each with why no
public API serves. Nothing else in unipelt reaches past a library's public API; ``tests/test_core_compat.py``
names any of these that the installed versions no longer have.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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
