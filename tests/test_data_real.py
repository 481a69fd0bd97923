"""The real GLUE files in ../shared/glue (skipped if absent): verified counts, labels, the paper's split."""

from __future__ import annotations

import csv
from collections import Counter

import pytest
from datasets import Dataset
from test_data_helpers import SHARED_GLUE, minilm_path

from datamodules import DataConfigError, GLUEDataModule, get_task
from datamodules.sources import load_raw_split

pytestmark = pytest.mark.skipif(not (SHARED_GLUE / "RTE").is_dir(), reason="../shared/glue is not here")

# From ../shared/glue/README.md: rows and label counts (by hub label id) per split.
VERIFIED = {
    ("cola", "train"): (8551, {0: 2528, 1: 6023}),
    ("cola", "validation"): (1043, {0: 322, 1: 721}),
    ("sst2", "train"): (67349, {0: 29780, 1: 37569}),
    ("sst2", "validation"): (872, {0: 428, 1: 444}),
    ("mrpc", "train"): (3668, {0: 1194, 1: 2474}),
    ("mrpc", "validation"): (408, {0: 129, 1: 279}),
    ("stsb", "train"): (5749, None),
    ("stsb", "validation"): (1500, None),
    ("qnli", "validation"): (5463, {0: 2702, 1: 2761}),  # entailment = 0, not_entailment = 1
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "validation"): (277, {0: 146, 1: 131}),
}


@pytest.mark.parametrize(("task", "split"), list(VERIFIED))
def test_verified_counts_and_labels(task: str, split: str) -> None:
    rows, labels = VERIFIED[task, split]
    ds = load_raw_split(get_task(task), split, SHARED_GLUE)
    assert len(ds) == rows and ds["idx"] == list(range(rows))
    if labels is None:  # STS-B scores
        assert min(ds["label"]) == 0.0 and max(ds["label"]) == 5.0
    else:
        assert dict(Counter(ds["label"])) == labels
    assert all(isinstance(ds[0][f], str) and ds[0][f] for f in get_task(task).text_fields)


def test_qnli_has_dev_but_no_train() -> None:
    assert len(load_raw_split(get_task("qnli"), "validation", SHARED_GLUE)) == 5463
    with pytest.raises(DataConfigError, match=r"QNLI/train\.tsv"):
        load_raw_split(get_task("qnli"), "train", SHARED_GLUE)
    with pytest.raises(DataConfigError, match=r"QNLI/train\.tsv"):
        GLUEDataModule("qnli", "unused", data_dir=str(SHARED_GLUE), k_shot=100)


@pytest.mark.parametrize(("task", "missing"), [("mnli", r"MNLI/train\.tsv"), ("qqp", r"QQP/train\.tsv")])
def test_missing_tasks_are_reported(task: str, missing: str) -> None:
    with pytest.raises(DataConfigError, match=missing):
        GLUEDataModule(task, "unused", data_dir=str(SHARED_GLUE))


@pytest.mark.skipif(minilm_path() is None, reason="the MiniLM tokenizer package is not installed")
@pytest.mark.parametrize("seed", [0, 1])
def test_rte_k100_with_a_real_tokenizer(tmp_path, seed: int) -> None:
    dm = GLUEDataModule("RTE", str(minilm_path()), data_dir=str(SHARED_GLUE), k_shot=100, seed=seed,
                        cache_dir=str(tmp_path))  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert [len(dm.datasets[s]) for s in ("train", "validation", "test")] == [100, 1000, 277]
    # The authors' split, computed independently from the file with the csv module.
    with open(SHARED_GLUE / "RTE" / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    reference = Dataset.from_dict({"s1": [r["sentence1"] for r in rows], "s2": [r["sentence2"] for r in rows]})
    reference = reference.shuffle(seed=seed)
    tokenizer = dm.tokenizer
    for split, picked in (("train", range(100)), ("validation", range(100, 1100))):
        want = reference.select(picked)
        encoded = tokenizer(list(want["s1"]), list(want["s2"]), truncation=True, max_length=128)["input_ids"]
        assert dm.datasets[split]["input_ids"] == encoded
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[1] <= 128 and batch["labels"].shape == (16,)
