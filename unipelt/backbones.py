"""One table of backbone families: the only place that names a backbone's modules.

Each ``BackboneSpec`` says where unipelt finds what it touches in one family: the list of
layers, the self-attention module and its q/k/v projections (separate Linears or one fused
``Wqkv``), the key/value heads and head size, where the adapter goes, how the prefix reaches
the attention scores, which parameters take no weight decay and the position-id offset.
Adding a family is one entry here; nothing else in the package changes.

Adapter sites (the Pfeiffer placement, which the paper uses, adapted to each block shape):

- ``PostLNOutput``: BERT's FFN output block ``y = LN(dropout(dense(f)) + x)``.
- ``PostLNSublayer``: the same computation split across the layer (DistilBERT: the layer
  computes ``LN(ffn(x) + x)``).
- ``LayerOutput``: a pre-norm block whose last operation is the MLP residual
  ``y = r + mlp(norm(r))`` (ModernBERT); the adapter reads and adds to ``y``.

IA3 sites (``IA3Sites``): the projections (IA)^3 scales, PEFT's default targets for the family where it
has one (``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING``), the analogous ones where it has none.
FFN sites (``FFNModule``, ``FFNSplit``): where the parallel adapter reads the FFN's input and adds to
its output.

Prefix: through transformers' attention interface where the family calls it, else an
explicit attention module that ``explicit_attention`` names (``"deberta-v2"``: DeBERTa-v2's
disentangled attention, in unipelt/tuners/prefix/deberta.py). This file holds data only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import PELTError


@dataclass(frozen=True)
class PostLNOutput:
    """``block(f, x) = norm(dropout(dense(f)) + x)``; the names are the block's children."""

    block: str = "output"
    dense: str = "dense"
    dropout: str = "dropout"
    norm: str = "LayerNorm"


@dataclass(frozen=True)
class PostLNSublayer:
    """The layer computes ``norm(sublayer(x) + x)``: ``sublayer`` and ``norm`` are the layer's children."""

    sublayer: str
    norm: str


@dataclass(frozen=True)
class MLPOutput:
    """Pre-norm decoder block ``r + mlp(norm(r))``: the adapter reads the MLP's output ``h`` and
    adds to it before the residual, ``h + g * adapter(h)``; ``mlp`` is the layer's child."""

    mlp: str = "mlp"


@dataclass(frozen=True)
class LayerOutput:
    """Pre-norm block whose last operation is the MLP residual: the adapter follows the layer."""


@dataclass(frozen=True)
class IA3Sites:
    """Where (IA)^3 scales, as paths from a layer: ``outputs`` are projections whose output it scales
    (keys and values, or a fused q/k/v projection), ``inputs`` projections whose input it scales (the
    FFN's down projection: its input is the intermediate activation)."""

    outputs: tuple[str, ...]
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class FFNModule:
    """The FFN is one module ``h = ffn(x)`` (``path`` from the layer)."""

    path: str


@dataclass(frozen=True)
class FFNSplit:
    """Post-LN BERT: the FFN is ``intermediate(x)`` then the output block ``LN(dropout(dense(f)) + x)``,
    which receives the FFN's input ``x`` as its residual (second) argument."""

    block: str = "output"


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int


def _no_offset(config: Any) -> int:
    return 0


def _padding_offset(config: Any) -> int:
    """RoBERTa numbers positions from ``padding_idx + 1``."""
    return int(config.pad_token_id or 0) + 1


@dataclass(frozen=True)
class BackboneSpec:
    family: str
    layers: str  # from the base model to the ModuleList of layers
    attention: str  # from a layer to the self-attention module
    projections: dict[str, str] = field(default_factory=dict)  # "query"/"key"/"value" -> Linear
    fused_qkv: str | None = None  # one Linear giving [q; k; v] (then ``projections`` is empty)
    adapter: PostLNOutput | PostLNSublayer | LayerOutput | MLPOutput = PostLNOutput()
    ia3: IA3Sites | None = None
    ffn: FFNModule | FFNSplit = FFNSplit()
    # None: the family calls transformers' attention interface (the prefix goes through it); else
    # the name of explicit attention code (unipelt.tuners.EXPLICIT_ATTENTION) that replaces the
    # attention module whenever unipelt changes attention
    explicit_attention: str | None = None
    no_decay: tuple[str, ...] = ("LayerNorm",)  # besides every bias
    # Decoders: gates per token (no position sees a later one), the prefix under the causal mask,
    # positions from the attention mask, the language-modelling head frozen (docs/decoders.md).
    causal: bool = False
    position_offset: Callable[[Any], int] = _no_offset
    # heads (unipelt/heads.py): a pooler inside the backbone (frozen for PELT methods; the
    # ``pooler_trainable`` head trains it) and the token a one-token head reads ("first": [CLS];
    # "last": the last real token, for causal models)
    pooler: str | None = None
    summary_token: str = "first"

    def dims(self, config: Any) -> Dims:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or getattr(config, "attention_head_size", None) \
            or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return Dims(config.hidden_size, config.num_hidden_layers, heads, kv_heads, head_dim)

    def decays(self, parameter_name: str) -> bool:
        """Whether AdamW's weight decay applies (not to biases nor normalisation weights)."""
        return not (parameter_name.endswith("bias") or any(n in parameter_name for n in self.no_decay))

    def max_input_length(self, config: Any) -> int:
        """Longest input the position embeddings allow (2**30 when they do not limit it)."""
        limit = int(getattr(config, "max_position_embeddings", 0) or 0)
        limit -= self.position_offset(config) if limit else 0
        return limit if limit > 0 else 1 << 30

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.get_submodule(self.layers)

    def qkv_slices(self, config: Any) -> dict[str, slice]:
        """Output columns of q, k and v in the fused projection."""
        d = self.dims(config)
        q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
        return {"query": slice(0, q), "key": slice(q, q + kv), "value": slice(q + kv, q + 2 * kv)}


