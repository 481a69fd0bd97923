"""One table: where each encoder family keeps the modules unipelt touches.

Adding a family is one entry, provided its layers look like BERT's: a self-attention
module that calls ``ALL_ATTENTION_FUNCTIONS`` with Linear ``query``/``key``/``value``
children, and an FFN-output module with ``dense``, ``dropout`` and ``LayerNorm`` computing
``LayerNorm(dropout(dense(h)) + x)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import PELTError


@dataclass(frozen=True)
class Family:
    layers: str  # from the base model (model.base_model) to the ModuleList of layers
    self_attention: str  # from a layer to the module holding query/key/value
    ffn_output: str  # from a layer to the FFN output block (dense -> dropout -> LayerNorm(+x))


_BERT_LIKE = Family(layers="encoder.layer", self_attention="attention.self", ffn_output="output")

ARCHITECTURES: dict[str, Family] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
}


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise PELTError(
            f"unsupported model type {model_type!r}; supported families: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def layers_of(model: nn.Module) -> nn.ModuleList:
    return model.base_model.get_submodule(family_of(model).layers)
