"""GLUEDataModule end to end on fixture files: batches, the paper's splits, caching, validation, Lightning."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from test_data_helpers import SIZES, write_all, write_task, write_tokenizer
from torch.utils.data import DataLoader

from datamodules import GLUE_TASKS, DataConfigError, GLUEDataModule
from datamodules import text as text_module
from datamodules.samplers import EpochSeededRandomSampler


@pytest.fixture(scope="module")
def glue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    write_all(root)
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def make(glue: Path, tokenizer: str, cache: Path, task: str = "rte", **kwargs) -> GLUEDataModule:
    return GLUEDataModule(task, tokenizer, data_dir=str(glue), cache_dir=str(cache), **kwargs)


@pytest.mark.parametrize("task", list(GLUE_TASKS))
@pytest.mark.parametrize("k_shot", [8, None])
def test_every_task_gives_model_ready_batches(glue, tokenizer, tmp_path, task: str, k_shot: int | None):
    dm = make(glue, tokenizer, tmp_path, task, k_shot=k_shot, dev_size=10, batch_size=4, eval_batch_size=5)
    assert dm.num_labels == dm.task_info.num_labels
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    tests = dm.test_dataloader()
    if task == "mnli":  # matched, then mismatched
        sizes = [SIZES["validation_matched"], SIZES["validation_mismatched"]]
        assert [len(t.dataset) for t in tests] == sizes
        test_size = SIZES["validation_matched"]
    else:
        assert isinstance(tests, DataLoader) and len(tests.dataset) == SIZES["validation"]
        test_size = SIZES["validation"]
    assert len(dm.datasets["train"]) == (k_shot or SIZES["train"])
    assert len(dm.datasets["validation"]) == (10 if k_shot else test_size)
    batch = next(iter(dm.train_dataloader()))
    assert type(batch) is dict
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].dtype == (torch.float32 if task == "stsb" else torch.int64)
    assert batch["labels"].shape == (4,) and batch["input_ids"].shape[0] == 4
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
    if task != "stsb":
        labels = torch.cat([b["labels"] for b in dm.val_dataloader()])
        assert labels.min() >= 0 and labels.max() < dm.num_labels


def test_dynamic_padding_and_truncation(glue, tokenizer, tmp_path) -> None:
    dm = make(glue, tokenizer, tmp_path, "rte", k_shot=None, max_seq_length=16, eval_batch_size=2)
    dm.setup("validate")
    widths = []
    for batch in dm.val_dataloader():
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == lengths.max() <= 16  # padded to the batch's longest row only
        widths.append(batch["input_ids"].shape[1])
    assert min(widths) < 16 == max(widths)  # some rows were truncated, some batches are shorter


def test_no_token_type_ids_when_the_tokenizer_has_none(glue, tmp_path) -> None:
    tok = write_tokenizer(tmp_path / "tok", with_token_types=False)
    dm = make(glue, tok, tmp_path / "cache", "sst2", k_shot=4, dev_size=4)
    dm.setup("fit")
    assert set(next(iter(dm.train_dataloader()))) == {"input_ids", "attention_mask", "labels"}


def test_tokenises_only_the_rows_a_split_uses_and_caches_them(glue, tokenizer, tmp_path, monkeypatch) -> None:
    sizes = []
    real = text_module.tokenize
    monkeypatch.setattr(text_module, "tokenize", lambda ds, *a: sizes.append(len(ds)) or real(ds, *a))
    make(glue, tokenizer, tmp_path, "rte", k_shot=8, dev_size=10).prepare_data()
    assert sizes == [8, 10, SIZES["validation"]]
    dm = make(glue, tokenizer, tmp_path, "rte", k_shot=8, dev_size=10)
    dm.prepare_data()
    dm.setup()  # second time: everything from the cache
    assert sizes == [8, 10, SIZES["validation"]]
    make(glue, tokenizer, tmp_path, "rte", k_shot=8, dev_size=10, seed=1).prepare_data()
    assert sizes[3:] == [8, 10]  # a new seed re-splits; GLUE dev (the test set) is reused
    make(glue, tokenizer, tmp_path, "rte", k_shot=8, dev_size=10, max_seq_length=16).prepare_data()
    assert sizes[5:] == [8, 10, SIZES["validation"]]  # max length is part of the key
    assert all(p.parent.name == "rte" for p in tmp_path.glob("*/*"))


def test_setup_without_prepare_data_and_per_stage(glue, tokenizer, tmp_path) -> None:
    dm = make(glue, tokenizer, tmp_path, "mnli", k_shot=8, dev_size=10)
    dm.setup("test")
    assert set(dm.datasets) == {"test_matched", "test_mismatched"}
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "validation", "test_matched", "test_mismatched"}


def test_same_split_from_separate_caches(glue, tokenizer, tmp_path) -> None:
    rows = []
    for run in range(2):
        dm = make(glue, tokenizer, tmp_path / str(run), "sst2", k_shot=8, dev_size=20, seed=5)
        dm.setup("fit")
        rows.append((dm.datasets["train"]["input_ids"], dm.datasets["validation"]["input_ids"]))
    assert rows[0] == rows[1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "wnli"}, "task='wnli'"),
        ({"k_shot": 0}, "k_shot=0"),
        ({"dev_size": 0}, "dev_size=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"max_seq_length": 2}, "max_seq_length=2"),
        ({"seed": -1}, "seed=-1"),
        ({"k_shot": 30, "dev_size": 20}, r"k_shot=30 \+ dev_size=20 = 50 is more than the 40 rows of rte"),
        ({"data_dir": "/nonexistent/glue"}, "data_dir='/nonexistent/glue' is not a directory"),
    ],
)
def test_bad_arguments_fail_in_init_with_one_line(glue, tokenizer, tmp_path, kwargs, match) -> None:
    args = {"task": "rte", "model_name_or_path": tokenizer, "data_dir": str(glue), "cache_dir": str(tmp_path)}
    with pytest.raises(DataConfigError, match=match) as err:
        GLUEDataModule(**{**args, **kwargs})
    assert "\n" not in str(err.value)


def test_missing_task_file_fails_in_init_naming_it(tmp_path, tokenizer) -> None:
    write_task(tmp_path, "mnli")
    (tmp_path / "MNLI" / "dev_mismatched.tsv").unlink()
    with pytest.raises(DataConfigError, match=r"MNLI/dev_mismatched\.tsv"):
        GLUEDataModule("mnli", tokenizer, data_dir=str(tmp_path))
    with pytest.raises(DataConfigError, match="no QQP/ folder"):
        GLUEDataModule("qqp", tokenizer, data_dir=str(tmp_path))


class _RecordOrder(pl.LightningModule):
    """Records which rows each training epoch saw (by input ids), and checks the batch contract."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[list[int]]] = {}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        assert set(batch) >= {"input_ids", "attention_mask", "labels"}
        rows = [
            ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        self.seen.setdefault(self.current_epoch, []).extend(rows)
        return self.weight.sum() * 0 + batch["labels"].float().mean() * self.weight.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_epochs_replay_from_seed_and_epoch(glue, tokenizer, tmp_path) -> None:
    dm = make(glue, tokenizer, tmp_path, "sst2", k_shot=16, dev_size=8, batch_size=4, seed=3)
    model = _RecordOrder()
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", limit_val_batches=0, enable_model_summary=False, **quiet)
    pl.seed_everything(11)  # the training seed owns the batch order; the split seed (3) only the examples
    trainer.fit(model, datamodule=dm)
    assert model.seen[0] != model.seen[1]
    for epoch in (0, 1):
        sampler = EpochSeededRandomSampler(dm.datasets["train"], seed=11)
        sampler.set_epoch(epoch)  # what a resumed run does: no generator state needed
        assert model.seen[epoch] == [dm.datasets["train"][i]["input_ids"] for i in sampler]
