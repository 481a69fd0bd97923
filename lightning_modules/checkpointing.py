"""Checkpoints a killed run can resume from exactly, and that a wrong file cannot be mistaken for.

* `AtomicCheckpointIO` writes each checkpoint to a temporary file in the same folder, fsyncs it and
  renames it over the target, so a kill during saving leaves the previous checkpoint whole; it
  refuses a truncated or foreign file with one line (`CheckpointFileError`).
* `LastCheckpoint` keeps `last.ckpt` current: every `every_n_train_steps` optimizer steps and after
  every validation (the module refuses to save non-finite weights, so a good one is never replaced);
  never at an epoch's last step before its validation, which Lightning would not run on resuming.
* `ExactResume` saves the global random generators (torch, CUDA, numpy, Python) in the checkpoint
  and puts them back when training resumes, so dropout continues the uninterrupted run's stream;
  and it hands the train loader its saved position (see the class).

Every checkpoint is read with `torch.load(weights_only=True)`: tensors, containers, numbers, strings
and the few types in `SAFE_CHECKPOINT_TYPES`. A file that would need anything else (a class, a
function) is refused in one line naming the file and the global it asked for; nothing in it runs.
Before that, every record of the zip archive is read against its CRC-32 (a flipped byte is named with
its record); after it, its parts must be mappings and every weight and optimizer moment finite, so a
damaged or diverged checkpoint is refused in one line before anything uses it (the unipelt record is
checked against its schema where it is read: `PELTModule.saved_identity`).

Exact resume leans on a few private names of Lightning, reached through `compat.py` (which lists
them and checks that they exist).
"""

from __future__ import annotations

import functools
import os
import pathlib
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.trainer.states import TrainerFn

from lightning_modules import compat
from lightning_modules.errors import CheckpointFileError
from unipelt import PELTError
from unipelt.atomic import atomic_write
from unipelt.checkpoint import check_tensors
from unipelt.errors import one_line

try:
    import fcntl
except ImportError:  # Windows: temporary files of killed writers stay
    fcntl = None

CHECKPOINT_KEY = "unipelt"
# Beyond tensors and plain containers: what a checkpoint of ours may hold. Paths appear when a module
# or data module is built from Python with a Path argument (Lightning saves the hyperparameters as
# given). Numpy never appears: ExactResume stores numpy's RNG state as plain lists.
SAFE_CHECKPOINT_TYPES: tuple[type, ...] = (
    pathlib.PurePosixPath,
    pathlib.PosixPath,
    pathlib.PureWindowsPath,
    pathlib.WindowsPath,
)
# Registered for the whole process, so that Lightning's own loaders (`load_from_checkpoint`, which
# torch.load with weights_only=True by default) read our checkpoints too.
torch.serialization.add_safe_globals(list(SAFE_CHECKPOINT_TYPES))


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """`torch.load` a checkpoint, or raise `CheckpointFileError` in one line saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"--ckpt_path {str(path)!r}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointFileError(f"--ckpt_path {str(path)!r}: the file is empty (a save was interrupted?)")
    if not zipfile.is_zipfile(path):
        raise CheckpointFileError(
            f"--ckpt_path {str(path)!r}: not a PyTorch checkpoint (truncated, or another kind of file)"
        )
    stat = path.stat()
    _verify_archive(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not re.search(r"GLOBAL|allowlisted|Can only", str(err)):  # e.g. "Unsupported operand": damaged
            raise CheckpointFileError(
                f"--ckpt_path {str(path)!r}: unreadable checkpoint, truncated or corrupt ({one_line(err, 160)})"
            ) from None
        raise CheckpointFileError(
            f"--ckpt_path {str(path)!r}: refused: loading it asks for {_unsafe_global(err)}, which a checkpoint of "
            "tensors and plain values never needs (nothing in the file was run)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointFileError(
            f"--ckpt_path {str(path)!r}: unreadable checkpoint, truncated or corrupt ({one_line(err, 160)})"
        ) from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise CheckpointFileError(
            f"--ckpt_path {str(path)!r}: a torch file but not a unipelt checkpoint (no {CHECKPOINT_KEY!r} entry)"
        )
    where = f"--ckpt_path {str(path)!r}"
    try:  # the unipelt record's fields are checked where they are read (PELTModule.saved_identity)
        for key in (CHECKPOINT_KEY, "state_dict", "hyper_parameters", "datamodule_hyper_parameters"):
            if not isinstance(checkpoint.get(key, {}), dict):
                raise PELTError(f"{where}: {key} must be a mapping, not {type(checkpoint[key]).__name__}")
        # The weights and the optimizer's moments; callbacks keep infinities on purpose (a best score not set yet).
        check_tensors(dict(_tensors({k: checkpoint.get(k) for k in ("state_dict", "optimizer_states")})), where)
    except PELTError as err:
        raise CheckpointFileError(str(err)) from None
    return checkpoint


@functools.lru_cache(maxsize=32)
def _verify_archive(path: str, size: int, mtime_ns: int, inode: int) -> None:
    """Read every record of the checkpoint's zip archive, which checks its CRC-32 (torch writes one per
    record); once per version of a file (size, mtime, inode) in a process."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                try:
                    with archive.open(info) as record:
                        while record.read(1 << 22):
                            pass
                except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
                    raise CheckpointFileError(
                        f"--ckpt_path {path!r}: damaged checkpoint: record {info.filename!r} fails its check "
                        f"({one_line(err, 80)})"
                    ) from None
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointFileError(f"--ckpt_path {path!r}: unreadable checkpoint ({one_line(err, 160)})") from None


