"""Multi-task models (unipelt/multitask.py): shared submodules, per task its gates and head; one task alone is a
plain single-task model with the same logits. Tiny random BERT and Llama-as-classifier, every preset."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig

import unipelt
from tests.test_core_model import batch, tiny
from unipelt import PRESETS, PELTConfig, PELTError, apply_pelt, count_trainable, gate_values
from unipelt.multitask import TaskGateBank, task_config

TASKS = {"nli": ["entailment", "neutral", "contradiction"], "sts": [], "sent": ["neg", "pos"]}
LABELS = {"nli": torch.tensor([0, 2, 1]), "sts": torch.tensor([0.5, 3.0, 1.5]), "sent": torch.tensor([1, 0, 1])}


def llama_classifier(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         num_labels=3)
    return AutoModelForSequenceClassification.from_config(config)


def backbone(family: str) -> torch.nn.Module:
    return llama_classifier() if family == "llama" else tiny(family)


def llama_batch(lengths=(7, 4, 2)) -> dict[str, torch.Tensor]:
    """Left padding, as decoders are batched."""
    g = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:], mask[i, width - n:] = torch.randint(3, 99, (n,), generator=g), 1
    return {"input_ids": ids, "attention_mask": mask}


def inputs(family: str) -> dict[str, torch.Tensor]:
    return llama_batch() if family == "llama" else batch(family, [7, 4, 2])


def trained(model: torch.nn.Module, family: str, steps: int = 2) -> torch.nn.Module:
    """A few AdamW steps on each task in turn: every task's gates and head move off their init."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        for task in model.pelt_config.tasks:
            loss = model(**inputs(family), labels=LABELS[task], task=task).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def multitask(family: str, preset: str, head: str = "cls_mlp", task_gates: str = "bank") -> torch.nn.Module:
    model = backbone(family)
    torch.manual_seed(3)
    return apply_pelt(model, PELTConfig.preset(preset, head=head, tasks=TASKS, task_gates=task_gates))


@pytest.fixture(scope="module")
def backbone_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    for family in ("bert", "llama"):  # the backbone alone, as pretrained encoders ship (no classifier to resize)
        backbone(family).base_model.save_pretrained(root / family)
    return {family: root / family for family in ("bert", "llama")}


CASES = [("bert", p, "embedding") for p in PRESETS] + [
    ("bert", "unipelt_apl", "bank"), ("bert", "unipelt_ap", "bank"),
    ("llama", "unipelt_apl", "embedding"), ("llama", "lora", "embedding"), ("llama", "unipelt_apl", "bank")]


