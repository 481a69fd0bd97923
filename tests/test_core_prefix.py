"""Prefix attention against hand-computed references; folding; config sharing; parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import unipelt.tuners.prefix.attention as prefix_module
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
    from .test_core_model import batch, pelt, tiny, train_steps
except ImportError:
    from test_core_model import batch, pelt, tiny, train_steps

HEADS, HEAD_DIM, LENGTH = 4, 8, 10


def capture(module: torch.nn.Module, model: torch.nn.Module, inputs: dict) -> dict:
    """The module's positional/keyword inputs and its output in one eval forward."""
    seen = {}

    def pre(m, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    def post(m, args, kwargs, output):
        seen["out"] = output[0]

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True),
               module.register_forward_hook(post, with_kwargs=True)]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return seen


def prefix_kv(model: torch.nn.Module, layer: int, x: torch.Tensor, mask: torch.Tensor, gated: bool):
    """Layer ``layer``'s prefix keys/values from the MLP, scaled by the hand-computed gate."""
    enc = model.base_model.pelt_prefix
    n_layers = model.config.num_hidden_layers
    kv = enc.mlp(enc.embedding.weight).view(LENGTH, n_layers, 2, HEADS, HEAD_DIM)[:, layer]
    pk = kv[:, 0].permute(1, 0, 2).expand(x.shape[0], -1, -1, -1)
    pv = kv[:, 1].permute(1, 0, 2).expand(x.shape[0], -1, -1, -1)
    if gated:  # mean over real tokens of sigmoid(Wx + b), the prefix row of the layer's bank
        bank = model.base_model.get_submodule(
            {"bert": "encoder.layer", "deberta-v2": "encoder.layer", "modernbert": "layers"}[
                model.config.model_type])[layer].pelt_gates["attention"]
        row = bank.keys.index("prefix")
        per_token = torch.sigmoid(x @ bank.proj.weight[row] + bank.proj.bias[row])
        g = ((per_token * mask).sum(1) / mask.sum(1)).view(-1, 1, 1, 1)
        pk, pv = pk * g, pv * g
    return pk, pv


def softmax_attention(scores, q_keys_allowed, values):
    scores = scores.masked_fill(~q_keys_allowed, float("-inf"))
    return scores.softmax(-1) @ values


@pytest.mark.parametrize("preset", ["prefix", "unipelt_ap"])
def test_prefix_attention_equals_explicit_softmax_reference_bert(preset):
    model = pelt("bert", preset).eval()
    inputs = batch("bert", [7, 4])
    attention = model.bert.encoder.layer[0].attention.self
    seen = capture(attention, model, inputs)
    with torch.no_grad():
        x = seen["args"][0]  # (B, T, H): the layer input
        batch_size, tokens, _ = x.shape

        def split(t):
            return t.view(batch_size, -1, HEADS, HEAD_DIM).transpose(1, 2)

        q, k, v = (split(getattr(attention, n)(x)) for n in ("query", "key", "value"))
        mask = inputs["attention_mask"].float()
        pk, pv = prefix_kv(model, 0, x, mask, gated=preset == "unipelt_ap")
        scores = q @ torch.cat([pk, k], 2).transpose(-1, -2) / math.sqrt(HEAD_DIM)
        allowed = torch.cat([torch.ones(batch_size, LENGTH), mask], 1).bool()[:, None, None, :]
        reference = softmax_attention(scores, allowed, torch.cat([pv, v], 2))
        reference = reference.transpose(1, 2).reshape(batch_size, tokens, -1)
    torch.testing.assert_close(seen["out"], reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["prefix", "unipelt_ap"])
