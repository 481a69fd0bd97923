"""BitFit (Ben Zaken et al.): train the backbone's biases, nothing added."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Target, TunerConfig


@dataclass(frozen=True)
class BitFitConfig(TunerConfig):
    name: ClassVar[str] = "bitfit"
    gatable: ClassVar[bool] = False

    def inject(self, target: Target) -> None:
        for name, p in target.model.base_model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
