"""BitFit (Ben Zaken et al.): train the backbone's biases, nothing added."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .base import Merge, Target, TunerConfig


@dataclass(frozen=True)
class BitFitConfig(TunerConfig):
    name: ClassVar[str] = "bitfit"
    gatable: ClassVar[bool] = False
    merge: ClassVar[Merge] = Merge.FOLD  # the trained biases are the backbone's own weights already

    def inject(self, target: Target) -> None:
        for name, p in target.model.base_model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)

    def fold(self, model: nn.Module, layer: int, gates: Mapping[str, float]) -> None:
        """Nothing to fold: the biases trained in place."""
