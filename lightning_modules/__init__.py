"""Lightning glue: the UniPELT model on a GLUE task."""

from lightning_modules.unipelt_module import (
    DEFAULT_LEARNING_RATES,
    CheckpointMismatchError,
    EpochTimer,
    UniPELTLightningModule,
)

__all__ = ["DEFAULT_LEARNING_RATES", "CheckpointMismatchError", "EpochTimer", "UniPELTLightningModule"]
