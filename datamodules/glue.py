"""GLUEDataModule: any GLUE task as the paper's splits, tokenised into batches a Hugging Face model takes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler
from transformers import AutoTokenizer, DataCollatorWithPadding

from datamodules.cache import cache_key, default_cache_dir, load_or_build, tokenize, tokenizer_identity
from datamodules.errors import DataConfigError
from datamodules.resumable import ResumableDataLoader
from datamodules.samplers import (
    EpochSeededRandomSampler,
    OrderedEvalSampler,
    UnpaddedDistributedSampler,
    longest_first,
)
from datamodules.sources import (
    count_rows,
    eval_split,
    load_raw_split,
    raw_splits,
    source_fingerprint,
    split_files,
)
from datamodules.splits import check_split_size, few_shot_split
from datamodules.tasks import TaskInfo, get_task

STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",)}


class Collate:
    """Pads each batch to its longest row and returns a plain dict (picklable for worker processes)."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.pad(rows))


class GLUEDataModule(pl.LightningDataModule):
    """The paper's splits of one GLUE task.

    Few-shot (`k_shot=K`): train = first K rows of GLUE train shuffled by `Dataset.shuffle(seed)`,
    validation = the next `dev_size` rows, test = GLUE dev. Full data (`k_shot=None`): train = GLUE
    train, validation = test = GLUE dev (the paper reports best-on-dev). MNLI has two test sets,
    matched then mismatched; its full-data validation is the matched one.
    Data comes from `data_dir` (GLUE TSVs or the hub's parquet export) if given, else the hub.
    """

    def __init__(
        self,
        task: str = "rte",
        model_name_or_path: str = "bert-base-uncased",
        data_dir: str | None = None,
        k_shot: int | None = None,
        seed: int = 0,
        dev_size: int = 1000,
        max_seq_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task_info: TaskInfo = self._resolve_task(task)
        self.num_labels: int = self.task_info.num_labels
        for name, value, low in (
            ("k_shot", k_shot, 1),
            ("seed", seed, 0),
            ("dev_size", dev_size, 1),
            ("max_seq_length", max_seq_length, 8),
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise DataConfigError(f"{name}={value!r}: must be an integer >= {low}")
        self.model_name_or_path = model_name_or_path
        self.data_dir = data_dir
        self.k_shot, self.seed, self.dev_size = k_shot, seed, dev_size
        self.max_seq_length = max_seq_length
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        if data_dir is not None:  # fail in __init__, before any training starts
            self._check_sources()
        self._tokenizer: Any = None
        self._raw_memo: dict[str, Dataset] = {}  # raw splits, only while _load runs
        self.datasets: dict[str, Dataset] = {}

    def _resolve_task(self, task: Any) -> TaskInfo:
        return get_task(task)

    def _check_sources(self, splits: tuple[str, ...] | None = None) -> None:
        """The local files of `splits` (default: every labelled split) exist, and K + dev_size fits in train."""
        assert self.data_dir is not None
        wanted = raw_splits(self.task_info) if splits is None else splits
        for split in wanted:
            split_files(self.task_info, split, self.data_dir)
        if self.k_shot is not None and "train" in wanted:
            rows = count_rows(self.task_info, "train", self.data_dir)
            check_split_size(self.k_shot, self.dev_size, rows, f"{self.task_info.name} train")

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from datamodules.hub import MODEL_HINT, prepare_for, resolve_local, unreachable

            prepare_for(self.model_name_or_path)
            try:
                path = resolve_local(self.model_name_or_path)
                self._tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
            except Exception:
                hub = unreachable(str(self.model_name_or_path), "--model.model_name_or_path", MODEL_HINT)
                if hub is not None:
                    raise hub from None
                raise
        return self._tokenizer

    @property
    def split_names(self) -> tuple[str, ...]:
        return ("train", "validation", *self.task_info.test_splits)

    # ------------------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Runs once per node: downloads (hub) and tokenises every split into the disk cache."""
        self._load(self.split_names)

    def setup(self, stage: str | None = None) -> None:
        """Cheap: memory-maps the cached splits this stage needs (building any that are missing)."""
        names = STAGE_SPLITS.get(stage, self.task_info.test_splits) if stage else self.split_names
        self.datasets.update(self._load(names))

    def train_dataloader(self) -> DataLoader:
        data = self._split("train")
        # Batch order belongs to the training seed (`seed_everything` sets torch's initial seed), as in
        # the authors' code; the split seed only picks the examples. The order is a pure function of
        # (training seed, epoch), see EpochSeededRandomSampler, and a run resumed mid-epoch gets exactly
        # the batches it had not trained on (resumable.py).
        sampler = EpochSeededRandomSampler(data, seed=torch.initial_seed())
        return self._loader(data, self.batch_size, sampler, ResumableDataLoader)

    def val_dataloader(self) -> DataLoader:
        data = self._split("validation")
        return self._loader(data, self.eval_batch_size, _eval_sampler(data))

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [
            self._loader(d, self.eval_batch_size, _eval_sampler(d))
            for d in map(self._split, self.task_info.test_splits)
        ]
        return loaders[0] if len(loaders) == 1 else loaders

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.test_dataloader()

    # ----------------------------------------------------------------------------------- internals
    def _split(self, name: str) -> Dataset:
        if name not in self.datasets:
            raise RuntimeError(f"the {name} split is not loaded: call setup() for its stage first")
        return self.datasets[name]

    def _loader(
        self, data: Dataset, batch_size: int, sampler: Sampler, loader: type[DataLoader] = DataLoader
    ) -> DataLoader:
        return loader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=Collate(self.tokenizer),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _plan(self) -> dict[str, tuple[str, dict[str, Any], Callable[[], Dataset]]]:
        """Per output split: a readable cache label, what identifies its rows, and how to build them raw."""
        task, raw = self.task_info, self._raw
        plan: dict[str, tuple[str, dict[str, Any], Callable[[], Dataset]]] = {}
        for test in task.test_splits:
            split = eval_split(task, test)
            plan[test] = (split, {"split": split}, lambda s=split: raw(s))
        if self.k_shot is None:
            plan["train"] = ("train-full", {"split": "train"}, lambda: raw("train"))
            plan["validation"] = plan[task.test_splits[0]]
        else:
            k, seed, dev = self.k_shot, self.seed, self.dev_size
            rows = {"split": "train", "k_shot": k, "seed": seed}
            plan["train"] = (f"train-k{k}-seed{seed}", rows, lambda: self._few_shot()[0])
            plan["validation"] = (
                f"dev-k{k}-seed{seed}-n{dev}",
                {**rows, "part": "dev", "dev_size": dev},
                lambda: self._few_shot()[1],
            )
        return plan

    def _fingerprint(self, rows: dict[str, Any]) -> str:
        return source_fingerprint(self.task_info, rows["split"], self.data_dir)

    def _raw(self, split: str) -> Dataset:
        if split not in self._raw_memo:
            self._raw_memo[split] = load_raw_split(self.task_info, split, self.data_dir)
        return self._raw_memo[split]

    def _few_shot(self) -> tuple[Dataset, Dataset]:
        assert self.k_shot is not None
        where = f"{self.task_info.name} train"
        return few_shot_split(self._raw("train"), self.k_shot, self.seed, self.dev_size, where)

    def _load(self, names: tuple[str, ...]) -> dict[str, Dataset]:
        """Each split from the disk cache, tokenising only the rows it uses when it is not there yet."""
        task, plan, tokenizer = self.task_info, self._plan(), self.tokenizer
        loaded = {}
        try:
            for name in names:
                label, rows, build_raw = plan[name]
                key = cache_key(
                    task=task.name,
                    rows=rows,
                    source=self._fingerprint(rows),
                    tokenizer=tokenizer_identity(tokenizer),
                    max_seq_length=self.max_seq_length,
                )
                path = self.cache_dir / (task.name if task.is_glue else "custom") / f"{label}-{key}"
                loaded[name] = load_or_build(
                    path,
                    lambda b=build_raw, k=key, n=name: tokenize(b(), tokenizer, task, self.max_seq_length, k, n),
                )
        finally:
            self._raw_memo = {}
        return loaded


def _eval_sampler(data: Dataset) -> Sampler:
    """Longest rows first (less padding per batch); under DDP sharded without Lightning's padding
    so each example is scored exactly once."""
    order = longest_first([len(ids) for ids in data["input_ids"]])
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return UnpaddedDistributedSampler(data, order=order)
    return OrderedEvalSampler(data, order)
