"""Checkpoints a killed run can resume from exactly, and that a wrong file cannot be mistaken for.

* `AtomicCheckpointIO` writes each checkpoint to a temporary file in the same folder, fsyncs it and
  renames it over the target, so a kill during saving leaves the previous checkpoint whole; it
  refuses a truncated or foreign file with one line (`CheckpointFileError`).
* `LastCheckpoint` keeps `last.ckpt` current: every `every_n_train_steps` optimizer steps and after
  every validation (the module refuses to save non-finite weights, so a good one is never replaced).
* `ExactResume` saves the global random generators (torch, CUDA, numpy, Python) in the checkpoint
  and puts them back when training resumes, so dropout continues the uninterrupted run's stream;
  and it hands the train loader its saved position (see the class).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from pytorch_lightning.callbacks import ModelCheckpoint

CHECKPOINT_KEY = "unipelt"


class CheckpointFileError(ValueError):
    """A --ckpt_path that is missing, truncated, not a torch checkpoint, or not written by unipelt."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


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
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointFileError(
            f"--ckpt_path {str(path)!r}: unreadable checkpoint, truncated or corrupt ({_first_line(err)})"
        ) from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise CheckpointFileError(
            f"--ckpt_path {str(path)!r}: a torch file but not a unipelt checkpoint (no {CHECKPOINT_KEY!r} entry)"
        )
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `.<name>.<pid>.tmp` beside the target, fsync, then `os.replace`: never half a checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        # Temporary files of processes killed while saving: nothing refers to them.
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            if stale != tmp and not _pid_alive(stale):
                stale.unlink(missing_ok=True)

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


def _pid_alive(tmp: Path) -> bool:
    try:
        pid = int(tmp.name.rsplit(".", 2)[-2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` steps (0: never mid-epoch) and after every validation."""

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0) -> None:
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps)

    @property
    def state_key(self) -> str:
        # Not keyed by the interval: a run resumed with another --model.checkpoint_every_n_steps keeps its state.
        return type(self).__name__

    def _should_skip_last(self, trainer: pl.Trainer) -> bool:
        from pytorch_lightning.trainer.states import TrainerFn

        return bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Also when a step checkpoint was written at this very step: the one after validation holds
        # the new dev score, the best-checkpoint bookkeeping and early stopping's count.
        if not self._should_skip_last(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_last(trainer) and self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


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
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        if "numpy" in states:  # plain lists: the checkpoint stays loadable with torch.load(weights_only=True)
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            states["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss))
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        states = getattr(fit_loop, "_combined_loader_states_to_load", None)
        loader = getattr(fit_loop, "_combined_loader", None)
        if states and loader is not None:
            loader._load_state_dicts(states)
            fit_loop._combined_loader_states_to_load = []
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
            _set_rng_states(state)
            self._pending = None