def _tensors(value: Any, name: str = "") -> Iterator[tuple[str, Any]]:
    """Every tensor in a checkpoint, by its path (``state_dict.model.classifier.weight``)."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{name}.{i}")


def _unsafe_global(err: BaseException) -> str:
    """The global a weights-only load refused, e.g. 'builtins.open', from torch's message."""
    match = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(err))
    return repr(match.group(1) or match.group(2)) if match else "more than tensors and plain values"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through `unipelt.atomic.atomic_write` (a temporary file beside the target, fsynced, then
    renamed): never half a checkpoint. The writer holds a lock on its temporary file, so the next save
    can tell the temporary files of killed writers (unlocked) from a live one's and remove them."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        with atomic_write(target, "wb", fsync=True) as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            torch.save(checkpoint, f)
        _fsync_dir(target.parent)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            _remove_if_abandoned(stale)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location=map_location)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_if_abandoned(tmp: Path) -> None:
    """Delete a temporary checkpoint nobody holds the lock of (its writer was killed mid-save)."""
    if fcntl is None:
        return
    try:
        with open(tmp, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            tmp.unlink(missing_ok=True)
    except OSError:  # locked by a live writer, or already gone
        pass


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` steps (0: never mid-epoch) and after every validation."""

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0) -> None:
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps)

    @property
    def state_key(self) -> str:
        # Not keyed by the interval: a run resumed with another --model.checkpoint_every_n_steps keeps its state.
        return type(self).__name__

    def _should_skip_last(self, trainer: pl.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Not at an epoch's last batch: Lightning resumes a checkpoint saved there past the validation that
        # follows, so a kill during that validation would never see the epoch's dev score (another best
        # checkpoint). The save after that validation holds the same step, validated.
        if batch_idx + 1 < trainer.num_training_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Also when a step checkpoint was written at this very step: the one after validation holds
        # the new dev score, the best-checkpoint bookkeeping and early stopping's count.
        if not self._should_skip_last(trainer) and not compat.saves_at_train_epoch_end(self, trainer):
            compat.save_last(self, trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_last(trainer) and compat.saves_at_train_epoch_end(self, trainer):
            compat.save_last(self, trainer)


class RunRecord(pl.Callback):
    """Records the training seed (`seed_everything`) in every checkpoint's unipelt entry: with the module's and
    data module's settings (which Lightning saves) it says which run a checkpoint belongs to, so a resume
    into the same folder with another seed is refused (lightning_modules/run.py)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault(CHECKPOINT_KEY, {})["seed"] = self.seed


class ExactResume(pl.Callback):
    """What Lightning leaves out of an exact mid-epoch resume.

    * The global RNG states (torch, CUDA, numpy, Python) go into the checkpoint and come back in
      `on_train_start` of the resumed run, so dropout continues the same stream.
    * The train loader's position: Lightning restores a stateful loader only in `setup_data`, which
      has already run when `configure_optimizers` asked for `estimated_stepping_batches` (before the
      checkpoint was read), so the saved state would be ignored. It is handed over in
      `on_train_start` instead, before the first batch is drawn (our loader decides lazily).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = compat.collect_rng_states()
        if "numpy" in states:  # plain lists: the checkpoint stays loadable with torch.load(weights_only=True)
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            states["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss))
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        compat.restore_train_loader_position(trainer)
        # The RNG goes back here, after the sanity check and before anything the killed run would
        # have done next: a validation it did not finish (which draws a seed for its loader), a step.
        if self._pending is not None:
            state = dict(self._pending)
            if not torch.cuda.is_available():
                state.pop("torch.cuda", None)
            if "numpy" in state:
                import numpy as np

                kind, keys, pos, has_gauss, gauss = state["numpy"]
                state["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)
            compat.set_rng_states(state)
            self._pending = None
