"""UniPELT on decoder LLMs (Llama, Mistral, Qwen2, Qwen3, GPT-2): tiny random configs, seconds each.

Causal models must never see later tokens: gates are per token (docs/decoders.md), the prefix
sits before every sequence and is never masked, generation with the KV cache equals generation
without it, and a left-padded batch generates for each row what that row generates alone.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DynamicCache,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from unipelt import PRESETS, PELTConfig, PELTError, apply_pelt, gate_values, load_pelt_state_dict, pelt_state_dict

VOCAB, PAD = 61, 0
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
WITHOUT_BIASES = ("llama", "mistral", "qwen3")  # BitFit trains only a classification head there
GATED = ("unipelt_apl", "unipelt_ap")
METHODS = [p for p in PRESETS if p != "finetune"]
SPACE = ("ia3", "dora", "parallel_adapter", "unipelt_apl_dora", "unipelt_apli", "unipelt_all")  # issue 28's


def config(family: str, attn: str = "sdpa", **extra):
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, tie_word_embeddings=False, **extra)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, **common)
    else:
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
        # Grouped-query attention: 4 query heads share 2 key/value heads; Qwen3 has its own head_dim.
        cfg = cls(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **common)
        if family == "qwen3":
            cfg.head_dim = 16  # Qwen3's head_dim is its own setting, not hidden / heads
    cfg._attn_implementation = attn
    return cfg


def build(family: str, method: str, head: str = "lm", seed: int = 0, attn: str = "sdpa", **overrides):
    """A tiny random decoder with `method` applied, its new weights nudged off their (often zero) init."""
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
    extra = {} if head == "lm" else {"num_labels": 3}
    model = cls.from_config(config(family, attn, **extra))
    apply_pelt(model, PELTConfig.preset(method, **overrides))
    backbone = {id(p) for p in model.base_model.parameters()}
    with torch.no_grad():  # a trained state: LoRA B and the like are zero at init
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) in backbone or any(k in name for k in ("pelt", "lora", "adapter", "ia3")):
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def rows(seed: int = 0, lengths=(7, 4, 10)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def pad(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    return ids, mask


# ------------------------------------------------------------------------------- classification
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_sequence_classification_ignores_padding(family: str, method: str) -> None:
    """The last real token's logits, padded on either side, equal the row's logits alone."""
    model = build(family, method, head="cls")
    seqs = rows()
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None]).logits for s in seqs])
        for side in ("left", "right"):
            ids, mask = pad(seqs, side)
            batched = model(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4, msg=lambda m, s=side: f"{s}: {m}")


# ------------------------------------------------------------------------------------ causal LM
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["unipelt_apl", "unipelt_ap", "prefix", "adapter", "lora", *SPACE])
def test_no_position_sees_a_later_token(family: str, method: str) -> None:
    model = build(family, method)
    ids = rows(lengths=(12,))[0][None]
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 7) % (VOCAB - 1) + 1
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["unipelt_apl", "prefix", "unipelt_all"])
def test_generation_with_cache_equals_generation_without(family: str, method: str) -> None:
    model = build(family, method)
    ids = rows(lengths=(5,))[0][None]
    common = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD, min_new_tokens=12)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, **common)
        uncached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, **common)
    assert cached.tolist() == uncached.tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["unipelt_apl", "prefix"])
def test_static_cache_generates_what_the_dynamic_cache_generates(family: str, method: str) -> None:
    """transformers' StaticCache passes its own 4D masks (a dict of them for Qwen) and, at prefill,
    no mask with more keys than queries (the empty slots): same logits as the dynamic cache."""
    model = build(family, method)
    ids, mask = pad(rows(lengths=(6, 4)), "left")
    common = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=PAD, output_logits=True,
                  return_dict_in_generate=True, attention_mask=mask)
    with torch.no_grad():
        dynamic = model.generate(ids, **common)
        static = model.generate(ids, cache_implementation="static", **common)
        alone = model.generate(ids[:1], **{**common, "attention_mask": mask[:1]}, cache_implementation="static")
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack(alone.logits)[:, 0], torch.stack(dynamic.logits)[:, 0], atol=1e-5,
                               rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["unipelt_apl", "unipelt_ap", "prefix", "lora", "adapter", "unipelt_all",
                                    "unipelt_apl_dora"])
def test_left_padded_batch_generates_what_each_row_generates_alone(family: str, method: str) -> None:
    model = build(family, method)
    seqs = rows(seed=1, lengths=(6, 3, 9))
    ids, mask = pad(seqs, "left")
    common = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **common)[:, ids.shape[1]:]
        for i, s in enumerate(seqs):
            alone = model.generate(s[None], attention_mask=torch.ones_like(s[None]), **common)[:, len(s):]
            assert batched[i].tolist() == alone[0].tolist(), f"row {i}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_padded_generation_step_extends_the_mask_once_per_forward(family: str, monkeypatch) -> None:
    """Every layer gets the same extended mask object; building it per layer costs ops in every step."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = build(family, "unipelt_apl")
    ids, mask = pad(rows(seed=1, lengths=(6, 3)), "left")
    seen = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append(attention_mask)
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", spy)
        step = torch.tensor([[5], [7]])
        model(input_ids=step, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
              cache=cache, use_cache=True)
    length = model.pelt_config.prefix_length
    assert len(seen) == model.config.num_hidden_layers == 2
    assert seen[0] is seen[1] and seen[0].shape[-1] == length + ids.shape[1] + 1
    assert seen[0][..., :length].all() and not seen[0][1, ..., length:length + 3].any()  # prefix open, padding shut


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_sits_before_every_sequence_and_is_not_cached(family: str) -> None:
    model = build(family, "unipelt_apl")
    ids = rows(lengths=(9,))[0][None]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids[:, :5], cache=cache, use_cache=True).logits
        assert cache.get_seq_length() == 5  # the prefix is prepended per step, never stored
        steps = [model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(5, 9)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-4)
    # The prefix acts: zeroing it changes every position, the first included.
    encoder = next(m for n, m in model.named_modules() if n.endswith("pelt_prefix"))
    with torch.no_grad():
        for p in encoder.parameters():
            p.zero_()
        without = model(input_ids=ids).logits
    assert (without - full).abs().amax(-1).min() > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["unipelt_apl", "bitfit", "prefix", *SPACE])
