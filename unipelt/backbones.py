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

Prefix: through transformers' attention interface where the family calls it, else an
explicit attention module (``explicit_attention``: DeBERTa-v2's disentangled attention, see
``DebertaV2Attention``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
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
    # None: the family calls transformers' attention interface (the prefix goes through it);
    # else a module replacing the attention module whenever unipelt changes attention
    explicit_attention: Callable[[nn.Module], nn.Module] | None = None
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


# ------------------------------------------------------------------ DeBERTa-v2 / v3 prefix

class DebertaV2Attention(nn.Module):
    """DeBERTa-v2's disentangled self-attention written out, with prefix and per-example LoRA.

    DeBERTa does not call transformers' attention interface, so when unipelt changes its
    attention (prefix, LoRA) this module replaces it and recomputes DeBERTa's attention with
    the wrapped module's own projections, ``inner``. Two differences, both no-ops without
    unipelt's submodules:

    - Prefix keys take part in the *content* scores only: ``q . k_prefix / sqrt(d * f)`` with
      DeBERTa's scale (``f`` = 1 + the number of position terms). They have no position, so
      the content-to-position and position-to-content terms are zero for prefix columns;
      between real tokens every term is exactly DeBERTa's. Every query can attend the prefix.
    - With ``share_att_key`` the relative-position embeddings go through ``query_proj`` and
      ``key_proj`` too, so a gated LoRA on them gives each example its own position
      projections; DeBERTa's code repeats a single one over the batch, this one uses them.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                output_attentions: bool = False, query_states: torch.Tensor | None = None,
                relative_pos: torch.Tensor | None = None,
                rel_embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        from .tuners.prefix import prefix_for

        att = self.inner
        fns = sys.modules[type(att).__module__]
        if query_states is None:
            query_states = hidden_states
        heads = att.num_attention_heads
        batch, tokens = hidden_states.shape[:2]
        q = att.transpose_for_scores(att.query_proj(query_states), heads)  # (B*H, T, d)
        k = att.transpose_for_scores(att.key_proj(hidden_states), heads)
        v = att.transpose_for_scores(att.value_proj(hidden_states), heads)
        scale_factor = 1 + ("c2p" in att.pos_att_type) + ("p2c" in att.pos_att_type)
        scale = fns.scaled_size_sqrt(q, scale_factor).to(dtype=q.dtype)
        scores = torch.bmm(q, k.transpose(-1, -2) / scale)
        if att.relative_attention:
            scores = scores + self._position_bias(fns, q, k, relative_pos,
                                                  att.pos_dropout(rel_embeddings), scale_factor)
        scores = scores.view(batch, heads, scores.size(-2), scores.size(-1))
        scores = scores.masked_fill(~attention_mask.bool(), torch.finfo(q.dtype).min)
        values = v.view(batch, heads, tokens, -1)
        if getattr(att, "pelt_prefix_layer", None) is not None:
            pk, pv = prefix_for(att, hidden_states)  # (B, H, P, d) each
            q4 = q.view(batch, heads, -1, q.size(-1))
            scores = torch.cat([torch.matmul(q4, pk.transpose(-1, -2) / scale), scores], dim=-1)
            values = torch.cat([pv, values], dim=2)
        probs = att.dropout(nn.functional.softmax(scores, dim=-1))
        context = torch.matmul(probs, values).permute(0, 2, 1, 3).reshape(batch, tokens, -1)
        return context, (probs if output_attentions else None)

    def _position_bias(self, fns: Any, q: torch.Tensor, k: torch.Tensor,
                       relative_pos: torch.Tensor | None, rel_embeddings: torch.Tensor,
                       scale_factor: int) -> torch.Tensor:
        """DeBERTa's ``disentangled_attention_bias``, with per-example position projections."""
        att = self.inner
        heads = att.num_attention_heads
        if relative_pos is None:
            relative_pos = fns.build_relative_position(q, k, bucket_size=att.position_buckets,
                                                       max_position=att.max_relative_positions)
        if relative_pos.dim() == 2:
            relative_pos = relative_pos.unsqueeze(0).unsqueeze(0)
        elif relative_pos.dim() == 3:
            relative_pos = relative_pos.unsqueeze(1)
        span = att.pos_ebd_size
        relative_pos = relative_pos.to(device=q.device, dtype=torch.long)
        rel = rel_embeddings[0: span * 2, :].unsqueeze(0)

        def project(linear: nn.Module) -> torch.Tensor:
            pos = att.transpose_for_scores(linear(rel), heads)  # (1 or B) * H rows
            return pos if pos.size(0) == q.size(0) else pos.repeat(q.size(0) // heads, 1, 1)

        score = 0
        if "c2p" in att.pos_att_type:
            pos_key = project(att.key_proj if att.share_att_key else att.pos_key_proj)
            c2p = torch.bmm(q, pos_key.transpose(-1, -2))
            c2p_pos = torch.clamp(relative_pos + span, 0, span * 2 - 1)
            c2p = torch.gather(c2p, dim=-1, index=c2p_pos.squeeze(0).expand(
                [q.size(0), q.size(1), relative_pos.size(-1)]))
            score = score + c2p / fns.scaled_size_sqrt(pos_key, scale_factor).to(dtype=c2p.dtype)
        if "p2c" in att.pos_att_type:
            pos_query = project(att.query_proj if att.share_att_key else att.pos_query_proj)
            r_pos = fns.build_rpos(q, k, relative_pos, att.max_relative_positions, att.position_buckets)
            p2c_pos = torch.clamp(-r_pos + span, 0, span * 2 - 1)
            p2c = torch.bmm(k, pos_query.transpose(-1, -2))
            p2c = torch.gather(p2c, dim=-1, index=p2c_pos.squeeze(0).expand(
                [q.size(0), k.size(-2), k.size(-2)])).transpose(-1, -2)
            score = score + p2c / fns.scaled_size_sqrt(pos_query, scale_factor).to(dtype=p2c.dtype)
        return score


# ------------------------------------------------------------------ the table

_BERT = dict(layers="encoder.layer", attention="attention.self",
             projections={"query": "query", "key": "key", "value": "value"})

_DECODER = dict(layers="layers", attention="self_attn",
                projections={"query": "q_proj", "key": "k_proj", "value": "v_proj"},
                adapter=MLPOutput(), no_decay=("norm",), causal=True, summary_token="last")

BACKBONES: dict[str, BackboneSpec] = {
    "bert": BackboneSpec("bert", **_BERT, pooler="pooler"),
    "roberta": BackboneSpec("roberta", **_BERT, position_offset=_padding_offset),
    "xlm-roberta": BackboneSpec("xlm-roberta", **_BERT, position_offset=_padding_offset),
    "electra": BackboneSpec("electra", **_BERT),
    "distilbert": BackboneSpec(
        "distilbert", layers="transformer.layer", attention="attention",
        projections={"query": "q_lin", "key": "k_lin", "value": "v_lin"},
        adapter=PostLNSublayer(sublayer="ffn", norm="output_layer_norm"),
        no_decay=("layer_norm", "LayerNorm")),
    "deberta-v2": BackboneSpec(
        "deberta-v2", layers="encoder.layer", attention="attention.self",
        projections={"query": "query_proj", "key": "key_proj", "value": "value_proj"},
        explicit_attention=DebertaV2Attention),
    # Decoders (docs/decoders.md). GPT-2's c_attn is a Conv1D (weight (in, out)) giving [q; k; v].
    "llama": BackboneSpec("llama", **_DECODER),
    "mistral": BackboneSpec("mistral", **_DECODER),
    "qwen2": BackboneSpec("qwen2", **_DECODER),
    "qwen3": BackboneSpec("qwen3", **_DECODER),
    "gpt2": BackboneSpec("gpt2", layers="h", attention="attn", fused_qkv="c_attn", adapter=MLPOutput(),
                         no_decay=("ln_",), causal=True, summary_token="last"),
    "modernbert": BackboneSpec(
        "modernbert", layers="layers", attention="attn", fused_qkv="Wqkv", adapter=LayerOutput(),
        no_decay=("norm",)),
}


def spec_for(model_or_config: Any) -> BackboneSpec:
    """The spec of a model (or its config); an unsupported family names the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in BACKBONES:
        raise PELTError(f"unsupported model type {model_type!r}; supported families: "
                        f"{', '.join(BACKBONES)}")
    return BACKBONES[model_type]
