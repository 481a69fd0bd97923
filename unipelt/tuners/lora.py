"""LoRA (Hu et al.) as a side path on frozen projections: ``y = W x + b + s * B A x``.

``s`` is ``alpha / r`` ungated, or the per-example gate (which replaces alpha/r, as in the
paper). The update is never merged into a weight copy during training: the side path costs
``2 r (in + out)`` FLOPs per token and the scale is applied to the r-wide activation.

Every LoRA-wrapped projection exposes its targets per name: ``targets``, ``lora_pair(t)``
(the A and B Linears) and ``delta_weight(t)`` (``s * B @ A`` as a ``(rows, in)`` matrix, with
``output_slice(t)`` the rows of the wrapped weight it adds to), so exports (ungated LoRA to
PEFT, merging into weights) need not know whether the projection was fused.

``merge`` folds it into the wrapped weight, ``W + s B A`` (``s`` a fixed gate when gated); ``to_peft``
writes PEFT's LoRA (its constant scale ``alpha / r``; a fixed gate is folded into ``B``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.nn.functional import linear

from ..backbones import BackboneSpec
from ..errors import PELTError
from ..gates import GateSlot
from .base import Merge, PeftAdapter, Target, TunerConfig, backbone_path, model_layer, replace_children

TARGETS = ("query", "key", "value")
SMALL_OUTPUT = 1 << 16  # elements: below it an update in fewer ops beats one that never holds B z whole


def _pair(in_features: int, out_features: int, r: int) -> tuple[nn.Linear, nn.Linear]:
    a, b = nn.Linear(in_features, r, bias=False), nn.Linear(r, out_features, bias=False)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)
    return a, b


class LoRALinear(nn.Module):
    """One projection (``query``, say) with LoRA; ``base`` keeps the frozen Linear."""

    def __init__(self, base: nn.Linear, target: str, r: int, alpha: float, dropout: float,
                 gate: GateSlot | None) -> None:
        super().__init__()
        self.base = base
        self.target = target
        self.lora_A, self.lora_B = _pair(base.in_features, base.out_features, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.gate = gate  # reads the projection input (the attention input)

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.target,)

    def lora_pair(self, target: str) -> tuple[nn.Linear, nn.Linear]:
        _check(target, self.targets)
        return self.lora_A, self.lora_B

    def output_slice(self, target: str) -> slice:
        _check(target, self.targets)
        return slice(0, self.base.out_features)

    def delta_weight(self, target: str) -> torch.Tensor:
        """``alpha/r * B @ A`` (the ungated update; a gated one scales it per example)."""
        a, b = self.lora_pair(target)
        return self.scaling * (b.weight @ a.weight)

    @property
    def gate_slots(self) -> dict[str, GateSlot | None]:
        return {self.target: self.gate}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A and B are applied as functions, not called as modules: in a decoder's generation step a
        # module call costs about what the tiny matmul does.
        a, b = self.lora_A.weight, self.lora_B.weight
        z = linear(self.dropout(x) if self.training else x, a)
        scale = self.gate.scale(x) if self.gate is not None else self.scaling
        y = self.base(x)
        if y.dtype != b.dtype or (self.gate is not None and scale.shape[0] != y.shape[0]):
            # a batch-shared input (DeBERTa's positions) with per-example gates, or autocast (the
            # in-place updates below are not autocast: the out-of-place path casts for us)
            return y + linear(z * scale, b)
        # In place on the base output, which its backward does not need: no full-width copy.
        if y.numel() <= SMALL_OUTPUT:  # a generation step: y += scale * B z in the fewest ops
            update = linear(z, b)
            return y.addcmul_(update, scale) if self.gate is not None else y.add_(update, alpha=self.scaling)
        y.view(-1, y.shape[-1]).addmm_((z * scale).reshape(-1, z.shape[-1]), b.t())
        return y


class FusedLoRALinear(nn.Module):
    """A fused q/k/v projection (ModernBERT's ``Wqkv``) with LoRA on some of its slices.

    The A matrices of all targets run as one matmul; each target has its own B, scale and gate.
    """

    def __init__(self, base: nn.Linear, slices: dict[str, slice], r: int, alpha: float,
                 dropout: float, gates: dict[str, GateSlot | None]) -> None:
        super().__init__()
        self.base = base
        self.slices = dict(slices)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        in_features = base.weight.shape[0] if is_conv1d(base) else base.in_features
        for t, sl in self.slices.items():
            self.lora_A[t], self.lora_B[t] = _pair(in_features, sl.stop - sl.start, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.r = r
        self.gates = gates

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.slices)

    def lora_pair(self, target: str) -> tuple[nn.Linear, nn.Linear]:
        _check(target, self.targets)
        return self.lora_A[target], self.lora_B[target]

    def output_slice(self, target: str) -> slice:
        _check(target, self.targets)
        return self.slices[target]

    def delta_weight(self, target: str) -> torch.Tensor:
        a, b = self.lora_pair(target)
        return self.scaling * (b.weight @ a.weight)

    @property
    def gate_slots(self) -> dict[str, GateSlot | None]:
        return self.gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = torch.cat([self.lora_A[t].weight for t in self.slices])  # (targets * r, in)
        z = nn.functional.linear(self.dropout(x), a).split(self.r, dim=-1)
        for (t, sl), zt in zip(self.slices.items(), z, strict=True):
            gate = self.gates[t]
            zt = zt * (gate.scale(x) if gate is not None else self.scaling)
            # in place on the base output (not needed for backward): no copy of the whole qkv
            y[..., sl] += self.lora_B[t](zt)
        return y


def merged_base(lora: LoRALinear | FusedLoRALinear, gates: Mapping[str, float]) -> nn.Module:
    """The wrapped projection with ``scale * B @ A`` added to each target's outputs (scale: alpha/r or the
    fixed gate): rows of a Linear's weight, columns of GPT-2's Conv1D (whose weight is (in, out))."""
    base = lora.base
    transposed = is_conv1d(base)
    with torch.no_grad():
        weight = base.weight.float()
        if transposed:
            weight = weight.T  # a view: adding to its rows adds to the Conv1D weight's columns
        for target, slot in lora.gate_slots.items():
            down, up = lora.lora_pair(target)
            scale = lora.scaling if slot is None else gates[slot.key]
            weight[lora.output_slice(target)] += scale * (up.weight.float() @ down.weight.float())
        base.weight.copy_((weight.T if transposed else weight).to(base.weight.dtype))
    return base


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: ``x @ W + b`` with W (in, out), the transpose of a Linear's."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _check(target: str, targets: tuple[str, ...]) -> None:
    if target not in targets:
        raise PELTError(f"no LoRA on {target!r} here; this projection has LoRA on: {', '.join(targets)}")


@dataclass(frozen=True)
class LoRAConfig(TunerConfig):
    name: ClassVar[str] = "lora"
    changes_attention: ClassVar[bool] = True
    merge: ClassVar[Merge] = Merge.FOLD
    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    alpha: float = 16
    targets: tuple[str, ...] = field(default=("query", "value"))
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets",
                               tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        object.__setattr__(self, "targets", tuple(self.targets))
        super().__post_init__()

    def validate(self) -> None:
        self._positive_int("r")
        self._positive_number("alpha")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise PELTError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise PELTError(f"lora_targets {list(self.targets)} must be distinct names from: "
                            f"{', '.join(TARGETS)}")

    def inject(self, target: Target) -> None:
        spec = target.spec
        for i, layer in enumerate(target.layers):
            attention = layer.get_submodule(spec.attention)
            gates = {t: target.gate(self.gate, i, "attention", f"lora_{t}") for t in self.targets}
            if spec.fused_qkv is not None:
                base = getattr(attention, spec.fused_qkv)
                all_slices = spec.qkv_slices(target.model.config)
                slices = {t: all_slices[t] for t in self.targets}
                wrapped = FusedLoRALinear(base, slices, self.r, self.alpha, self.dropout, gates)
                for m in (wrapped.lora_A, wrapped.lora_B):
                    target.new(m)
                setattr(attention, spec.fused_qkv, wrapped)
                continue
            for t in self.targets:
                name = spec.projections[t]
                wrapped = LoRALinear(getattr(attention, name), t, self.r, self.alpha, self.dropout,
                                     gates[t])
                for m in (wrapped.lora_A, wrapped.lora_B):  # base keeps its frozen weights
                    target.new(m)
                setattr(attention, name, wrapped)

    def fold(self, model: nn.Module, layer: int, gates: Mapping[str, float]) -> None:
        replace_children(model_layer(model, layer), (LoRALinear, FusedLoRALinear), lambda m: merged_base(m, gates))

    def peft(self, model: nn.Module, gates: Mapping[str, float]) -> PeftAdapter:
        fused = [name for name, m in model.named_modules() if isinstance(m, FusedLoRALinear)]
        if fused:
            raise PELTError(f"PEFT's LoRA cannot express LoRA on slices of a fused projection ({fused[0]})")
        tensors: dict[str, torch.Tensor] = {}
        targets: set[str] = set()
        for name, lora in model.named_modules():
            if not isinstance(lora, LoRALinear):
                continue
            plain = backbone_path(model, name)  # the projection's name in the backbone without unipelt
            targets.add(plain.rsplit(".", 1)[-1])
            down, up = lora.lora_pair(lora.target)
            b = up.weight.detach()
            if lora.gate is not None:  # PEFT scales by lora_alpha / r: fold gate / (alpha / r) into B
                b = b * (gates[lora.gate.key] / lora.scaling)
            tensors[f"{plain}.lora_A.weight"] = down.weight.detach()
            tensors[f"{plain}.lora_B.weight"] = b
        config = {"r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                  "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
                  "use_rslora": False, "use_dora": False, "init_lora_weights": True}
        return PeftAdapter(self.peft_type, config, tensors)

    def v1_gate_path(self, spec: BackboneSpec, key: str) -> str | None:
        target = key.removeprefix("lora_")
        if key.startswith("lora_") and target in spec.projections:
            return f"{spec.attention}.{spec.projections[target]}.gate"
        return None
