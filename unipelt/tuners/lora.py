"""LoRA (Hu et al.) as a side path on frozen projections: ``y = W x + b + s * B A x``.

``s`` is ``alpha / r`` ungated (``alpha / sqrt(r)`` with ``rslora``, Kalajdzievski 2023, as PEFT's
``use_rslora``), or the per-example gate (which replaces the constant, as in the paper). The update is
never merged into a weight copy during training: the side path costs ``2 r (in + out)`` FLOPs per token
and the scale is applied to the r-wide activation.

DoRA (Liu et al. 2024; ``dora``) exactly as PEFT's ``LoraConfig(use_dora=True)`` computes it: a trained
magnitude ``m`` per output feature (initialised to the row norms of ``W``) rescales the LoRA-updated
weight, ``DoRA(x) = m / ||W + s B A|| * (W x + s B A x) + b``, the norm per output row and treated as a
constant (no gradient; section 4.3 of the paper, as PEFT does). A gate scales DoRA's whole change,
``y = W x + b + g * (DoRA(x) - W x - b)``: ``g = 1`` is PEFT's DoRA, ``g = 0`` the frozen backbone, and
with a fixed ``g`` the change is linear in ``W``, so it folds exactly (the gate does not replace
``alpha / r`` here: the norm needs the update's own scale).

Every LoRA-wrapped projection exposes its targets per name: ``targets``, ``lora_pair(t)``
(the A and B Linears) and ``delta_weight(t)`` (``s * B @ A`` as a ``(rows, in)`` matrix, with
``output_slice(t)`` the rows of the wrapped weight it adds to), so exports (ungated LoRA to
PEFT, merging into weights) need not know whether the projection was fused.

``merge`` folds it into the wrapped weight, ``W + s B A`` (``s`` a fixed gate when gated; DoRA:
``c W + g m/n s B A`` per output row, ``c = 1 + g (m/n - 1)``); ``to_peft`` writes PEFT's LoRA (its
constant scale; a fixed gate is folded into ``B``, and for DoRA into ``B`` and the magnitude).
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


def dora_delta(x: torch.Tensor, wx: torch.Tensor | None, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """``DoRA(x) - W x - b`` for the rows ``weight`` (out, in): ``(m/n - 1) W x + m/n s B A x``, PEFT's
    ``DoraLinearLayer.forward``. ``wx``: ``W x`` when the caller has it (no dropout), else computed."""
    with torch.no_grad():  # the norm is a constant: no gradient (the paper's section 4.3; PEFT detaches it)
        norm = torch.linalg.norm(weight + scaling * (b @ a), dim=1).to(weight.dtype)
    ratio = (magnitude / norm).view(1, -1)
    if wx is None:
        wx = linear(x, weight)
    return (ratio - 1) * wx + ratio * linear(linear(x, a), b) * scaling


def dora_fold(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor, scaling: float,
              gate: float) -> torch.Tensor:
    """The rows ``weight`` (out, in) with gated DoRA folded in: ``c W + g m/n s B A``, ``c = 1 + g (m/n - 1)``."""
    norm = torch.linalg.norm(weight + scaling * (b @ a), dim=1)
    ratio = (magnitude / norm)[:, None]
    return (1 + gate * (ratio - 1)) * weight + gate * ratio * scaling * (b @ a)


def row_norms(weight: torch.Tensor) -> nn.Parameter:
    """DoRA's magnitude at init, ``||W||`` per output row (``B = 0``), as PEFT initialises it."""
    return nn.Parameter(torch.linalg.norm(weight.detach(), dim=1))