def test_prefix_attention_equals_reference_deberta_v2(preset):
    """Content scores and DeBERTa's own relative-position bias between tokens; prefix columns
    get content scores only, with DeBERTa's scale sqrt(d * 3)."""
    model = pelt("deberta-v2", preset).eval()
    inputs = batch("deberta-v2", [7, 4])
    wrapper = model.deberta.encoder.layer[1].attention.self
    inner = wrapper.inner
    seen = capture(wrapper, model, inputs)
    with torch.no_grad():
        x = seen["args"][0]
        batch_size, tokens, _ = x.shape
        q, k, v = (inner.transpose_for_scores(getattr(inner, n)(x), HEADS)
                   for n in ("query_proj", "key_proj", "value_proj"))
        scale = math.sqrt(HEAD_DIM * 3)
        scores = torch.bmm(q, k.transpose(-1, -2)) / scale + inner.disentangled_attention_bias(
            q, k, seen["kwargs"]["relative_pos"], seen["kwargs"]["rel_embeddings"], 3)
        scores = scores.view(batch_size, HEADS, tokens, tokens)
        mask = inputs["attention_mask"].float()
        pk, pv = prefix_kv(model, 1, x, mask, gated=preset == "unipelt_ap")
        q4 = q.view(batch_size, HEADS, tokens, HEAD_DIM)
        scores = torch.cat([q4 @ pk.transpose(-1, -2) / scale, scores], -1)
        allowed = torch.cat([torch.ones(batch_size, LENGTH), mask], 1).bool()[:, None, None, :]
        values = torch.cat([pv, v.view(batch_size, HEADS, tokens, HEAD_DIM)], 2)
        reference = softmax_attention(scores, allowed, values)
        reference = reference.permute(0, 2, 1, 3).reshape(batch_size, tokens, -1)
    real = inputs["attention_mask"].bool()  # padded query rows differ (DeBERTa masks them whole)
    torch.testing.assert_close(seen["out"][real], reference[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [0, 1])  # 0: global attention, 1: sliding window (2 each side)
@pytest.mark.parametrize("preset", ["prefix", "unipelt_ap"])
def test_prefix_attention_equals_reference_modernbert(preset, layer):
    """Rotary positions on the tokens' queries and keys; prefix keys carry no position."""
    from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

    model = pelt("modernbert", preset).eval()
    inputs = batch("modernbert", [9, 4])
    attention = model.model.layers[layer].attn
    seen = capture(attention, model, inputs)
    with torch.no_grad():
        x = seen["args"][0]  # the attention input: attn_norm(layer input)
        batch_size, tokens, _ = x.shape
        qkv = attention.Wqkv(x).view(batch_size, tokens, 3, HEADS, HEAD_DIM)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        cos, sin = seen["kwargs"]["position_embeddings"]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        mask = inputs["attention_mask"].float()
        pk, pv = prefix_kv(model, layer, x, mask, gated=preset == "unipelt_ap")
        scores = q @ torch.cat([pk, k], 2).transpose(-1, -2) / math.sqrt(HEAD_DIM)
        positions = torch.arange(tokens)
        near = (positions[:, None] - positions[None, :]).abs() <= 2 if layer else \
            torch.ones(tokens, tokens, dtype=torch.bool)
        allowed = torch.cat([torch.ones(batch_size, tokens, LENGTH, dtype=torch.bool),
                             near[None] & mask.bool()[:, None, :]], -1)[:, None]
        reference = softmax_attention(scores, allowed, torch.cat([pv, v], 2))
        reference = attention.Wo(reference.transpose(1, 2).reshape(batch_size, tokens, -1))
    torch.testing.assert_close(seen["out"], reference, rtol=1e-5, atol=1e-6)


def test_two_models_from_one_config_both_get_a_prefix():
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, num_labels=2)
    before = config.to_dict()
    first = apply_pelt(BertForSequenceClassification(config), PELTConfig.preset("unipelt_apl"))
    second = apply_pelt(BertForSequenceClassification(config), PELTConfig.preset("prefix"))
    for model in (first, second):
        assert model.config._attn_implementation.startswith("unipelt_")
        with torch.no_grad():
            model.eval()(**batch("bert", [5, 3]))
    assert config.to_dict() == before  # the caller's config object is untouched
    assert not config._attn_implementation.startswith("unipelt_")


def test_switching_attention_after_apply_fails_loudly_or_keeps_prefix():
    model = pelt("bert", "unipelt_ap").eval()
    inputs = batch("bert", [6, 3])
    with torch.no_grad():
        expected = model(**inputs).logits
    model.set_attn_implementation("eager")
    with pytest.raises(PELTError, match="drops the prefix.*unipelt_sdpa"):
        model(**inputs)
    model.set_attn_implementation("unipelt_eager")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-6)


def test_prefix_on_an_unsupported_attention_implementation_is_an_error():
    model = tiny("bert")
    model.config._attn_implementation_internal = "flex_attention"  # as from_pretrained would set it
    with pytest.raises(PELTError, match="sdpa or eager.*flex_attention"):
        apply_pelt(model, PELTConfig.preset("prefix"))


