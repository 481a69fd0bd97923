"""PELTConfig: one flat dataclass (every field overridable from a CLI) plus named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class PELTError(ValueError):
    """A configuration, model or checkpoint that unipelt cannot work with; the message says why."""


ACTIVATIONS = ("relu", "gelu", "tanh", "silu")
LORA_TARGETS = ("query", "key", "value")

@dataclass(frozen=True)
class Preset:
    """A named method: the submodules it turns on, its display name and default learning rate.

    The single table of methods: the Lightning module's default rates, ``reproduce``'s method
    list and the report's row names all read it. Default rates are those of a third-party
    reproduction that says it follows the paper: defaults to tune, not the paper's word.
    """

    name: str
    label: str  # the paper's row name
    learning_rate: float
    fields: dict[str, Any]


_PRESETS: dict[str, dict[str, Any]] = {
    "finetune": {"finetune": True},
    "bitfit": {"bitfit": True},
    # Single-method baselines are ungated, as in the paper.
    "adapter": {"adapter": True},
    "prefix": {"prefix": True},
    "lora": {"lora": True},
    "unipelt_ap": {"adapter": True, "adapter_gate": True, "prefix": True, "prefix_gate": True},
    # The paper's full-data ablation: every gate fixed (see README: what NoGate means).
    "unipelt_ap_nogate": {"adapter": True, "prefix": True},
    "unipelt_apl": {
        "adapter": True, "adapter_gate": True,
        "prefix": True, "prefix_gate": True,
        "lora": True, "lora_gate": True,
    },
    "unipelt_apl_nogate": {"adapter": True, "prefix": True, "lora": True},
}
_LABELS_AND_RATES: dict[str, tuple[str, float]] = {
    "finetune": ("Fine-tuning", 2e-5),
    "bitfit": ("BitFit", 1e-4),
    "adapter": ("Adapter", 1e-4),
    "prefix": ("Prefix-tuning", 2e-4),
    "lora": ("LoRA", 5e-4),
    "unipelt_ap": ("UniPELT (AP)", 5e-4),
    "unipelt_apl": ("UniPELT (APL)", 5e-4),
    "unipelt_ap_nogate": ("UniPELT (AP)-NoGate", 5e-4),
    "unipelt_apl_nogate": ("UniPELT (APL)-NoGate", 5e-4),  # no paper row; the same ablation for APL
}
# In the paper's row order; `name in PRESETS` and iteration give the preset names.
PRESETS: dict[str, Preset] = {
    name: Preset(name, *_LABELS_AND_RATES[name], fields) for name, fields in _PRESETS.items()
}


@dataclass
class PELTConfig:
    """Which submodules to inject and their hyperparameters (defaults: the paper's).

    A gate flag only matters when its submodule is on. Ungated submodules use a constant
    scale: 1 for adapter and prefix, ``lora_alpha / lora_r`` for LoRA (the authors' code).
    """

    name: str = "custom"
    finetune: bool = False
    bitfit: bool = False
    adapter: bool = False
    adapter_bottleneck: int = 48
    adapter_activation: str = "relu"
    adapter_gate: bool = False
    prefix: bool = False
    prefix_length: int = 10
    prefix_mid_dim: int = 512
    prefix_gate: bool = False
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16
    lora_targets: tuple[str, ...] = field(default=("query", "value"))
    lora_dropout: float = 0.0
    lora_gate: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            self.lora_targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        self.lora_targets = tuple(self.lora_targets)
        self._validate()

    def _validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise PELTError(f"{f.name} must be true or false, got {value!r}")
        for key in ("adapter_bottleneck", "prefix_length", "prefix_mid_dim", "lora_r"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PELTError(f"{key} must be a positive integer, got {value!r}")
        for key in ("lora_alpha", "init_std"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise PELTError(f"{key} must be a positive number, got {value!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0 <= self.lora_dropout < 1:
            raise PELTError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.adapter_activation not in ACTIVATIONS:
            raise PELTError(
                f"adapter_activation {self.adapter_activation!r} is not one of: {', '.join(ACTIVATIONS)}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad or not self.lora_targets or len(set(self.lora_targets)) != len(self.lora_targets):
            raise PELTError(f"lora_targets {list(self.lora_targets)} must be distinct names from: "
                            f"{', '.join(LORA_TARGETS)}")
        if self.finetune and (self.bitfit or self.adapter or self.prefix or self.lora):
            raise PELTError("finetune trains every weight and cannot be combined with "
                            "bitfit/adapter/prefix/lora")
        if not isinstance(self.name, str) or not self.name:
            raise PELTError(f"name must be a non-empty string, got {self.name!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PELTConfig:
        """A named preset with any field overridden, e.g. ``preset("unipelt_apl", lora_r=16)``."""
        if name not in _PRESETS:
            raise PELTError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        _check_fields(overrides)
        return cls(**{"name": name, **_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PELTConfig:
        _check_fields(d)
        return cls(**d)

    @property
    def gated(self) -> bool:
        return (self.adapter and self.adapter_gate) or (self.prefix and self.prefix_gate) \
            or (self.lora and self.lora_gate)


def _check_fields(d: dict[str, Any]) -> None:
    names = [f.name for f in dataclasses.fields(PELTConfig)]
    unknown = [k for k in d if k not in names]
    if unknown:
        raise PELTError(f"unknown PELTConfig field {unknown[0]!r}; allowed: {', '.join(names)}")
