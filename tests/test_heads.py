"""The classification heads (unipelt/heads.py) on tiny random models of several families."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from tests.test_core_model import batch, pelt, tiny, train_steps
from unipelt import HEADS, PELTConfig, PELTError, apply_pelt, count_trainable, load_pelt_state_dict, pelt_state_dict
from unipelt.heads import PoolingHead

FAMILIES = ("bert", "distilbert", "deberta-v2", "modernbert", "roberta", "electra")
FRESH = ("mean", "cls_mlp")
PELT_METHODS = ("adapter", "lora", "unipelt_apl")


def heads_for(family: str) -> tuple[str, ...]:
    return HEADS if family == "bert" else tuple(h for h in HEADS if h != "pooler_trainable")


def grid(families=FAMILIES):
    return [(f, h) for f in families for h in heads_for(f)]


def head_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters outside the backbone."""
    base = model.base_model_prefix + "."
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(base)}


def pooler_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list(model.bert.pooler.parameters())


@pytest.mark.parametrize(("family", "head"), grid())
def test_logits_shape_and_the_head_that_trains(family, head):
    model = pelt(family, "lora", head=head)
    model.eval()
    with torch.no_grad():
        logits = model(**batch(family, [7, 4, 2])).logits
    assert logits.shape == (3, 3)
    names = set(head_params(model))
    if head in FRESH:  # the model's own head is gone; only the pelt head lies outside the backbone
        hidden = model.config.hidden_size
        expected = {"pelt_head.out.weight", "pelt_head.out.bias"}
        if head == "cls_mlp":
            expected |= {"pelt_head.dense.weight", "pelt_head.dense.bias"}
        assert names == expected
        assert not [n for n, _ in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")
                    and not n.startswith("pelt_head.")]
        size = 3 * hidden + 3 + (hidden * hidden + hidden if head == "cls_mlp" else 0)
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora" in n)
        assert count_trainable(model) == size + lora
    else:
        assert names and not any(n.startswith("pelt_head") for n in names)


@pytest.mark.parametrize("method", ("finetune", "bitfit", *PELT_METHODS))
@pytest.mark.parametrize("head", HEADS)
def test_which_parameters_train_bert(method, head):
    """BERT's pooler: frozen under `pooler` for PELT methods, trained under `pooler_trainable`,
    unused (so frozen, whatever the method) under `mean` and `cls_mlp`; the rest moves or stays."""
    model = pelt("bert", method, head=head)
    plain = pelt("bert", method)
    pooler_trains = {p.requires_grad for p in pooler_params(model)}
    if head == "pooler_trainable" or (head == "pooler" and method == "finetune"):
        assert pooler_trains == {True}
    elif head == "pooler" and method == "bitfit":  # BitFit trains every bias, the pooler's too
        assert [p.requires_grad for p in pooler_params(model)] == [False, True]
    else:
        assert pooler_trains == {False}
    pooler_size = sum(p.numel() for p in pooler_params(model))
    if head == "pooler_trainable" and method != "finetune":
        bias = model.bert.pooler.dense.bias.numel() if method == "bitfit" else 0
        assert count_trainable(model) == count_trainable(plain) + pooler_size - bias
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, "bert", steps=2)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} trains but did not move"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


@pytest.mark.parametrize(("family", "head"), grid(("bert", "distilbert", "modernbert")))
@pytest.mark.parametrize("method", ("lora", "unipelt_apl"))
def test_save_load_round_trip_is_exact(family, head, method):
    model = pelt(family, method, head=head)
    train_steps(model, family, steps=2)
    model.eval()
    inputs = batch(family, [8, 6, 3], seed=5)
    with torch.no_grad():
        expected = model(**inputs).logits
    buffer = io.BytesIO()
    torch.save(pelt_state_dict(model), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert PELTConfig.from_dict(state["config"]).head == head
    assert sum(t.numel() for t in state["weights"].values()) == count_trainable(model)
    fresh = pelt(family, method, seed=1, head=head)
    with torch.no_grad():
        assert not torch.equal(fresh.eval()(**inputs).logits, expected)
    load_pelt_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, expected)
    other = "pooler" if head != "pooler" else "mean"
    with pytest.raises(PELTError, match=f"head='{head}' \\(model: '{other}'\\)"):
        load_pelt_state_dict(pelt(family, method, head=other), state)


@pytest.mark.parametrize(("family", "head"), grid())
def test_padding_does_not_change_logits(family, head):
    model = pelt(family, "unipelt_apl", head=head)
    train_steps(model, family, steps=1)
    model.eval()
    alone = batch(family, [5])
    padded = batch(family, [9, 5, 2])
    padded["input_ids"][1] = torch.cat([alone["input_ids"][0], padded["input_ids"][1, 5:]])
    with torch.no_grad():
        ref = model(**alone).logits[0]
        ref_no_mask = model(input_ids=alone["input_ids"]).logits[0]
        got = model(**padded).logits[1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_no_mask, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ("bert", "deberta-v2"))