@pytest.mark.parametrize("family", ["bert", "deberta-v2", "modernbert"])
def test_backward_in_eval_mode_reaches_the_prefix_mlp(family):
    model = pelt(family, "prefix")
    with torch.no_grad():
        model.eval()(**batch(family, [5, 3]))  # fills the no-grad cache
    model(**batch(family, [5, 3]), labels=torch.tensor([0, 2])).loss.backward()
    grads = [p.grad for p in model.base_model.pelt_prefix.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_mask_functions_registered_for_our_implementations():
    """Without these, transformers builds no padding mask and padding is silently attended."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert "unipelt_sdpa" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    assert "unipelt_eager" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2", "modernbert"])
def test_folded_equals_unfolded_and_eval_caches(family):
    model = pelt(family, "unipelt_apl")
    train_steps(model, family, steps=2)
    inputs = batch(family, [7, 4])
    model.train()  # tiny configs have no dropout: train-mode forward is deterministic
    with torch.no_grad():
        unfolded = model(**inputs).logits
        model.eval()
        cached = model(**inputs).logits
        assert model.base_model.pelt_prefix._cache is not None
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


def test_train_after_eval_trains_mlp_and_cache_follows_weights():
    model = pelt("bert", "prefix")
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


def test_eval_called_again_keeps_the_cache_and_train_drops_it(monkeypatch):
    """Serving code often calls model.eval() per request: that must not rerun the prefix network."""
    model = pelt("bert", "prefix")
    encoder = model.bert.pelt_prefix
    runs = []
    compute = type(encoder).compute
    monkeypatch.setattr(type(encoder), "compute", lambda self: runs.append(1) or compute(self))
    inputs = batch("bert", [6, 3])
    with torch.no_grad():
        first = model.eval()(**inputs).logits
        second = model.eval()(**inputs).logits
    assert len(runs) == 1 and torch.equal(first, second)
    model.train()
    assert encoder._cache is None  # training frees it; its forwards never read it
    with torch.no_grad():
        model.eval()(**inputs)
    assert len(runs) == 2


def test_unfolded_checkpoint_keeps_mlp_and_folded_is_smaller():
    model = pelt("bert", "unipelt_apl")
    train_steps(model, "bert", steps=1)
    folded, unfolded = pelt_state_dict(model), pelt_state_dict(model, fold=False)
    assert "bert.pelt_prefix.static" in folded["weights"]
    assert "bert.pelt_prefix.mlp.2.weight" in unfolded["weights"]
    assert not model.bert.pelt_prefix.folded  # saving folded does not change the model
    size = lambda s: sum(t.numel() for t in s["weights"].values())  # noqa: E731
    assert size(folded) < size(unfolded)
    resumed = pelt("bert", "unipelt_apl", seed=2)
    load_pelt_state_dict(resumed, unfolded)
    assert not resumed.bert.pelt_prefix.folded
    train_steps(resumed, "bert", steps=1)  # resumes training the MLP
    folded_model = fold_prefix(pelt("bert", "unipelt_apl"))
    with pytest.raises(PELTError, match="unfolded prefix"):
        load_pelt_state_dict(folded_model, unfolded)
    with pytest.raises(PELTError, match="no prefix"):
        fold_prefix(pelt("bert", "lora"))


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


def blank_slots_used(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every blank-slot count the prefix attention picks."""
    seen, alignment = [], prefix_module._alignment
    monkeypatch.setattr(prefix_module, "_alignment", lambda *a: seen.append(alignment(*a)) or seen[-1])
    return seen


def forward_and_grads(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    out = model(**inputs, labels=torch.tensor([0, 2]))
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "distilbert", "modernbert"])
@pytest.mark.parametrize("lengths", [[7, 5], [7, 7]], ids=["padded", "unpadded"])
def test_blank_slots_aligning_the_keys_change_nothing(family, lengths, monkeypatch):
    """CPU SDPA pads the prefix with masked zero keys up to a multiple of 16 keys: logits and
    gradients must be those of the unaligned prefix (with and without a padding mask)."""
    model = pelt(family, "unipelt_apl")
    model.train()  # dropout is off in the tiny configs; train mode runs the prefix MLP with grad
    inputs = batch(family, lengths)
    seen = blank_slots_used(monkeypatch)
    logits, grads = forward_and_grads(model, inputs)
    assert seen and all(b == 16 - (7 + LENGTH) % 16 for b in seen)  # 17 keys -> 15 blank slots
    monkeypatch.setattr(prefix_module, "ALIGN", 1)
    ref_logits, ref_grads = forward_and_grads(model, inputs)
    assert seen[-1] == 0
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_no_blank_slots_with_attention_dropout(monkeypatch):
    """With attention dropout CPU SDPA runs its math path, where every blank key costs time."""
    model = apply_pelt(tiny("bert", attention_probs_dropout_prob=0.1), PELTConfig.preset("unipelt_apl"))
    seen = blank_slots_used(monkeypatch)
    model.train()
    model(**batch("bert", [7, 5]))
    model.eval()
    model(**batch("bert", [7, 5]))
    assert seen == [0] * 2 + [15] * 2  # two layers in train mode, then two in eval mode
