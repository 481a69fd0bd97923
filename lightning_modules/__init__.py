"""The run pipeline: the Lightning modules (classification, instruction), the one CLI class, callbacks, checkpoints.

Light on import (no torch) so that `cli.py --help` stays fast: the classes load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from lightning_modules.errors import (
    CheckpointFileError,
    CheckpointMismatchError,
    ModelConfigError,
    TrainingDiverged,
    UsageError,
)

_LAZY = {
    "AtomicCheckpointIO": "lightning_modules.checkpointing",
    "ExactResume": "lightning_modules.checkpointing",
    "LastCheckpoint": "lightning_modules.checkpointing",
    "load_checkpoint_file": "lightning_modules.checkpointing",
    "PELTModule": "lightning_modules.base",
    "UniPELTLightningModule": "lightning_modules.unipelt_module",
    "MultiTaskModule": "lightning_modules.multitask_module",
    "CausalLMModule": "lightning_modules.causal_lm",
    "RunSummary": "lightning_modules.summary",
    "PredictionWriter": "lightning_modules.predictions",
    "PELTCLI": "lightning_modules.run",
    "choose_kind": "lightning_modules.kinds",
    "build_cli": "lightning_modules.run",
}

__all__ = [
    "AtomicCheckpointIO",
    "CausalLMModule",
    "CheckpointFileError",
    "CheckpointMismatchError",
    "ExactResume",
    "LastCheckpoint",
    "ModelConfigError",
    "MultiTaskModule",
    "PELTCLI",
    "PELTModule",
    "PredictionWriter",
    "RunSummary",
    "TrainingDiverged",
    "UniPELTLightningModule",
    "UsageError",
    "build_cli",
    "choose_kind",
    "load_checkpoint_file",
]


def __getattr__(name: str) -> Any:
    """The modules pull in torch, Lightning and transformers: import them on first use."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