def test_mean_and_cls_mlp_are_what_they_say(family):
    """Logits against a hand computation from the backbone's last hidden states."""
    inputs = batch(family, [7, 4, 2], seed=3)
    mask = inputs["attention_mask"]
    for head in FRESH:
        model = pelt(family, "adapter", head=head)
        train_steps(model, family, steps=1)
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits
            hidden = model.base_model(**inputs).last_hidden_state
        w, b = model.pelt_head.out.weight, model.pelt_head.out.bias
        rows = []
        for i, n in enumerate(mask.sum(1).tolist()):
            if head == "mean":
                pooled = hidden[i, :n].sum(0) / n
            else:
                d = model.pelt_head.dense
                pooled = torch.tanh(hidden[i, 0] @ d.weight.T + d.bias)
            rows.append(pooled @ w.T + b)
        torch.testing.assert_close(logits, torch.stack(rows), rtol=1e-5, atol=1e-6)


def test_summary_token_last_reads_the_last_real_token_left_or_right_padded():
    torch.manual_seed(0)
    head = PoolingHead("cls_mlp", 8, 2, 0.0, summary_token="last").eval()
    hidden = torch.randn(2, 5, 8)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(head.pool(hidden, right), hidden[[0, 1], [2, 4]])
    torch.testing.assert_close(head.pool(hidden, left), hidden[[0, 1], [4, 4]])


@pytest.mark.parametrize("head", FRESH)
@pytest.mark.parametrize("problem", ("single_label_classification", "regression"))
def test_loss_is_computed_from_the_new_logits(head, problem):
    labels = 1 if problem == "regression" else 3
    model = apply_pelt(tiny("bert", num_labels=labels, problem_type=problem),
                       PELTConfig.preset("lora", head=head)).eval()
    inputs = batch("bert", [6, 3])
    target = torch.tensor([0.5, 2.0]) if problem == "regression" else torch.tensor([2, 0])
    with torch.no_grad():
        out = model(**inputs, labels=target)
    if problem == "regression":
        expected = torch.nn.functional.mse_loss(out.logits.squeeze(-1), target)
    else:
        expected = torch.nn.functional.cross_entropy(out.logits, target)
    assert out.logits.shape == (2, labels)
    torch.testing.assert_close(out.loss, expected)
    tuple_out = model(**inputs, labels=target, return_dict=False)
    torch.testing.assert_close(tuple_out[0], expected)


def test_deepcopy_and_two_models_in_one_forward_stay_apart():
    model = pelt("bert", "unipelt_apl", head="mean").eval()
    twin = copy.deepcopy(model)
    inputs = batch("bert", [6, 3])
    with torch.no_grad():
        torch.nn.init.normal_(twin.pelt_head.out.weight)
        a, b = model(**inputs).logits, twin(**inputs).logits
        assert not torch.equal(a, b)
        assert torch.equal(model(**inputs).logits, a)


def test_config_carries_the_head():
    cfg = PELTConfig.preset("unipelt_apl", head="cls_mlp")
    assert cfg.head == "cls_mlp" and cfg.to_dict()["head"] == "cls_mlp" and cfg.flat()["head"] == "cls_mlp"
    assert PELTConfig.from_dict(cfg.to_dict()) == cfg and PELTConfig.from_flat(cfg.flat()) == cfg
    default = PELTConfig.preset("unipelt_apl")
    assert default.head == "pooler" and "head" not in default.to_dict()  # identities from before heads
    with pytest.raises(PELTError, match="head must be one of pooler, pooler_trainable, mean, cls_mlp; got 'max'"):
        PELTConfig.preset("lora", head="max")


@pytest.mark.parametrize("family", ("distilbert", "deberta-v2", "modernbert", "roberta", "electra"))
def test_pooler_trainable_without_a_backbone_pooler_is_an_error(family):
    with pytest.raises(PELTError, match=f"allowed heads for {family}: pooler, mean, cls_mlp$"):
        pelt(family, "lora", head="pooler_trainable")


@pytest.mark.filterwarnings("ignore:.*will save all targets and predictions in the buffer.*")
def test_lightning_module_head_option_and_overrides(tmp_path):
    from lightning_modules import UniPELTLightningModule
    from lightning_modules.unipelt_module import ModelConfigError
    from tests.fixtures import write_tiny_model

    path = str(write_tiny_model(tmp_path / "tiny-bert"))
    by_option = UniPELTLightningModule(model_name_or_path=path, task="stsb", method="lora", head="mean")
    by_override = UniPELTLightningModule(model_name_or_path=path, task="stsb", method="lora",
                                         pelt_overrides={"head": "mean"})
    for module in (by_option, by_override):
        assert module.pelt_config.head == "mean" and hasattr(module.model, "pelt_head")
        assert module.checkpoint_identity()["pelt_config"]["head"] == "mean"
        assert "model.pelt_head.out.weight" in module.trainable_parameter_names
    with pytest.raises(ModelConfigError, match="--model.head 'mean'"):
        UniPELTLightningModule(model_name_or_path=path, task="stsb", method="lora", head="mean",
                               pelt_overrides={"head": "cls_mlp"})


