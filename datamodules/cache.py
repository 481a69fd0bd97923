"""Tokenising a split with `datasets.map` and caching it on disk, keyed by everything it depends on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, load_from_disk

from datamodules.tasks import TaskInfo

CACHE_VERSION = 1  # bump when the tokenised format changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("UNIPELT_CACHE", Path.home() / ".cache" / "unipelt")) / "glue"


def file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """What tells a file's contents apart for the cache without reading it: resolved path, size, mtime."""
    file = Path(path).expanduser().resolve()
    stat = file.stat()
    return str(file), stat.st_size, stat.st_mtime_ns


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
    }


def cache_key(**parts: Any) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize(
    ds: Dataset, tokenizer: Any, task: TaskInfo, max_seq_length: int, fingerprint: str, split: str = ""
) -> Dataset:
    """Batched fast-tokeniser call, unpadded (the collator pads per batch); keeps model inputs + labels."""
    label_type = np.float32 if task.is_regression else np.int64

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        encoded = tokenizer(*(batch[f] for f in task.text_fields), truncation=True, max_length=max_seq_length)
        if "label" not in batch:  # rows to predict: their position instead, to put the outputs back in order
            return {**encoded, "idx": np.asarray(batch["idx"], dtype=np.int64)}
        return {**encoded, "labels": np.asarray(batch["label"], dtype=label_type)}

    # An explicit fingerprint spares datasets from hashing the tokenizer (slow); keep_in_memory
    # avoids a second copy in datasets' own cache, since ours is written next.
    return ds.map(
        encode,
        batched=True,
        batch_size=1000,
        remove_columns=ds.column_names,
        keep_in_memory=True,
        new_fingerprint=fingerprint,
        desc=f"Tokenising {task.name} {split}".rstrip(),
    )


def load_or_build(path: Path, build: Callable[[], Dataset]) -> Dataset:
    """Load a cached split, or build it and publish it atomically (safe when several processes race)."""
    if not (path / "dataset_info.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        data = build()
        import datasets

        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a bar per split for copying a few MB to disk is noise
        try:
            data.save_to_disk(str(tmp))
        except BaseException:  # e.g. a full disk: no half-written copy stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if was_enabled:
                datasets.enable_progress_bars()
        try:
            os.rename(tmp, path)
        except OSError:  # another process published it first
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(path))
