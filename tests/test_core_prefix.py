"""Prefix attention against a hand-computed reference; folding; parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from unipelt import (
    PRESETS,
    PELTConfig,
    PELTError,
    apply_pelt,
    count_trainable,
    fold_prefix,
    load_pelt_state_dict,
    pelt_state_dict,
)

try:  # works whether or not tests/ is a package
    from .test_core_model import batch, pelt, train_steps
except ImportError:
    from test_core_model import batch, pelt, train_steps


@pytest.mark.parametrize("preset", ["prefix", "unipelt_ap"])
def test_prefix_attention_equals_explicit_softmax_reference(make_tiny, preset):
    model = pelt(make_tiny, "bert", preset).eval()
    inputs = batch("bert", [7, 4])
    attention = model.bert.encoder.layer[0].attention.self
    captured = {}

    def grab_input(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]

    def grab_output(module, args, kwargs, output):
        captured["out"] = output[0]

    h1 = attention.register_forward_pre_hook(grab_input, with_kwargs=True)
    h2 = attention.register_forward_hook(grab_output, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        x = captured["hidden"]  # (B, T, H): the layer input
        batch_size, tokens, _ = x.shape
        heads, head_dim = 4, 8

        def split(t):
            return t.view(batch_size, -1, heads, head_dim).transpose(1, 2)

        q, k, v = (split(getattr(attention, n)(x)) for n in ("query", "key", "value"))
        enc = model.bert.pelt_prefix
        kv = enc.mlp(enc.embedding.weight).view(10, 2, 2, heads, head_dim)[:, 0]  # layer 0
        pk = kv[:, 0].permute(1, 0, 2).expand(batch_size, -1, -1, -1)
        pv = kv[:, 1].permute(1, 0, 2).expand(batch_size, -1, -1, -1)
        mask = inputs["attention_mask"].float()
        if preset == "unipelt_ap":  # gate: mean over real tokens of sigmoid(Wx + b)
            gate = attention.prefix_gate.proj
            per_token = torch.sigmoid(x @ gate.weight.T + gate.bias).squeeze(-1)
            g = ((per_token * mask).sum(1) / mask.sum(1)).view(-1, 1, 1, 1)
            pk, pv = pk * g, pv * g
        keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(head_dim)
        allowed = torch.cat([torch.ones(batch_size, 10), mask], 1).bool()  # prefix always allowed
        scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
        reference = (scores.softmax(-1) @ values).transpose(1, 2).reshape(batch_size, tokens, -1)
    h1.remove()
    h2.remove()
    torch.testing.assert_close(captured["out"], reference, rtol=1e-5, atol=1e-6)


def test_mask_functions_registered_for_our_implementations(make_tiny):
    """Without these, transformers builds no padding mask and padding is silently attended."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert "unipelt_sdpa" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    assert "unipelt_eager" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_folded_equals_unfolded_and_eval_caches(make_tiny, family):
    model = pelt(make_tiny, family, "unipelt_apl")
    train_steps(model, family, steps=2)
    inputs = batch(family, [7, 4])
    model.train()  # tiny configs have no dropout: train-mode forward is deterministic
    with torch.no_grad():
        unfolded = model(**inputs).logits
        model.eval()
        cached = model(**inputs).logits
        assert model.bert.pelt_prefix._cache is not None if family == "bert" else True
    assert torch.equal(cached, unfolded)
    before = count_trainable(model)
    fold_prefix(model)
    encoder = model.base_model.pelt_prefix
    assert encoder.folded and encoder.mlp is None and encoder.static.requires_grad
    assert count_trainable(model) == before
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, unfolded)
        assert torch.equal(model.train()(**inputs).logits, unfolded)
    train_steps(model, family, steps=1)  # a folded prefix keeps training as a plain parameter


def test_train_after_eval_trains_mlp_and_cache_follows_weights(make_tiny):
    model = pelt(make_tiny, "bert", "prefix")
    inputs = batch("bert", [6, 3])
    with torch.no_grad():
        first = model.eval()(**inputs).logits
    mlp_weight = model.bert.pelt_prefix.mlp[2].weight
    before = mlp_weight.detach().clone()
    train_steps(model, "bert", steps=1)  # calls model.train()
    assert not torch.equal(mlp_weight, before)
    with torch.no_grad():
        second = model.eval()(**inputs).logits
        model.train()
        fresh = model(**inputs).logits
    assert not torch.equal(first, second)
    assert torch.equal(second, fresh)
    with torch.no_grad():  # in-place edits in eval mode also invalidate the cache
        model.eval()
        mlp_weight.mul_(2)
        edited = model(**inputs).logits
        model.train()
        assert torch.equal(edited, model(**inputs).logits)


def test_unfolded_checkpoint_keeps_mlp_and_folded_is_smaller(make_tiny):
    model = pelt(make_tiny, "bert", "unipelt_apl")
    train_steps(model, "bert", steps=1)
    folded, unfolded = pelt_state_dict(model), pelt_state_dict(model, fold=False)
    assert "bert.pelt_prefix.static" in folded["weights"]
    assert "bert.pelt_prefix.mlp.2.weight" in unfolded["weights"]
    assert not model.bert.pelt_prefix.folded  # saving folded does not change the model
    size = lambda s: sum(t.numel() for t in s["weights"].values())  # noqa: E731
    assert size(folded) < size(unfolded)
    resumed = pelt(make_tiny, "bert", "unipelt_apl", seed=2)
    load_pelt_state_dict(resumed, unfolded)
    assert not resumed.bert.pelt_prefix.folded
    train_steps(resumed, "bert", steps=1)  # resumes training the MLP
    folded_model = fold_prefix(pelt(make_tiny, "bert", "unipelt_apl"))
    with pytest.raises(PELTError, match="unfolded prefix"):
        load_pelt_state_dict(folded_model, unfolded)
    with pytest.raises(PELTError, match="no prefix"):
        fold_prefix(pelt(make_tiny, "bert", "lora"))


# ---- parameter counts on bert-base size (meta device: no memory, no download) ----

@pytest.fixture(scope="module")
def bert_base_counts() -> dict[str, int]:
    counts = {}
    for preset in PRESETS:
        with torch.device("meta"):
            model = BertForSequenceClassification(BertConfig(num_labels=2))
        counts[preset] = count_trainable(apply_pelt(model, PELTConfig.preset(preset)))
    return counts


HEAD = 768 * 2 + 2


def test_bert_base_counts_match_paper_table_4(bert_base_counts):
    c = {k: v - HEAD for k, v in bert_base_counts.items()}
    assert c["adapter"] == 894_528
    assert c["prefix"] == 184_320
    assert c["lora"] == 294_912
    assert c["unipelt_apl"] == 1_410_672
    assert c["unipelt_apl"] - c["unipelt_apl_nogate"] == 48 * 769  # each gate 769
    assert c["unipelt_ap"] - c["unipelt_ap_nogate"] == 24 * 769
    assert c["unipelt_ap"] == 894_528 + 184_320 + 24 * 769
    assert c["bitfit"] == 102_912  # "103K": every bias of the backbone (LayerNorms included)
    assert bert_base_counts["finetune"] == 109_483_778
