"""Checkpoints a killed run can resume from exactly, and that a wrong file cannot be mistaken for.

* `AtomicCheckpointIO` writes each checkpoint to a temporary file in the same folder, fsyncs it and
  renames it over the target, so a kill during saving leaves the previous checkpoint whole; it
  refuses a truncated or foreign file with one line (`CheckpointFileError`).
* `LastCheckpoint` keeps `last.ckpt` current: every `every_n_train_steps` optimizer steps and after
  every validation (the module refuses to save non-finite weights, so a good one is never replaced).
* `ExactResume` saves the global random generators (torch, CUDA, numpy, Python) in the checkpoint
  and puts them back when training resumes, so dropout continues the uninterrupted run's stream;
  and it hands the train loader its saved position (see the class).

Every checkpoint is read with `torch.load(weights_only=True)`: tensors, containers, numbers, strings
and the few types in `SAFE_CHECKPOINT_TYPES`. A file that would need anything else (a class, a
function) is refused in one line naming the file and the global it asked for; nothing in it runs.

Exact resume leans on a few private names of Lightning (`LIGHTNING_PRIVATE_API`), checked by
`missing_lightning_private_api()` and a test: setup.cfg pins the range they were verified on.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities import seed as fabric_seed
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loops import _FitLoop
from pytorch_lightning.utilities import CombinedLoader

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
SUPPORTED_LIGHTNING = ">=2.4,<2.7"  # as in setup.cfg: the private names below are in 2.4.0, 2.5.5 and 2.6.6
# (owner, attribute): what exact resume uses that is not Lightning's public API.
LIGHTNING_PRIVATE_API: tuple[tuple[Any, str], ...] = (
    (fabric_seed, "_collect_rng_states"),
    (fabric_seed, "_set_rng_states"),
    (ModelCheckpoint, "_save_last_checkpoint"),
    (ModelCheckpoint, "_should_save_on_train_epoch_end"),
    (ModelCheckpoint, "_monitor_candidates"),
    (CombinedLoader, "_load_state_dicts"),
    (_FitLoop, "_combined_loader"),  # instance attributes of trainer.fit_loop
    (_FitLoop, "_combined_loader_states_to_load"),
)


def missing_lightning_private_api() -> list[str]:
    """Names of `LIGHTNING_PRIVATE_API` this Lightning lacks (empty when exact resume can work)."""
    fit_loop = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, accelerator="cpu", devices=1).fit_loop
    missing = []
    for owner, name in LIGHTNING_PRIVATE_API:
        present = hasattr(fit_loop, name) if owner is _FitLoop else callable(getattr(owner, name, None))
        if not present:
            missing.append(f"{getattr(owner, '__name__', owner)}.{name}")
    return missing


def _private_api_error(name: str) -> RuntimeError:
    import pytorch_lightning

    return RuntimeError(
        f"exact resume needs Lightning's private {name}, which pytorch-lightning {pytorch_lightning.__version__} "
        f"lacks; install pytorch-lightning{SUPPORTED_LIGHTNING} (the range unipelt is tested on)"
    )


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
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not re.search(r"GLOBAL|allowlisted|Can only", str(err)):  # e.g. "Unsupported operand": damaged
            raise CheckpointFileError(
                f"--ckpt_path {str(path)!r}: unreadable checkpoint, truncated or corrupt ({_first_line(err)})"
            ) from None
        raise CheckpointFileError(
            f"--ckpt_path {str(path)!r}: refused: loading it asks for {_unsafe_global(err)}, which a checkpoint of "
            "tensors and plain values never needs (nothing in the file was run)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointFileError(
            f"--ckpt_path {str(path)!r}: unreadable checkpoint, truncated or corrupt ({_first_line(err)})"
        ) from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise CheckpointFileError(
            f"--ckpt_path {str(path)!r}: a torch file but not a unipelt checkpoint (no {CHECKPOINT_KEY!r} entry)"
        )
    return checkpoint


def _unsafe_global(err: BaseException) -> str:
    """The global a weights-only load refused, e.g. 'builtins.open', from torch's message."""
    match = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(err))
    return repr(match.group(1) or match.group(2)) if match else "more than tensors and plain values"


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
        if not hasattr(fabric_seed, "_collect_rng_states"):
            raise _private_api_error("lightning_fabric.utilities.seed._collect_rng_states")
        states = fabric_seed._collect_rng_states(include_cuda=torch.cuda.is_available())
        if "numpy" in states:  # plain lists: the checkpoint stays loadable with torch.load(weights_only=True)
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            states["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss))
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        for name in ("_combined_loader_states_to_load", "_combined_loader"):
            if not hasattr(fit_loop, name):  # silently skipping would resume at the wrong batch
                raise _private_api_error(f"_FitLoop.{name}")
        states = fit_loop._combined_loader_states_to_load
        loader = fit_loop._combined_loader
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
            if not hasattr(fabric_seed, "_set_rng_states"):
                raise _private_api_error("lightning_fabric.utilities.seed._set_rng_states")
            fabric_seed._set_rng_states(state)
            self._pending = None
