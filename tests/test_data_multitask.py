"""MultiTaskDataModule and the task sampler: each task's split is the single-task one, batches hold one task,
the order follows the documented rule on one process and under DDP, bad task lists are one line."""

from __future__ import annotations

import collections
import csv
from pathlib import Path

import pytest
from test_data_helpers import write_all, write_tokenizer
from torch.utils.data import DistributedSampler

from datamodules import DataConfigError, TextDataModule
from datamodules.multitask import MultiTaskDataModule
from datamodules.task_sampler import EpochCounter, TaskBatchSampler, TaskRows, task_probabilities

SPLIT = dict(k_shot=8, dev_size=10, seed=3)


@pytest.fixture(scope="module")
def glue(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    write_all(root)
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def write_csv(path: Path, labels: list[str], n: int = 24, field: str = "review") -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([field, "label"])
        for i in range(n):
            writer.writerow([f"the {'good' if i % 2 else 'bad'} cat {'runs' * (i % 3)}", labels[i % len(labels)]])
    return str(path)


def multi(glue, tokenizer, cache, tasks, **kwargs) -> MultiTaskDataModule:
    settings = {**SPLIT, **kwargs}
    return MultiTaskDataModule(tasks=tasks, model_name_or_path=tokenizer, data_dir=str(glue), cache_dir=str(cache),
                               **settings)


def rows(dataset) -> list[tuple]:
    return [(tuple(r["input_ids"]), float(r["labels"])) for r in dataset]


def test_each_task_s_split_is_the_single_task_one(glue, tokenizer, tmp_path):
    reviews = {"name": "reviews", "train_file": write_csv(tmp_path / "reviews.csv", ["neg", "pos"])}
    dm = multi(glue, tokenizer, tmp_path / "c1", ["rte", "STS-B", reviews, {"task": "sst2", "k_shot": 12}])
    assert [t.name for t in dm.task_infos] == ["rte", "stsb", "reviews", "sst2"]
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    for name, options in (("rte", {"task": "rte"}), ("stsb", {"task": "stsb"}),
                          ("reviews", {k: v for k, v in reviews.items()}), ("sst2", {"task": "sst2", "k_shot": 12})):
        alone = TextDataModule(**{**SPLIT, **options}, model_name_or_path=tokenizer, data_dir=str(glue),
                               cache_dir=str(tmp_path / "c2"))
        alone.prepare_data()
        alone.setup("fit")
        alone.setup("test")
        member = dm.members[name]
        for split in ("train", "validation", *alone.task_info.test_splits):
            assert rows(member.datasets[split]) == rows(alone.datasets[split]), (name, split)
    # One epoch: batches of one task each, every training row of every task once.
    seen = collections.defaultdict(list)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # batch 16: one batch of each task (8, 8, 8 and 12 rows)
    for batch in batches:
        assert set(batch) >= {"input_ids", "attention_mask", "labels", "task"}
        seen[batch["task"]] += [tuple(ids[m.bool()].tolist()) for ids, m in zip(batch["input_ids"],
                                                                                batch["attention_mask"], strict=True)]
    for name, member in dm.members.items():
        assert sorted(seen[name]) == sorted(tuple(r["input_ids"]) for r in member.datasets["train"])
    assert [name for name, _ in dm.eval_plan("validation")] == ["rte", "stsb", "reviews", "sst2"]
    assert len(dm.val_dataloader()) == 4 and dm.eval_plan("test") == [(n, "test") for n in dm.members]


@pytest.mark.parametrize("sampling", ["proportional", "temperature"])
def test_the_order_is_the_rule_s_and_the_same_on_every_rank(sampling):
    sizes = [30, 7, 12]
    data = TaskRows([list(range(n)) for n in sizes])
    one = TaskBatchSampler(EpochCounter(data), 4, sizes=sizes, seed=5, sampling=sampling)
    assert list(one) == list(one)  # a pure function of (seed, epoch)
    first = list(one)
    one.sampler.set_epoch(1)
    assert list(one) != first
    ranks = [TaskBatchSampler(DistributedSampler(data, num_replicas=2, rank=r), 4, sizes=sizes, seed=5,
                              sampling=sampling) for r in range(2)]
    per_rank = [list(r) for r in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == 4 + 1 + 2  # ceil(ceil(n / 2) / 4)
    for a, b in zip(*per_rank, strict=True):  # every step: the same task on both ranks, other rows
        assert {t for t, _ in a} == {t for t, _ in b} and len({t for t, _ in a}) == 1
    if sampling == "proportional":
        for task, n in enumerate(sizes):  # every row once (one row repeated where n is odd: the padding)
            got = [row for batches in per_rank for batch in batches for t, row in batch if t == task]
            assert sorted(set(got)) == list(range(n)) and len(got) == n + n % 2


def test_temperature_sampling_draws_tasks_by_size_to_the_power_one_over_t():
    sizes = [400, 100]
    assert task_probabilities(sizes, "proportional", 2.0) == [0.8, 0.2]
    assert task_probabilities(sizes, "temperature", 2.0) == pytest.approx([2 / 3, 1 / 3])
    data = TaskRows([list(range(n)) for n in sizes])
    counts = collections.Counter()
    sampler = TaskBatchSampler(EpochCounter(data), 10, sizes=sizes, seed=0, sampling="temperature", temperature=2.0)
    for epoch in range(40):
        sampler.sampler.set_epoch(epoch)
        counts.update(batch[0][0] for batch in sampler)
    share = counts[1] / sum(counts.values())  # 2000 steps: sd of the share ~0.011
    assert abs(share - 1 / 3) < 0.04
    proportional = TaskBatchSampler(EpochCounter(data), 10, sizes=sizes, seed=0)
    assert collections.Counter(batch[0][0] for batch in proportional) == {0: 40, 1: 10}


def test_a_resumed_epoch_gives_the_batches_not_yet_trained_on(glue, tokenizer, tmp_path):
    dm = multi(glue, tokenizer, tmp_path, ["rte", "stsb"], batch_size=3)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(2)
    full = [(b["task"], b["input_ids"].tolist()) for b in loader]
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert [(b["task"], b["input_ids"].tolist()) for b in resumed] == full[3:]


def test_predict_and_test_of_one_task(glue, tokenizer, tmp_path):
    dm = multi(glue, tokenizer, tmp_path, ["rte", "mnli"], task="mnli")
    dm.stage = "test"
    dm.prepare_data()
    dm.setup("test")
    assert dm.eval_plan("test") == [("mnli", "test_matched"), ("mnli", "test_mismatched")]
    assert len(dm.test_dataloader()) == 2
    everything = multi(glue, tokenizer, tmp_path, ["rte", "mnli"])
    everything.stage = "predict"
    assert [task for task, _ in everything.eval_plan("predict")] == ["rte", "mnli", "mnli"]


def test_bad_task_lists_are_one_line(glue, tokenizer, tmp_path):
    a = write_csv(tmp_path / "a.csv", ["neg", "pos"])
    b = write_csv(tmp_path / "b.csv", ["bad", "good", "ok"])
    cases = {
        r"tasks=\['rte', 'foo'\]: task='foo' is not a GLUE task here; choose one of: cola, sst2": ["rte", "foo"],
        r"task 'sst2' is given twice; give each task once": ["sst2", "SST-2"],
        r"task 'reviews' is given twice, with labels \['neg', 'pos'\] and \['bad', 'good', 'ok'\]":
            [{"name": "reviews", "train_file": a}, {"name": "reviews", "train_file": b}],
        r"task 'rte' is given twice, with labels \['entailment', 'not_entailment'\] and \['neg', 'pos'\]; .*text "
        r"fields \['sentence1', 'sentence2'\] and \['review'\]": ["rte", {"name": "rte", "train_file": a}],
        r"tasks=\[\{'file': .*\}\]: 'file' is not a task option; a task's mapping takes task, train_file":
            [{"file": a}],
        r"tasks=\[\]: give a list of tasks": [],
        r"tasks=\[3\]: 3 is neither a GLUE task name": [3],
    }
    for message, tasks in cases.items():
        with pytest.raises(DataConfigError, match=message):
            multi(glue, tokenizer, tmp_path, tasks)
    with pytest.raises(DataConfigError, match=r"task='cola' is not one of --data.tasks: rte, stsb"):
        multi(glue, tokenizer, tmp_path, ["rte", "stsb"], task="cola")
    with pytest.raises(DataConfigError, match=r"sampling='round_robin': choose one of proportional, temperature"):
        multi(glue, tokenizer, tmp_path, ["rte", "stsb"], sampling="round_robin")
    with pytest.raises(DataConfigError, match=r"temperature=0: must be a number > 0"):
        multi(glue, tokenizer, tmp_path, ["rte", "stsb"], sampling="temperature", temperature=0)
    dm = multi(glue, tokenizer, tmp_path, ["rte", "stsb"], predict_file=a)
    dm.stage = "predict"
    with pytest.raises(DataConfigError, match=r"task=None: --data.predict_file is scored by one task's head"):
        dm.prepare_data()
