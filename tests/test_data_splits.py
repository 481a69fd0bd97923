"""The few-shot split (the authors' exact recipe) and the samplers that make order and coverage exact."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from pytorch_lightning.trainer.connectors.data_connector import _get_distributed_sampler
from test_data_helpers import write_task, write_tokenizer
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from datamodules import DataConfigError, GLUEDataModule, get_task
from datamodules.samplers import EpochSeededRandomSampler, UnpaddedDistributedSampler
from datamodules.sources import load_raw_split
from datamodules.splits import few_shot_split


@pytest.fixture(scope="module")
def glue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    write_task(root, "rte", sizes={"train": 200, "validation": 12})
    return root


def _independent_train(root: Path) -> Dataset:
    """GLUE's RTE train in file order, read with the csv module, as the authors' code would see it."""
    with open(root / "RTE" / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return Dataset.from_dict({"sentence1": [r["sentence1"] for r in rows], "idx": list(range(len(rows)))})


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_split_is_the_authors_shuffle(glue: Path, seed: int) -> None:
    train, dev = few_shot_split(load_raw_split(get_task("rte"), "train", glue), 16, seed, 50)
    reference = _independent_train(glue).shuffle(seed=seed)
    assert train["sentence1"] == reference.select(range(16))["sentence1"]
    assert dev["sentence1"] == reference.select(range(16, 66))["sentence1"]
    assert train["idx"] == reference.select(range(16))["idx"]


def test_split_is_deterministic_disjoint_and_seed_dependent(glue: Path) -> None:
    raw = load_raw_split(get_task("rte"), "train", glue)
    a_train, a_dev = few_shot_split(raw, 32, 3, 100)
    b_train, b_dev = few_shot_split(load_raw_split(get_task("rte"), "train", glue), 32, 3, 100)
    assert a_train["idx"] == b_train["idx"] and a_dev["idx"] == b_dev["idx"]
    assert not set(a_train["idx"]) & set(a_dev["idx"])
    assert len(set(a_train["idx"])) == 32 and len(set(a_dev["idx"])) == 100
    assert few_shot_split(raw, 32, 4, 100)[0]["idx"] != a_train["idx"]
    with pytest.raises(DataConfigError, match=r"k_shot=150 \+ dev_size=100 = 250 is more than the 200 rows"):
        few_shot_split(raw, 150, 100, 100)


SPLIT_IN_A_FRESH_PROCESS = """
import sys
from datamodules import get_task
from datamodules.sources import load_raw_split
from datamodules.splits import few_shot_split
train, dev = few_shot_split(load_raw_split(get_task("rte"), "train", sys.argv[1]), 32, 7, 100)
print(train["idx"], dev["idx"])
"""


def test_split_is_the_same_in_other_processes_and_ranks(glue: Path) -> None:
    """A DDP rank is a fresh process with its own hash seed and RANK: neither may move the split."""
    train, dev = few_shot_split(load_raw_split(get_task("rte"), "train", glue), 32, 7, 100)
    env = {**os.environ, "PYTHONHASHSEED": "123", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", SPLIT_IN_A_FRESH_PROCESS, str(glue)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{train['idx']} {dev['idx']}"


def test_impossible_split_fails_in_init(glue: Path, tmp_path: Path) -> None:
    with pytest.raises(DataConfigError, match=r"k_shot=150 \+ dev_size=100 = 250 is more than the 200 rows"):
        GLUEDataModule("rte", "unused", data_dir=str(glue), k_shot=150, dev_size=100, cache_dir=str(tmp_path))
    for bad in (0, -5):
        with pytest.raises(DataConfigError, match=f"k_shot={bad}"):
            GLUEDataModule("rte", "unused", data_dir=str(glue), k_shot=bad, cache_dir=str(tmp_path))


@pytest.mark.parametrize("size", [0, 1, 7, 10, 277])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_unpadded_sampler_counts_every_example_once(size: int, world: int) -> None:
    data = list(range(size))
    shards = [list(UnpaddedDistributedSampler(data, num_replicas=world, rank=r)) for r in range(world)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == data  # union is everything, nothing twice
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for rank, shard in enumerate(shards):
        sampler = UnpaddedDistributedSampler(data, num_replicas=world, rank=rank)
        assert isinstance(sampler, DistributedSampler) and len(sampler) == len(shard)
        assert shard == data[rank::world]
    if size % world:  # torch's own sampler would have padded with repeats
        assert len(DistributedSampler(data, num_replicas=world, rank=0, shuffle=False)) * world > size


def test_eval_loaders_use_it_under_ddp(glue: Path, tmp_path: Path, monkeypatch) -> None:
    dm = GLUEDataModule("rte", write_tokenizer(tmp_path / "tok"), data_dir=str(glue), k_shot=16, dev_size=15,
                        cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.setup()
    assert not isinstance(dm.val_dataloader().sampler, DistributedSampler)  # not distributed here
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 1)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert isinstance(loader.sampler, UnpaddedDistributedSampler)
        lengths = [len(ids) for ids in loader.dataset["input_ids"]]
        by_length = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        assert loader.sampler.rank == 1 and list(loader.sampler) == by_length[1::2]
    assert len(dm.val_dataloader().sampler) == 7  # 15 rows: ranks get 8 and 7, no padding


def test_eval_runs_longest_first_and_pads_less(glue: Path, tmp_path: Path) -> None:
    dm = GLUEDataModule("rte", write_tokenizer(tmp_path / "tok"), data_dir=str(glue), k_shot=16, dev_size=15,
                        eval_batch_size=4, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.setup()
    loader = dm.val_dataloader()
    lengths = [len(ids) for ids in loader.dataset["input_ids"]]
    assert len(set(lengths)) > 1  # the fixture has rows of different lengths
    order = list(loader.sampler)
    assert sorted(order) == list(range(len(lengths)))  # every example once
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    padded = sum(b["input_ids"].numel() for b in loader)
    in_file_order = sum(max(lengths[i:i + 4]) * len(lengths[i:i + 4]) for i in range(0, len(lengths), 4))
    assert padded <= in_file_order and padded == sum(
        max(lengths[i] for i in order[j:j + 4]) * len(order[j:j + 4]) for j in range(0, len(order), 4))


def test_train_order_is_a_function_of_seed_and_epoch() -> None:
    data = list(range(100))
    orders = {}
    for seed in (0, 1):
        for epoch in (0, 1, 2):
            sampler = EpochSeededRandomSampler(data, seed=seed)
            sampler.set_epoch(epoch)
            orders[seed, epoch] = list(sampler)
            assert sorted(orders[seed, epoch]) == data
            assert list(sampler) == orders[seed, epoch]  # re-iterating replays, no hidden state
    assert len({tuple(o) for o in orders.values()}) == len(orders)
    replay = EpochSeededRandomSampler(data, seed=1)
    replay.set_epoch(2)
    assert list(replay) == orders[1, 2]


def test_lightning_swaps_in_its_normal_sampler_for_ddp_training() -> None:
    """A RandomSampler subclass: under DDP Lightning swaps in a plain DistributedSampler(shuffle=True)."""
    loader = DataLoader(list(range(10)), sampler=EpochSeededRandomSampler(list(range(10)), seed=0))
    assert isinstance(loader.sampler, RandomSampler)
    swapped = _get_distributed_sampler(loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=0)
    assert type(swapped) is DistributedSampler and swapped.shuffle