def test_training_moves_every_trainable_tensor_and_no_frozen_one(family: str, method: str) -> None:
    if method == "bitfit" and family in WITHOUT_BIASES:  # no bias, and the LM head stays frozen
        with pytest.raises(PELTError, match=f"bitfit trains nothing on this {family} model"):
            build(family, method)
        return
    model = build(family, method).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and "lm_head.weight" not in trainable  # the LM head (often tied to the embeddings) stays frozen
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = pad(rows(), "right")
    labels = ids.masked_fill(mask == 0, -100)
    for _ in range(2):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not move"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} moved"


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_are_per_token_and_reported_per_example(family: str) -> None:
    model = build(family, "unipelt_apl")
    ids, mask = pad(rows(), "left")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    gates = gate_values(model)
    assert gates and all(v.shape == (3,) and ((v > 0) & (v < 1)).all() for v in gates.values())
    assert any(k.endswith("prefix") for k in gates) and any("lora" in k for k in gates)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["unipelt_apl", "unipelt_all", "unipelt_apl_dora"])
def test_save_and_load_give_identical_generations(family: str, method: str) -> None:
    model = build(family, method, seed=0)
    state = pelt_state_dict(model)
    fresh = build(family, method, seed=0)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()
    load_pelt_state_dict(fresh, state)
    ids = rows(lengths=(6,))[0][None]
    common = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        assert model.generate(ids, **common).tolist() == fresh.generate(ids, **common).tolist()
        torch.testing.assert_close(model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=0, rtol=0)


def test_gpt2_lora_changes_only_the_query_and_value_slices() -> None:
    model = build("gpt2", "lora")
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 5, 32)
    fused = attn.c_attn
    with torch.no_grad():
        out = fused(x)
        base = torch.nn.functional.linear(x, fused.base.weight.T, fused.base.bias)  # Conv1D: x @ W + b
    q, k, v = out.split(32, dim=-1)
    bq, bk, bv = base.split(32, dim=-1)
    torch.testing.assert_close(k, bk, atol=0, rtol=0)
    assert not torch.allclose(q, bq) and not torch.allclose(v, bv)


def test_prefix_has_one_key_value_pair_per_key_value_head() -> None:
    model = build("llama", "prefix", prefix_length=3)
    encoder = next(m for n, m in model.named_modules() if n.endswith("pelt_prefix"))
    with torch.no_grad():
        kv = encoder()
    assert tuple(kv.shape) == (2, 2, 2, 3, 8)  # layers, key/value, kv heads (not 4 query heads), length, head dim


def test_unsupported_decoder_family_is_named() -> None:
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, ffn_dim=37,
                                     num_attention_heads=4, word_embed_proj_dim=32))
    with pytest.raises(PELTError, match="unsupported model type 'opt'.*llama.*gpt2"):
        apply_pelt(model, PELTConfig.preset("unipelt_apl"))


