"""Every private name of Lightning that the run pipeline uses, each with why no public API serves.

Nothing else in lightning_modules/, cli.py or reproduce/ reaches a private name of Lightning,
jsonargparse or torch: they call the functions here. `missing_private_api()` lists those this
Lightning lacks (a test names them); setup.cfg pins the range they were verified on.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities import seed as fabric_seed
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loops import _FitLoop  # the fit loop's class: only to name its private attributes
from pytorch_lightning.utilities import CombinedLoader

SUPPORTED_LIGHTNING = ">=2.4,<2.7"  # as in setup.cfg: the names below are in 2.4.0 (but one), 2.5.5 and 2.6.6

# (owner, name): what the pipeline uses that is not Lightning's public API.
PRIVATE_API: tuple[tuple[Any, str], ...] = (
    # Exact resume: Lightning saves no RNG state in checkpoints; these are its own collect/restore functions.
    (fabric_seed, "_collect_rng_states"),
    (fabric_seed, "_set_rng_states"),
    # `last.ckpt` after every validation and every N steps: ModelCheckpoint's public options tie the last
    # checkpoint to its own schedule; these three are how it writes one and when.
    (ModelCheckpoint, "_save_last_checkpoint"),
    (ModelCheckpoint, "_should_save_on_train_epoch_end"),
    (ModelCheckpoint, "_monitor_candidates"),
    # The train loader's saved position: Lightning hands it over only in `setup_data`, before our
    # checkpoint is read (see checkpointing.ExactResume); no public call restores it later.
    (CombinedLoader, "_load_state_dicts"),
    (_FitLoop, "_combined_loader"),  # instance attributes of trainer.fit_loop
    (_FitLoop, "_combined_loader_states_to_load"),
    # LightningCLI loads a --ckpt_path file's hyperparameters over the command line in this method
    # (a pickle traceback for a bad file; another run's method or backbone silently taking over). No
    # public option turns it off: CLIWithCheckpointCheck overrides it. New in 2.5: 2.4 reads no settings
    # from the checkpoint, so there is nothing to override there.
    (LightningCLI, "_parse_ckpt_path"),
)
_SINCE = {"_parse_ckpt_path": (2, 5)}  # names a Lightning before that version lacks and does not need


def missing_private_api() -> list[str]:
    """Names of `PRIVATE_API` this Lightning lacks (empty when everything here can work)."""
    fit_loop = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, accelerator="cpu", devices=1).fit_loop
    version = tuple(int(part) for part in pl.__version__.split(".")[:2])
    missing = []
    for owner, name in PRIVATE_API:
        if version < _SINCE.get(name, (0, 0)):
            continue
        present = hasattr(fit_loop, name) if owner is _FitLoop else callable(getattr(owner, name, None))
        if not present:
            missing.append(f"{getattr(owner, '__name__', owner)}.{name}")
    return missing


def private_api_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"exact resume needs Lightning's private {name}, which pytorch-lightning {pl.__version__} "
        f"lacks; install pytorch-lightning{SUPPORTED_LIGHTNING} (the range unipelt is tested on)"
    )


# ----------------------------------------------------------------------------- random generators
def collect_rng_states() -> dict[str, Any]:
    """torch, CUDA, numpy and Python's global generator states."""
    if not hasattr(fabric_seed, "_collect_rng_states"):
        raise private_api_error("lightning_fabric.utilities.seed._collect_rng_states")
    return fabric_seed._collect_rng_states(include_cuda=torch.cuda.is_available())


def set_rng_states(states: dict[str, Any]) -> None:
    if not hasattr(fabric_seed, "_set_rng_states"):
        raise private_api_error("lightning_fabric.utilities.seed._set_rng_states")
    fabric_seed._set_rng_states(states)


# ----------------------------------------------------------------------------- the last checkpoint
def saves_at_train_epoch_end(callback: ModelCheckpoint, trainer: pl.Trainer) -> bool:
    """Whether ``callback`` saves at the end of a training epoch (else after validation)."""
    return callback._should_save_on_train_epoch_end(trainer)


def save_last(callback: ModelCheckpoint, trainer: pl.Trainer) -> None:
    """Write ``callback``'s `last.ckpt` now, with the current monitored values."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


# ----------------------------------------------------------------------------- the train loader's position
def restore_train_loader_position(trainer: pl.Trainer) -> None:
    """Hand the train loader the position saved in the checkpoint being resumed (a no-op otherwise)."""
    fit_loop = trainer.fit_loop
    for name in ("_combined_loader_states_to_load", "_combined_loader"):
        if not hasattr(fit_loop, name):  # silently skipping would resume at the wrong batch
            raise private_api_error(f"_FitLoop.{name}")
    states = fit_loop._combined_loader_states_to_load
    loader = fit_loop._combined_loader
    if states and loader is not None:
        loader._load_state_dicts(states)
        fit_loop._combined_loader_states_to_load = []


# ----------------------------------------------------------------------------- LightningCLI
class CLIWithCheckpointCheck(LightningCLI):
    """LightningCLI whose `--ckpt_path` is checked by `check_ckpt_file` instead of read into the config."""

    def _parse_ckpt_path(self) -> None:
        self.check_ckpt_file()

    def check_ckpt_file(self) -> None:
        """Called where LightningCLI would read the checkpoint's hyperparameters over the config."""
