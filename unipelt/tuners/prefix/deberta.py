"""DeBERTa-v2's disentangled self-attention written out, with the prefix and per-example LoRA.

DeBERTa does not call transformers' attention interface, so when unipelt changes its attention
(prefix, LoRA) ``DebertaV2Attention`` replaces it (``BackboneSpec.explicit_attention = "deberta-v2"``)
and recomputes DeBERTa's attention with the wrapped module's own projections and DeBERTa's own
position helpers (unipelt/compat.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...compat import deberta_v2_functions
from .encoder import prefix_for

# transformers' DeBERTa-v2 modeling file (its position helpers), looked up when a layer is built: forward reads
# a plain global, so torch.compile traces no cached call (dynamo warns about those).
_DEBERTA: Any = None


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
        global _DEBERTA
        _DEBERTA = deberta_v2_functions()

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                output_attentions: bool = False, query_states: torch.Tensor | None = None,
                relative_pos: torch.Tensor | None = None,
                rel_embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        att = self.inner
        fns = _DEBERTA
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
