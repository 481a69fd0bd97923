"""The per-forward context: nothing of a batch outlives its forward; nesting, two models and
activation checkpointing give the same gradients as plain forwards."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.fixtures import enable_checkpointing
from unipelt import context, gate_values

try:  # works whether or not tests/ is a package
    from .test_core_model import batch, pelt, train_steps
except ImportError:
    from test_core_model import batch, pelt, train_steps

LABELS = torch.tensor([0, 1, 2])


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def backward(model: torch.nn.Module, family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch(family, [7, 5, 3], seed=seed), labels=LABELS).loss.backward()
    return grads(model)


def assert_same(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def trained(family: str) -> torch.nn.Module:
    model = pelt(family, "unipelt_apl")
    train_steps(model, family, steps=1)  # LoRA B non-zero
    return model


def _flat(value):
    """Every object inside dicts, tuples and lists (the last gates are kept as (record, token weights))."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [x for item in value for x in _flat(item)]
    return [value]


@pytest.mark.parametrize("family", ["bert", "deberta-v2", "modernbert"])
def test_nothing_of_a_batch_stays_on_modules_after_forward(family):
    model = trained(family)
    model(**batch(family, [6, 2]), labels=LABELS[:2]).loss.backward()
    assert context.FORWARDS.top() is None
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr.startswith("_") and attr in ("_parameters", "_buffers", "_modules"):
                continue
            for v in _flat(value):
                if isinstance(v, torch.Tensor):
                    assert v.grad_fn is None and not v.requires_grad, f"{name}.{attr} keeps a graph"
                    assert attr == "_pelt_last_gates", f"{name}.{attr} keeps a batch tensor"


@pytest.mark.parametrize("family", ["bert", "distilbert", "deberta-v2", "modernbert"])
def test_activation_checkpointing_gives_the_same_gradients(family):
    model = trained(family)
    expected = backward(model, family)
    enable_checkpointing(model)
    assert model.base_model.get_submodule(
        {"bert": "encoder.layer", "distilbert": "transformer.layer", "deberta-v2": "encoder.layer",
         "modernbert": "layers"}[family])[0].gradient_checkpointing
    got = backward(model, family)
    assert any("pelt_prefix" in n for n in got)  # the prefix MLP gets its gradient through replays
    assert_same(got, expected, exact=False)


def test_two_models_interleaved_give_their_own_gradients():
    a, b = trained("bert"), trained("modernbert")
    expected_a, expected_b = backward(a, "bert"), backward(b, "modernbert", seed=2)
    a.zero_grad(set_to_none=True)
    b.zero_grad(set_to_none=True)
    loss_a = a(**batch("bert", [7, 5, 3]), labels=LABELS).loss
    loss_b = b(**batch("modernbert", [7, 5, 3], seed=2), labels=LABELS).loss
    loss_b.backward()
    loss_a.backward()
    assert_same(grads(a), expected_a)
    assert_same(grads(b), expected_b)


def test_nested_forward_of_another_model_changes_nothing():
    outer, inner = trained("bert"), copy.deepcopy(trained("bert"))
    expected = backward(outer, "bert")
    inner_inputs = batch("bert", [4, 2], seed=9)

    def run_inner(module, args, output):
        with torch.no_grad():
            inner(**inner_inputs)  # another model's whole forward, mid-layer of this one

    handle = outer.bert.encoder.layer[0].attention.register_forward_hook(run_inner)
    got = backward(outer, "bert")
    handle.remove()
    assert_same(got, expected)
    assert all(v.shape == (3,) for v in gate_values(outer).values())
    assert all(v.shape == (2,) for v in gate_values(inner).values())


def test_a_layer_called_alone_is_a_clear_error():
    model = pelt("bert", "unipelt_apl")
    with pytest.raises(ValueError, match="outside its model's forward"):
        model.bert.encoder.layer[0](torch.zeros(1, 3, 32))


def test_causal_reduction_keeps_one_gate_per_token_and_reports_the_masked_mean():
    per_token = torch.rand(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    weights = context.token_weights(mask, (2, 5), per_token.device, torch.float32)
    causal = context.ForwardContext(0, weights, None, causal=True)
    got = causal.reduce(per_token)
    assert torch.equal(got, per_token)  # a position's gate reads that position only
    later = per_token.clone()
    later[:, 3:] = 0.5  # changing later tokens leaves earlier positions' gates alone
    assert torch.equal(causal.reduce(later)[:, :3], got[:, :3])
    # gate_values() reports each example's mean over its real tokens: the encoder reduction
    encoder = context.ForwardContext(0, weights, None)
    torch.testing.assert_close(causal.per_example(got), encoder.reduce(per_token))
    for b in range(2):
        real = mask[b].bool()
        torch.testing.assert_close(causal.per_example(got)[b], per_token[b, real].mean(0))


def test_reentrant_checkpointing_needs_a_folded_prefix():
    from unipelt import PELTError, fold_prefix

    model = trained("bert")
    enable_checkpointing(model, use_reentrant=True)
    with pytest.raises(PELTError, match="use_reentrant=False.*fold_prefix"):
        backward(model, "bert")
    fold_prefix(model)
    got = backward(model, "bert")
    enable_checkpointing(model, enable=False)
    assert_same(got, backward(model, "bert"), exact=False)


@pytest.mark.parametrize("family,head", [("bert", "pooler"), ("deberta-v2", "pooler"), ("modernbert", "pooler"),
                                         ("bert", "mean"), ("bert", "cls_mlp"), ("modernbert", "mean")])
def test_torch_compile_traces_one_graph_with_eager_logits_and_gates(family, head):
    """The context must not break the graph (a ContextVar gave 27 graphs and a slower compiled model),
    nor must the pooling heads' per-forward state (a ContextVar of its own gave 4 graphs with ``mean``)."""
    model = pelt(family, "unipelt_apl", head=head).eval()
    inputs = batch(family, [6, 4, 2])
    if head != "pooler":  # the pooling heads compute the loss themselves (DeBERTa's own breaks the graph)
        inputs["labels"] = torch.tensor([0, 2, 1])
    with torch.inference_mode():
        expected = model(**inputs)
        expected_gates = gate_values(model)
        explained = torch._dynamo.explain(model)(**inputs)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager")(**inputs)
    torch.testing.assert_close(got.logits, expected.logits)
    if head != "pooler":
        torch.testing.assert_close(got.loss, expected.loss)
    got_gates = gate_values(model)
    assert set(got_gates) == set(expected_gates)
    for key, value in expected_gates.items():
        torch.testing.assert_close(got_gates[key], value)
    torch._dynamo.reset()


def test_torch_compile_with_graph_breaks_and_training_matches_eager():
    """Breaks inside the model (a user's hooks) split the trace, not the context; gradients match."""
    model = pelt("bert", "unipelt_apl")
    compiled_copy = copy.deepcopy(model)
    for layer in compiled_copy.bert.encoder.layer:
        layer.attention.register_forward_hook(lambda *_: torch._dynamo.graph_break())
    expected = backward(model, "bert")
    backward(torch.compile(compiled_copy, backend="eager"), "bert")
    got = grads(compiled_copy)
    assert set(got) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad)
    assert context.FORWARDS.traced == []  # nothing left entered
    torch._dynamo.reset()