# ------------------------------------------------------------------ the table

# PEFT's IA3 targets for BERT are ["key", "value", "output.dense"] with "output.dense" feed-forward; its
# suffix match makes "output.dense" hit the attention's output projection too: both scaled at their input.
_BERT_IA3 = IA3Sites(outputs=("attention.self.key", "attention.self.value"),
                     inputs=("attention.output.dense", "output.dense"))
_BERT = dict(layers="encoder.layer", attention="attention.self",
             projections={"query": "query", "key": "key", "value": "value"}, ia3=_BERT_IA3)

_DECODER = dict(layers="layers", attention="self_attn",
                projections={"query": "q_proj", "key": "k_proj", "value": "v_proj"},
                adapter=MLPOutput(), ffn=FFNModule("mlp"), no_decay=("norm",), causal=True, summary_token="last",
                ia3=IA3Sites(outputs=("self_attn.k_proj", "self_attn.v_proj"), inputs=("mlp.down_proj",)))
# PEFT scales Qwen's queries, not its keys
_QWEN_IA3 = IA3Sites(outputs=("self_attn.q_proj", "self_attn.v_proj"), inputs=("mlp.down_proj",))

BACKBONES: dict[str, BackboneSpec] = {
    "bert": BackboneSpec("bert", **_BERT, pooler="pooler"),
    "roberta": BackboneSpec("roberta", **_BERT, position_offset=_padding_offset),
    "xlm-roberta": BackboneSpec("xlm-roberta", **_BERT, position_offset=_padding_offset),
    "electra": BackboneSpec("electra", **_BERT),
    # PEFT has no IA3 default for DistilBERT, ModernBERT, ELECTRA, XLM-R: keys, values and the FFN's down
    # projection (ELECTRA, XLM-R: BERT's layout, BERT's targets; ModernBERT: its fused Wqkv, as GPT-2's c_attn)
    "distilbert": BackboneSpec(
        "distilbert", layers="transformer.layer", attention="attention",
        projections={"query": "q_lin", "key": "k_lin", "value": "v_lin"},
        adapter=PostLNSublayer(sublayer="ffn", norm="output_layer_norm"), ffn=FFNModule("ffn"),
        ia3=IA3Sites(outputs=("attention.k_lin", "attention.v_lin"), inputs=("ffn.lin2",)),
        no_decay=("layer_norm", "LayerNorm")),
    "deberta-v2": BackboneSpec(
        "deberta-v2", layers="encoder.layer", attention="attention.self",
        projections={"query": "query_proj", "key": "key_proj", "value": "value_proj"},
        ia3=IA3Sites(outputs=("attention.self.key_proj", "attention.self.value_proj"),
                     inputs=("attention.output.dense", "output.dense")),
        explicit_attention="deberta-v2"),
    # Decoders (docs/decoders.md). GPT-2's c_attn is a Conv1D (weight (in, out)) giving [q; k; v].
    "llama": BackboneSpec("llama", **_DECODER),
    "mistral": BackboneSpec("mistral", **_DECODER),
    "qwen2": BackboneSpec("qwen2", **{**_DECODER, "ia3": _QWEN_IA3}),
    "qwen3": BackboneSpec("qwen3", **{**_DECODER, "ia3": _QWEN_IA3}),
    # IA3 as PEFT: all of c_attn's output (q, k and v), the input of the MLP's c_proj
    "gpt2": BackboneSpec("gpt2", layers="h", attention="attn", fused_qkv="c_attn", adapter=MLPOutput(),
                         ffn=FFNModule("mlp"), ia3=IA3Sites(outputs=("attn.c_attn",), inputs=("mlp.c_proj",)),
                         no_decay=("ln_",), causal=True, summary_token="last"),
    "modernbert": BackboneSpec(
        "modernbert", layers="layers", attention="attn", fused_qkv="Wqkv", adapter=LayerOutput(),
        ffn=FFNModule("mlp"), ia3=IA3Sites(outputs=("attn.Wqkv",), inputs=("mlp.Wo",)), no_decay=("norm",)),
}


def spec_for(model_or_config: Any) -> BackboneSpec:
    """The spec of a model (or its config); an unsupported family names the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in BACKBONES:
        raise PELTError(f"unsupported model type {model_type!r}; supported families: "
                        f"{', '.join(BACKBONES)}")
    return BACKBONES[model_type]
