"""What every tuner file provides: a config dataclass whose ``inject`` adds the tuner to a model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..backbones import BackboneSpec, Dims
from ..errors import PELTError
from ..gates import GateRequests, GateSlot


@dataclass
class Target:
    """The model being changed and what tuners need to know about it."""

    model: nn.Module
    spec: BackboneSpec
    dims: Dims
    layers: nn.ModuleList
    gates: GateRequests
    device: torch.device
    dtype: torch.dtype
    init_std: float

    def gate(self, gated: bool, layer: int, site: str, key: str) -> GateSlot | None:
        """A gate slot if ``gated`` (``site``: ``"attention"`` input or ``"adapter"`` input)."""
        return self.gates.request(layer, site, key) if gated else None

    def new(self, module: nn.Module) -> nn.Module:
        """A new module placed on the backbone's device and dtype."""
        return module.to(self.device, self.dtype)


@dataclass(frozen=True)
class TunerConfig:
    """Base of the per-submodule configs. ``gate``: scale by a learned gate (else a constant).

    ``name`` is the tuner's key in ``PELTConfig`` and the prefix of its flat overrides
    (``lora_r`` is ``LoRAConfig.r``). ``gatable``: whether the tuner has a gate at all.
    """

    name: ClassVar[str] = ""
    gatable: ClassVar[bool] = True
    changes_attention: ClassVar[bool] = False  # families with explicit attention code replace it
    gate: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise PELTError(f"{self.name}_{f.name} must be true or false, got {value!r}")
        if self.gate and not self.gatable:
            raise PELTError(f"{self.name} has no gate; {self.name}_gate must be false")
        self.validate()

    def validate(self) -> None:
        """Check the fields; raise PELTError naming the bad value and the allowed ones."""

    def inject(self, target: Target) -> None:
        raise NotImplementedError

    # helpers for validate()
    def _positive_int(self, *names: str) -> None:
        for key in names:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PELTError(f"{self.name}_{key} must be a positive integer, got {value!r}")

    def _positive_number(self, *names: str) -> None:
        for key in names:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise PELTError(f"{self.name}_{key} must be a positive number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}