def test_bf16_autocast_on_cpu_keeps_gates_stable() -> None:
    model = build("llama", "unipelt_apl").train()
    ids, mask = pad(rows(), "right")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and abs(out.loss.item() - reference.loss.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad and p.grad is not None)
    assert all(((v >= 0) & (v <= 1)).all() for v in gate_values(model).values())


def test_bf16_backbone_gets_bf16_submodules() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config("qwen2"), dtype=torch.bfloat16)
    apply_pelt(model, PELTConfig.preset("unipelt_apl"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = rows(lengths=(6,))[0][None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_per_token_gated_prefix_equals_a_hand_computed_attention(impl: str) -> None:
    """One call on widened head dims == for each query t: keys [g_t p_k; k<=t], values [g_t p_v; v<=t]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from unipelt.tuners.prefix.causal import gated_output, prefix_inputs

    torch.manual_seed(0)
    b, heads, kv_heads, q, kv, length, d = 2, 4, 2, 5, 7, 3, 8  # 2 cached tokens before 5 new ones
    query, key, value = torch.randn(b, heads, q, d), torch.randn(b, kv_heads, kv, d), torch.randn(b, kv_heads, kv, d)
    prefix_key, prefix_value, gate = torch.randn(b, kv_heads, length, d), torch.randn(b, kv_heads, length, d), \
        torch.rand(b, q)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    module.eval()
    fn = sdpa_attention_forward if impl == "sdpa" else eager_attention_forward
    mask = _cached_causal_mask(q, kv, additive=impl == "eager")  # as transformers builds it
    args = prefix_inputs(query, key, value, mask, prefix_key, prefix_value, gate, causal=True,
                         additive=impl == "eager")
    out = gated_output(fn(module, *args, scaling=d**-0.5)[0], gate, prefix_value)
    rep = heads // kv_heads
    expected = torch.zeros(b, q, heads, d)
    for i in range(b):
        for t in range(q):
            seen = kv - q + t + 1
            keys = torch.cat([gate[i, t] * prefix_key[i], key[i, :, :seen]], 1).repeat_interleave(rep, 0)
            values = torch.cat([gate[i, t] * prefix_value[i], value[i, :, :seen]], 1).repeat_interleave(rep, 0)
            weights = torch.softmax(query[i, :, t:t + 1] @ keys.transpose(-1, -2) * d**-0.5, -1)
            expected[i, t] = (weights @ values)[:, 0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def _cached_causal_mask(queries: int, keys: int, additive: bool = False) -> torch.Tensor:
    """Query i sits at key position keys - queries + i (the cached tokens come first)."""
    allowed = (torch.arange(queries)[:, None] + keys - queries >= torch.arange(keys)[None, :])[None, None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float).min) if additive else allowed


def _widened_reference(query, key, value, mask, prefix_key, prefix_value, gate, scale):
    """The widened-head-dims call (GPU and eager path) through transformers' SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from unipelt.tuners.prefix.causal import gated_output, prefix_inputs

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = query.shape[1] // key.shape[1], True
    q, k, v, m = prefix_inputs(query, key, value, mask, prefix_key, prefix_value, gate, causal=True, additive=False)
    out = sdpa_attention_forward(module, q, k, v, m, scaling=scale)[0]
    return out if gate is None else gated_output(out, gate, prefix_value)


@pytest.mark.parametrize("case", ["causal", "cached", "static", "padded", "ungated"])
def test_merged_cpu_prefix_attention_equals_the_widened_call_with_gradients(case: str) -> None:
    """The CPU path (tokens by the flash kernel, prefix apart, merged by log-sum-exps) == the widened
    call: outputs and the gradients of queries, keys, values, prefix and gates."""
    from unipelt.tuners.prefix.causal import can_merge, merged_prefix_attention

    torch.manual_seed(1)
    b, heads, kv_heads, length, d = 3, 6, 2, 4, 16
    q_len, kv_len = (5, 9) if case in ("cached", "static") else (9, 9)
    tensors = [torch.randn(b, heads, q_len, d), torch.randn(b, kv_heads, kv_len, d),
               torch.randn(b, kv_heads, kv_len, d), torch.randn(b, kv_heads, length, d),
               torch.randn(b, kv_heads, length, d), torch.rand(b, q_len)]
    mask = _cached_causal_mask(q_len, kv_len) if case == "cached" else None  # "static": the empty slots follow
    if case == "padded":  # left padding: row 1 has 3 pad tokens, row 2 has 6 (its first queries see no token)
        real = torch.ones(b, kv_len, dtype=torch.bool)
        real[1, :3], real[2, :6] = False, False
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    if case == "ungated":
        tensors = tensors[:5]
    assert can_merge(tensors[0], tensors[2], 0.0)
    results = []
    for fn in (merged_prefix_attention, _widened_reference):
        leaves = [t.clone().requires_grad_() for t in tensors]
        gate = leaves[5] if len(leaves) > 5 else None
        out = fn(*leaves[:3], mask, *leaves[3:5], gate, d**-0.5)
        out.mul(torch.linspace(-2, 2, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    (out, grads), (expected, expected_grads) = results
    assert out.shape == (b, q_len, heads, d)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)


def test_flash_log_sum_exp_gradient_equals_autograd_of_the_math() -> None:
    """The log-sum-exp output is differentiable: a loss on it and on the output gets the gradients
    autograd gives the written-out softmax (with grouped-query heads and a causal mask)."""
    from unipelt.tuners.prefix.causal import _FlashWithLogsumexp

    torch.manual_seed(2)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    results = []
    for flash in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if flash:
            out, lse = _FlashWithLogsumexp.apply(*leaves, None, True, 0.3)
        else:
            scores = (leaves[0] @ leaves[1].repeat_interleave(2, 1).transpose(-1, -2) * 0.3)
            scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
            out, lse = torch.softmax(scores, -1) @ leaves[2].repeat_interleave(2, 1), scores.logsumexp(-1)
        (out.sin().sum() + (lse * torch.linspace(-1, 3, lse.numel()).view_as(lse)).sum()).backward()
        results.append([out.detach(), lse.detach(), *(t.grad for t in leaves)])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_activation_checkpointing_gives_a_decoder_the_same_gradients(side: str) -> None:
    """Checkpointed layers replay the CPU prefix attention (its own autograd function) in the backward."""
    results = []
    for checkpointing in (False, True):
        model = build("llama", "unipelt_apl").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        ids, mask = pad(rows(), side)
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        results.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert results[0].keys() == results[1].keys() and any("pelt_prefix" in n for n in results[0])
    for name, grad in results[0].items():
        torch.testing.assert_close(results[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_the_kernel_check_passes_when_first_run_under_inference_mode_or_autocast() -> None:
    """Lightning's predict runs the first forward under inference_mode: the check must still pass."""
    from unipelt.tuners.prefix import causal

    causal.kernel_checked.cache_clear()
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
            warnings.simplefilter("error")
            assert causal.kernel_checked()
    finally:
        causal.kernel_checked.cache_clear()


def test_a_cpu_flash_kernel_that_breaks_the_contract_falls_back_to_the_exact_general_path(monkeypatch) -> None:
    """torch's private kernel is checked once; if it misbehaves (here: a wrong log-sum-exp), a warning
    names it and the widened call runs: same logits as the fast path on a sound kernel."""
    from unipelt.tuners.prefix import causal

    model = build("llama", "unipelt_apl")
    ids, mask = pad(rows(), "left")
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask).logits
    real = causal._FLASH_CPU
    monkeypatch.setattr(causal, "_FLASH_CPU", lambda *a, **k: (lambda out, lse: (out, lse + 1))(*real(*a, **k)))
    causal.kernel_checked.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU flash attention does not behave"):
            assert not causal.kernel_checked()
        with torch.no_grad():
            general = model(input_ids=ids, attention_mask=mask).logits
    finally:
        causal.kernel_checked.cache_clear()
    torch.testing.assert_close(general, fast, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_generation_with_caches_equals_generation_without(family: str) -> None:
    """A window of 4 on 10-token rows: transformers' sliding masks reach the prefix attention (never
    masking the prefix); dynamic and static caches, and a left-padded row alone, agree with no cache."""
    extra = dict(sliding_window=4) if family == "mistral" else dict(use_sliding_window=True, sliding_window=4,
                                                                    max_window_layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(family, **extra))
    apply_pelt(model, PELTConfig.preset("unipelt_apl"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    ids, mask = pad(rows(lengths=(10, 6)), "left")
    common = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, use_cache=False, **common)
        for cache in (None, "static"):
            got = model.generate(ids, attention_mask=mask, cache_implementation=cache, **common)
            assert got.sequences.tolist() == expected.sequences.tolist()
            torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-5, rtol=1e-4)
        alone = model.generate(ids[1:, 4:], attention_mask=mask[1:, 4:], **common)
    assert alone.sequences[0, 6:].tolist() == expected.sequences[1, 10:].tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_torch_compile_traces_one_graph_with_eager_logits(family: str) -> None:
    """While Dynamo traces, the prefix takes the widened call (the CPU kernel path and its check would
    break the graph); the logits of real tokens equal eager's, which take the merged path."""
    model = build(family, "unipelt_apl")
    ids, mask = pad(rows(), "left")
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask).logits
        explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager")(input_ids=ids, attention_mask=mask).logits
    torch._dynamo.reset()
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