# ------------------------------------------------------------------ a decoder, through a spec made here
# (decoder entries live on another branch; this checks the heads need nothing beyond the spec's fields)

def tiny_llama(monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from unipelt.backbones import BACKBONES, BackboneSpec, LayerOutput

    monkeypatch.setitem(BACKBONES, "llama", BackboneSpec(
        "llama", layers="layers", attention="self_attn",
        projections={"query": "q_proj", "key": "k_proj", "value": "v_proj"}, adapter=LayerOutput(),
        no_decay=("norm",), summary_token="last"))
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3))


@pytest.mark.parametrize("head", ("pooler", *FRESH))
def test_decoder_heads_read_real_tokens_only(head, monkeypatch):
    model = apply_pelt(tiny_llama(monkeypatch), PELTConfig.preset("lora", head=head))
    train_steps(model, "llama", steps=1)
    model.eval()
    alone = batch("llama", [5])
    padded = batch("llama", [9, 5, 2])
    padded["input_ids"][1] = torch.cat([alone["input_ids"][0], padded["input_ids"][1, 5:]])
    with torch.no_grad():
        ref = model(**alone).logits[0]
        got = model(**padded).logits[1]
        hidden = model.base_model(**padded).last_hidden_state
    assert model(**padded).logits.shape == (3, 3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if head == "cls_mlp":  # the last real token, not the first (which has seen nothing else)
        d, out = model.pelt_head.dense, model.pelt_head.out
        expected = torch.tanh(hidden[1, 4] @ d.weight.T + d.bias) @ out.weight.T + out.bias
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if head != "pooler":
        assert isinstance(model.score, torch.nn.Identity)
    with pytest.raises(PELTError, match="allowed heads for llama: pooler, mean, cls_mlp$"):
        apply_pelt(tiny_llama(monkeypatch), PELTConfig.preset("lora", head="pooler_trainable"))


@pytest.mark.parametrize(("head", "expected"), [
    ("max", "head must be one of pooler, pooler_trainable, mean, cls_mlp; got 'max'"),
])
def test_cli_bad_head_is_one_line_exit_2(head, expected, tmp_path, capsys):
    from cli import main
    from tests.fixtures import write_stsb, write_tiny_model
    from tests.test_cli import common_args

    model, glue = write_tiny_model(tmp_path / "tiny-bert"), write_stsb(tmp_path / "glue").parent
    with pytest.raises(SystemExit) as exc:
        main(["fit", *common_args(model, glue, tmp_path / "run", method="lora", task="stsb"), "--model.head", head])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == f"error: {expected}" and "Traceback" not in err


@pytest.mark.parametrize("head", HEADS)
def test_merge_keeps_the_head_and_to_peft_refuses_what_peft_cannot_hold(head, tmp_path):
    from unipelt import merge, to_peft

    model = pelt("bert", "lora", head=head)
    train_steps(model, "bert", steps=2)
    model.eval()
    inputs = batch("bert", [7, 4, 2], seed=3)
    merged = merge(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
    if head == "pooler":
        to_peft(model, tmp_path / "peft")
    else:
        with pytest.raises(PELTError, match=f"cannot express the '{head}' head"):
            to_peft(model, tmp_path / "peft")


@pytest.mark.parametrize("head", ("pooler_trainable", *FRESH))
def test_save_pretrained_from_pretrained_carry_the_head(head, tmp_path):
    import unipelt

    model = pelt("bert", "unipelt_apl", head=head)
    train_steps(model, "bert", steps=2)
    model.eval()
    inputs = batch("bert", [7, 4, 2], seed=3)
    unipelt.save_pretrained(model, tmp_path / "export", base_model_name_or_path="tiny-bert")
    loaded = unipelt.from_pretrained(tmp_path / "export", model=tiny("bert", attn="sdpa"))
    assert loaded.pelt_config.head == head
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_the_head_forward_keeps_the_signature_and_survives_pickling():
    """``model.forward`` is the head's wrapper: callers that read its signature (generate, Lightning) see the
    model's own, and a pickled model (torch.save of the whole module) computes the same logits."""
    import inspect

    model = pelt("bert", "lora", head="cls_mlp").eval()
    assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)  # our own object, written just above
    inputs = batch("bert", [6, 3])
    with torch.no_grad():
        assert restored.forward.inner.__self__ is restored
        torch.testing.assert_close(restored(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