class LoRALinear(nn.Module):
    """One projection (``query``, say) with LoRA; ``base`` keeps the frozen Linear."""

    def __init__(self, base: nn.Linear, target: str, r: int, scaling: float, dropout: float,
                 gate: GateSlot | None, dora: bool = False) -> None:
        super().__init__()
        self.base = base
        self.target = target
        self.lora_A, self.lora_B = _pair(base.in_features, base.out_features, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.gate = gate  # reads the projection input (the attention input)
        self.lora_magnitude = row_norms(base.weight) if dora else None
        self.fixed: float | None = None  # a gate `unipelt.slim` fixed

    @property
    def dora(self) -> bool:
        return self.lora_magnitude is not None

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

    def magnitude(self, target: str) -> torch.Tensor | None:
        _check(target, self.targets)
        return self.lora_magnitude

    def fixed_gate(self, target: str) -> float | None:
        return self.fixed

    def settle(self, target: str, value: float) -> None:
        self.fixed, self.gate = value, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_magnitude is not None:
            return self._dora(x)
        # A and B are applied as functions, not called as modules: in a decoder's generation step a
        # module call costs about what the tiny matmul does.
        a, b = self.lora_A.weight, self.lora_B.weight
        z = linear(self.dropout(x) if self.training else x, a)
        scale = self.gate.scale(x) if self.gate is not None else self.fixed if self.fixed is not None else self.scaling
        y = self.base(x)
        if y.dtype != b.dtype or (self.gate is not None and scale.shape[0] != y.shape[0]):
            # a batch-shared input (DeBERTa's positions) with per-example gates, or autocast (the
            # in-place updates below are not autocast: the out-of-place path casts for us)
            return y + linear(z * scale, b)
        # In place on the base output, which its backward does not need: no full-width copy.
        if y.numel() <= SMALL_OUTPUT:  # a generation step: y += scale * B z in the fewest ops
            update = linear(z, b)
            return y.addcmul_(update, scale) if self.gate is not None else y.add_(update, alpha=scale)
        y.view(-1, y.shape[-1]).addmm_((z * scale).reshape(-1, z.shape[-1]), b.t())
        return y

    def _dora(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        dropped = self.dropout(x) if self.training else x
        bias = self.base.bias
        wx = None if dropped is not x else (y - bias if bias is not None else y)  # PEFT: the base result
        delta = dora_delta(dropped, wx, self.base.weight, self.lora_A.weight, self.lora_B.weight,
                           self.lora_magnitude, self.scaling)
        if self.gate is not None:
            return torch.addcmul(y, delta, self.gate.scale(x))
        return y + delta if self.fixed is None else torch.add(y, delta, alpha=self.fixed)


class FusedLoRALinear(nn.Module):
    """A fused q/k/v projection (ModernBERT's ``Wqkv``) with LoRA on some of its slices.

    The A matrices of all targets run as one matmul; each target has its own B, scale and gate.
    """

    def __init__(self, base: nn.Linear, slices: dict[str, slice], r: int, scaling: float,
                 dropout: float, gates: dict[str, GateSlot | None], dora: bool = False) -> None:
        super().__init__()
        self.base = base
        self.slices = dict(slices)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        in_features = base.weight.shape[0] if is_conv1d(base) else base.in_features
        for t, sl in self.slices.items():
            self.lora_A[t], self.lora_B[t] = _pair(in_features, sl.stop - sl.start, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.r = r
        self.gates = gates
        self.lora_magnitude = nn.ParameterDict({t: row_norms(self.rows(t)) for t in self.slices}) if dora else None
        self.fixed: dict[str, float] = {}  # gates `unipelt.slim` fixed

    @property
    def dora(self) -> bool:
        return self.lora_magnitude is not None

    def rows(self, target: str) -> torch.Tensor:
        """The wrapped weight's rows for ``target`` as (out, in), a view (Conv1D keeps (in, out))."""
        sl = self.output_slice(target)
        return self.base.weight[:, sl].T if is_conv1d(self.base) else self.base.weight[sl]

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

    def magnitude(self, target: str) -> torch.Tensor | None:
        _check(target, self.targets)
        return self.lora_magnitude[target] if self.lora_magnitude is not None else None

    def fixed_gate(self, target: str) -> float | None:
        return self.fixed.get(target)

    def settle(self, target: str, value: float) -> None:
        self.fixed[target], self.gates[target] = value, None

    def drop(self, target: str) -> None:
        """Remove ``target``'s LoRA (the module keeps the others)."""
        del self.slices[target], self.lora_A[target], self.lora_B[target], self.gates[target]
        self.fixed.pop(target, None)
        if self.lora_magnitude is not None:
            del self.lora_magnitude[target]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_magnitude is not None:
            return self._dora(x)
        y = self.base(x)
        a = torch.cat([self.lora_A[t].weight for t in self.slices])  # (targets * r, in)
        z = nn.functional.linear(self.dropout(x), a).split(self.r, dim=-1)
        for (t, sl), zt in zip(self.slices.items(), z, strict=True):
            gate = self.gates[t]
            zt = zt * (gate.scale(x) if gate is not None else self.fixed.get(t, self.scaling))
            # in place on the base output (not needed for backward): no copy of the whole qkv
            y[..., sl] += self.lora_B[t](zt)
        return y

    def _dora(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        dropped = self.dropout(x) if self.training else x
        bias = self.base.bias
        for t, sl in self.slices.items():
            # W x of the slice, a tensor of its own (DoRA's backward needs it; y changes in place below)
            wx = None if dropped is not x else (y[..., sl] - bias[sl] if bias is not None else y[..., sl].clone())
            delta = dora_delta(dropped, wx, self.rows(t), self.lora_A[t].weight, self.lora_B[t].weight,
                               self.lora_magnitude[t], self.scaling)
            gate, fixed = self.gates[t], self.fixed.get(t)
            if gate is not None:
                delta = delta * gate.scale(x)
            elif fixed is not None:
                delta = delta * fixed
            y[..., sl] += delta  # in place on the base output (not needed for backward): no copy of the whole qkv
        return y


def gate_value(lora: LoRALinear | FusedLoRALinear, target: str, gates: Mapping[str, float]) -> float | None:
    """``target``'s fixed gate: ``gates[key]`` when gated, the one `unipelt.slim` fixed, or None (ungated)."""
    slot = lora.gate_slots[target]
    return gates[slot.key] if slot is not None else lora.fixed_gate(target)


def merged_base(lora: LoRALinear | FusedLoRALinear, gates: Mapping[str, float]) -> nn.Module:
    """The wrapped projection with each target's update folded into its output rows (scale: alpha/r or the
    fixed gate; DoRA: ``dora_fold``): rows of a Linear's weight, columns of GPT-2's Conv1D (weight (in, out))."""
    base = lora.base
    transposed = is_conv1d(base)
    with torch.no_grad():
        weight = base.weight.float()
        if transposed:
            weight = weight.T  # a view: adding to its rows adds to the Conv1D weight's columns
        for target in lora.targets:
            down, up = (m.weight.float() for m in lora.lora_pair(target))
            gate, rows = gate_value(lora, target, gates), lora.output_slice(target)
            if lora.dora:
                magnitude = lora.magnitude(target).float()
                weight[rows] = dora_fold(weight[rows], down, up, magnitude, lora.scaling, 1.0 if gate is None else gate)
            else:
                weight[rows] += (lora.scaling if gate is None else gate) * (up @ down)
        base.weight.copy_((weight.T if transposed else weight).to(base.weight.dtype))
    return base


def _peft_b_and_magnitude(lora: LoRALinear, up: torch.Tensor, down: torch.Tensor,
                          gates: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """PEFT's ``lora_B`` (and DoRA's ``lora_magnitude_vector``) giving this LoRA with its fixed gate ``g``.

    LoRA: PEFT scales by its constant, so ``B g / s``. DoRA: PEFT computes ``m'/n' (W x + s B' A x)``, which
    is ``c W x + g m/n s B A x`` (``c = 1 + g (m/n - 1)``) for ``B' = B g (m/n) / c`` row by row and
    ``m' = c ||W + s B' A||``: exact wherever ``c != 0``."""
    gate = gate_value(lora, lora.target, gates)
    if not lora.dora:
        return {"lora_B.weight": up if gate is None else up * (gate / lora.scaling)}
    magnitude = lora.lora_magnitude.detach()
    if gate is None:
        return {"lora_B.weight": up, "lora_magnitude_vector": magnitude}
    weight = lora.base.weight.detach().float()
    ratio = magnitude.float() / torch.linalg.norm(weight + lora.scaling * (up.float() @ down.float()), dim=1)
    c = 1 + gate * (ratio - 1)
    if bool((c == 0).any()):
        raise PELTError("PEFT's DoRA cannot express this fixed gate (an output row's scale is 0)")
    new_up = up.float() * (gate * ratio / c)[:, None]
    new_magnitude = c * torch.linalg.norm(weight + lora.scaling * (new_up @ down.float()), dim=1)
    return {"lora_B.weight": new_up.to(up.dtype), "lora_magnitude_vector": new_magnitude.to(magnitude.dtype)}


def _place(target: Target, wrapped: LoRALinear | FusedLoRALinear) -> None:
    """A and B on the backbone's device and dtype (``base`` keeps its frozen weights; DoRA's magnitude is
    computed from them, so already there)."""
    for m in (wrapped.lora_A, wrapped.lora_B):
        target.new(m)


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
    dora: bool = False
    rslora: bool = False

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
        if self.rslora and self.gate and not self.dora:
            raise PELTError("lora_rslora changes nothing when lora_gate is true: the gate replaces the scale "
                            "alpha/r; use lora_rslora with an ungated LoRA or with lora_dora")

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (PEFT's ``use_rslora``)."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def inject(self, target: Target) -> None:
        spec = target.spec
        for i, layer in enumerate(target.layers):
            attention = layer.get_submodule(spec.attention)
            gates = {t: target.gate(self.gate, i, "attention", f"lora_{t}") for t in self.targets}
            if spec.fused_qkv is not None:
                base = getattr(attention, spec.fused_qkv)
                all_slices = spec.qkv_slices(target.model.config)
                slices = {t: all_slices[t] for t in self.targets}
                wrapped = FusedLoRALinear(base, slices, self.r, self.scaling, self.dropout, gates, self.dora)
                _place(target, wrapped)
                setattr(attention, spec.fused_qkv, wrapped)
                continue
            for t in self.targets:
                name = spec.projections[t]
                wrapped = LoRALinear(getattr(attention, name), t, self.r, self.scaling, self.dropout,
                                     gates[t], self.dora)
                _place(target, wrapped)
                setattr(attention, name, wrapped)

    def fold(self, model: nn.Module, layer: int, gates: Mapping[str, float]) -> None:
        replace_children(model_layer(model, layer), (LoRALinear, FusedLoRALinear), lambda m: merged_base(m, gates))

    def settle(self, model: nn.Module, layer: int, gates: Mapping[str, float]) -> None:
        def settled(lora: LoRALinear | FusedLoRALinear) -> nn.Module:
            for target, slot in list(lora.gate_slots.items()):
                if slot is not None and slot.key in gates:
                    lora.settle(target, gates[slot.key])
                elif slot is not None and isinstance(lora, FusedLoRALinear):
                    lora.drop(target)
                elif slot is not None:
                    return lora.base
            return lora if lora.targets else lora.base

        replace_children(model_layer(model, layer), (LoRALinear, FusedLoRALinear), settled)

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
            down, up = (m.weight.detach() for m in lora.lora_pair(lora.target))
            tensors[f"{plain}.lora_A.weight"] = down
            tensors.update({f"{plain}.{k}": v for k, v in _peft_b_and_magnitude(lora, up, down, gates).items()})
        config = {"r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                  "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
                  "use_rslora": self.rslora, "use_dora": self.dora, "init_lora_weights": True}
        return PeftAdapter(self.peft_type, config, tensors)

    def v1_gate_path(self, spec: BackboneSpec, key: str) -> str | None:
        target = key.removeprefix("lora_")
        if key.startswith("lora_") and target in spec.projections:
            return f"{spec.attention}.{spec.projections[target]}.gate"
        return None
