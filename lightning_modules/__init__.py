"""Lightning glue: the UniPELT model on a GLUE task, and checkpoints that resume exactly."""

from lightning_modules.base import PELTModule
from lightning_modules.checkpointing import (
    AtomicCheckpointIO,
    CheckpointFileError,
    ExactResume,
    LastCheckpoint,
    load_checkpoint_file,
)
from lightning_modules.unipelt_module import (
    CheckpointMismatchError,
    EpochTimer,
    ModelConfigError,
    UniPELTLightningModule,
)

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointFileError",
    "CheckpointMismatchError",
    "EpochTimer",
    "LastCheckpoint",
    "ModelConfigError",
    "ExactResume",
    "PELTModule",
    "UniPELTLightningModule",
    "load_checkpoint_file",
]