@pytest.mark.parametrize(("family", "preset", "task_gates"), CASES)
def test_each_task_alone_equals_the_multitask_model(backbone_dirs, tmp_path, family, preset, task_gates):
    """save_pretrained(model, task=...) -> from_pretrained(task=...): the shared weights, the task's gates and its
    head as a plain single-task model, whose logits are the multi-task model's on that task's inputs."""
    model = AutoModelForSequenceClassification.from_pretrained(backbone_dirs[family])
    torch.manual_seed(3)
    apply_pelt(model, PELTConfig.preset(preset, head="cls_mlp", tasks=TASKS, task_gates=task_gates))
    trained(model, family)
    x = inputs(family)
    whole = unipelt.save_pretrained(model, tmp_path / "all")
    reloaded = unipelt.from_pretrained(whole)
    for task, labels in TASKS.items():
        with torch.no_grad():
            expected = model(**x, task=task)
            torch.testing.assert_close(reloaded(**x, task=task).logits, expected.logits, rtol=0, atol=0)
        folder = unipelt.save_pretrained(model, tmp_path / task, task=task)
        for alone in (unipelt.from_pretrained(folder), unipelt.from_pretrained(whole, task=task)):
            assert not alone.pelt_config.tasks and alone.pelt_config == task_config(model.pelt_config, task)
            assert alone.config.num_labels == max(1, len(labels))
            assert [alone.config.id2label[i] for i in range(len(labels))] == labels
            assert not any(isinstance(m, TaskGateBank) for m in alone.modules())
            with torch.no_grad():
                got = alone(**x, labels=LABELS[task])
            torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                assert got.loss == pytest.approx(float(model(**x, labels=LABELS[task], task=task).loss), rel=1e-5)
            if model.pelt_config.gated:
                with torch.no_grad():
                    model(**x, task=task)
                theirs, mine = gate_values(alone), gate_values(model, task=task)
                assert theirs.keys() == mine.keys()
                for key in mine:
                    torch.testing.assert_close(theirs[key], mine[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task_gates", ["bank", "embedding"])
def test_tasks_have_their_own_gates_and_heads_and_share_the_rest(task_gates):
    model = trained(multitask("bert", "unipelt_apl", task_gates=task_gates), "bert")
    x = inputs("bert")
    gates = {}
    for task in TASKS:
        with torch.no_grad():
            model(**x, task=task)
        gates[task] = gate_values(model)
    assert gate_values(model, task="nli").keys() == gates["nli"].keys()
    for a, b in (("nli", "sts"), ("nli", "sent")):  # same input, other gates
        assert any(not torch.allclose(gates[a][k], gates[b][k]) for k in gates[a])
    # Another task's gates and head do not reach a batch of "nli".
    with torch.no_grad():
        before, other = model(**x, task="nli").logits, model(**x, task="sts").logits
        for bank in (m for m in model.modules() if isinstance(m, TaskGateBank)):
            if task_gates == "bank":
                bank.proj[1].weight.add_(1.0)
            else:
                bank.task_bias[1].add_(1.0)
        model.pelt_head.heads[1].out.weight.add_(1.0)
        torch.testing.assert_close(model(**x, task="nli").logits, before, rtol=0, atol=0)
        assert not torch.allclose(model(**x, task="sts").logits, other)  # the change reaches task "sts"


def test_a_step_on_one_task_leaves_the_others_without_gradient():
    model = multitask("bert", "unipelt_apl").train()
    model(**inputs("bert"), labels=LABELS["sts"], task="sts").loss.backward()
    per_task = {n: p for n, p in model.named_parameters() if p.requires_grad and (".proj." in n or "pelt_head" in n)}
    for name, p in per_task.items():
        mine = ".proj.1." in name or "heads.1." in name
        assert (p.grad is not None) == mine, name
    shared = [p for n, p in model.named_parameters() if p.requires_grad and n not in per_task]
    assert shared and all(p.grad is not None for p in shared)


def test_ungated_presets_share_everything_but_the_heads():
    for preset in ("lora", "adapter", "finetune", "unipelt_apl_nogate"):
        model = multitask("bert", preset)
        single = apply_pelt(tiny("bert"), PELTConfig.preset(preset, head="cls_mlp"))
        assert not any(isinstance(m, TaskGateBank) for m in model.modules())
        mine = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("pelt_head.")}
        theirs = {n for n, p in single.named_parameters() if p.requires_grad and not n.startswith("pelt_head.")}
        assert mine == theirs


def test_an_ungated_multitask_model_merges_its_shared_weights_and_keeps_its_heads(tmp_path):
    model = trained(multitask("bert", "lora"), "bert")
    merged = unipelt.merge(model)
    assert any("lora" in n for n, _ in model.named_modules())
    assert not any("lora" in n for n, _ in merged.named_modules())  # folded into the frozen weights
    with torch.no_grad():
        for task in TASKS:
            x = inputs("bert")
            torch.testing.assert_close(merged(**x, task=task).logits, model(**x, task=task).logits)
    with pytest.raises(PELTError, match="PEFT cannot express the 'cls_mlp' head"):
        unipelt.to_peft(model, tmp_path / "peft")


def test_memory_grows_by_the_heads_and_gate_banks_only():
    hidden = 32
    single = apply_pelt(tiny("bert"), PELTConfig.preset("unipelt_apl", head="cls_mlp"))
    head = lambda n: hidden * hidden + hidden + n * hidden + n  # noqa: E731 - dense + out
    gates = sum(m.proj.weight.numel() + m.proj.bias.numel() for m in single.modules()
                if isinstance(m, unipelt.gates.GateBank))
    base = count_trainable(single) - head(3) - gates
    bank = count_trainable(multitask("bert", "unipelt_apl"))
    assert bank == base + head(3) + head(1) + head(2) + 3 * gates
    banks = [m for m in multitask("bert", "unipelt_apl", task_gates="embedding").modules()
             if isinstance(m, TaskGateBank)]
    shared = count_trainable(multitask("bert", "unipelt_apl", task_gates="embedding"))
    n = sum(len(b.keys) for b in banks)
    assert shared == base + head(3) + head(1) + head(2) + gates - n + 3 * n  # W shared, a bias per task


def test_padding_does_not_change_a_task_s_logits():
    model = trained(multitask("bert", "unipelt_apl"), "bert")
    x = batch("bert", [7, 4, 2])
    with torch.no_grad():
        padded = model(**x, task="sent").logits
        for i, n in enumerate([7, 4, 2]):
            alone = model(input_ids=x["input_ids"][i:i + 1, :n], attention_mask=x["attention_mask"][i:i + 1, :n],
                          task="sent").logits
            torch.testing.assert_close(alone, padded[i:i + 1], rtol=1e-5, atol=1e-6)


def test_deepcopy_keeps_the_tasks():
    model = trained(multitask("bert", "unipelt_apl"), "bert")
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for task in TASKS:
            x = inputs("bert")
            torch.testing.assert_close(copied(**x, task=task).logits, model(**x, task=task).logits)


def test_bad_use_is_one_line():
    model = multitask("bert", "unipelt_apl")
    with pytest.raises(PELTError, match=r"task=None: this model serves several tasks \(nli, sts, sent\)"):
        model(**inputs("bert"))
    with pytest.raises(PELTError, match=r"task='rte' is not one of this model's tasks: nli, sts, sent"):
        model(**inputs("bert"), task="rte")
    with pytest.raises(PELTError, match=r"is not one of this model's tasks"):
        gate_values(model, task="rte")
    with pytest.raises(PELTError, match="head 'pooler' cannot serve several tasks.*mean or cls_mlp"):
        PELTConfig.preset("lora", tasks=TASKS)
    with pytest.raises(PELTError, match="task 'a': labels must be"):
        PELTConfig.preset("lora", head="mean", tasks={"a": "pos"})
    with pytest.raises(PELTError, match="task_gates must be one of embedding, bank"):
        PELTConfig.preset("lora", head="mean", tasks=TASKS, task_gates="mixed")
    with pytest.raises(PELTError, match="cannot be fixed"):
        unipelt.merge(model, gates={k: 0.5 for k in unipelt.gates.gate_keys(model)})
    for slim_or_calibrate in (unipelt.slim, unipelt.calibrate_gates):  # its batches carry no task
        with pytest.raises(PELTError, match=r"this model serves several tasks \(nli, sts, sent\); take one task's"):
            slim_or_calibrate(model, [inputs("bert")])


def test_config_round_trips_and_single_task_configs_are_unchanged():
    cfg = PELTConfig.preset("unipelt_apl", head="mean", tasks={"a": 2, "b": 1}, task_gates="bank")
    assert PELTConfig.preset("unipelt_apl", head="mean", tasks={"a": 2}).task_gates == "embedding"  # the default
    assert cfg.tasks == {"a": ("LABEL_0", "LABEL_1"), "b": ()}
    assert PELTConfig.from_dict(cfg.to_dict()) == cfg and PELTConfig.from_flat(cfg.flat()) == cfg
    single = PELTConfig.preset("unipelt_apl", head="mean")
    assert "tasks" not in single.to_dict() and "task_gates" not in single.flat()


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "distilbert", "deberta-v2", "modernbert"])
def test_every_encoder_family_serves_several_tasks(family):
    """In memory: the task's weights (`task_weights`) loaded into a single-task model of the same backbone give
    the multi-task model's logits on that task."""
    from unipelt import load_pelt_state_dict, pelt_state_dict
    from unipelt.multitask import task_weights

    attn = "eager" if family == "deberta-v2" else "sdpa"
    model = tiny(family, attn=attn)
    single = copy.deepcopy(model)
    torch.manual_seed(3)
    apply_pelt(model, PELTConfig.preset("unipelt_apl", head="cls_mlp", tasks=TASKS))
    x = batch(family, [7, 4, 2])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for task in (*TASKS, *TASKS):
        opt.zero_grad()
        model(**x, labels=LABELS[task], task=task).loss.backward()
        opt.step()
    model.eval()
    apply_pelt(single, task_config(model.pelt_config, "nli"))
    state = pelt_state_dict(model)
    load_pelt_state_dict(single, {**state, "config": single.pelt_config.to_dict(),
                                  "weights": task_weights(state["weights"], model.pelt_config, "nli")})
    with torch.no_grad():
        torch.testing.assert_close(single.eval()(**x).logits, model(**x, task="nli").logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(**x, task="sent").logits[:, :2], model(**x, task="nli").logits[:, :2])
