"""What every tuner file provides: a config dataclass whose ``inject`` adds the tuner to a model, and
which declares what the rest of unipelt may do with it (merge, PEFT export, saved form, count).

`merge`, `to_peft`, checkpoints and `count_trainable` loop over a config's submodules and ask each
one; none of them names a tuner. A tuner that declares nothing cannot be merged nor exported to
PEFT, and both refuse in one line naming it (never drop it silently).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..backbones import BackboneSpec, Dims, spec_for
from ..errors import PELTError
from ..gates import GateRequests, GateSlot


class Merge(enum.Enum):
    """How `unipelt.merge` treats a submodule (``TunerConfig.merge``)."""

    FOLD = "fold"  # into the backbone's weights, layer by layer (``TunerConfig.fold``): exact when ungated
    KEEP = "keep"  # stays a module, each of its gates held at a fixed value (merge fixes the gate banks)
    NONE = "none"  # cannot be merged: merge refuses, naming it (the default)


@dataclass(frozen=True)
class PeftAdapter:
    """A tuner as PEFT sees it: ``peft_type`` (``"LORA"``), the fields of its PEFT config that are the
    tuner's (``r``, ``target_modules``...) and its tensors named as PEFT names them, relative to the
    model without unipelt's wrappers (``bert.encoder.layer.0.attention.self.query.lora_A.weight``)."""

    peft_type: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


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
    shared: dict[str, str] = field(default_factory=dict)  # base-model attribute -> how to make it static

    def gate(self, gated: bool, layer: int, site: str, key: str) -> GateSlot | None:
        """A gate slot if ``gated`` (``site``: ``"attention"`` input or ``"adapter"`` input)."""
        return self.gates.request(layer, site, key) if gated else None

    def new(self, module: nn.Module) -> nn.Module:
        """A new module placed on the backbone's device and dtype."""
        return module.to(self.device, self.dtype)

    def share(self, name: str, module: nn.Module, make_static: str) -> nn.Module:
        """Add ``module`` to the base model as ``name``: it runs once per forward (``module()``, no input) and
        every layer reads its output from the context (``context.current().shared[name]``). ``make_static``:
        how a user turns it into a parameter (named when reentrant checkpointing cannot reach it)."""
        module = self.new(module)
        self.model.base_model.add_module(name, module)
        self.shared[name] = make_static
        return module


@dataclass(frozen=True)
class TunerConfig:
    """Base of the per-submodule configs. ``gate``: scale by a learned gate (else a constant).

    ``name`` is the tuner's key in ``PELTConfig`` and the prefix of its flat overrides: every dataclass
    field is one (``lora_r`` is ``LoRAConfig.r``). ``gatable``: whether the tuner has a gate at all.

    What the rest of unipelt may do with the tuner, each declared here (defaults: nothing):

    - ``merge`` (`Merge`) and ``fold``: how `unipelt.merge` carries it;
    - ``peft_type`` and ``peft``: what `unipelt.to_peft` writes for it;
    - ``saved_form`` and ``load_saved_form``: trainable tensors saved (and counted, as the paper counts
      them) in another form than they train in;
    - ``settle``: how `unipelt.slim` fixes its gates as constants or removes it, layer by layer;
    - ``v1_gate_path``: where unipelt v1 kept its gates (old checkpoints).
    """

    name: ClassVar[str] = ""
    gatable: ClassVar[bool] = True
    changes_attention: ClassVar[bool] = False  # families with explicit attention code replace it
    merge: ClassVar[Merge] = Merge.NONE
    peft_type: ClassVar[str | None] = None  # PEFT's name of the method (``"LORA"``); None: PEFT cannot express it
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

    def fold(self, model: nn.Module, layer: int, gates: Mapping[str, float]) -> None:
        """``Merge.FOLD`` tuners: fold this tuner's part of layer ``layer`` into the backbone's weights and
        remove its modules there. A gated part is scaled by its fixed gate, ``gates[slot.key]``."""
        raise PELTError(f"{self.name!r} declares no fold (its merge is {self.merge.value!r})")

    def peft(self, model: nn.Module, gates: Mapping[str, float]) -> PeftAdapter:
        """Tuners with a ``peft_type``: the tuner as a PEFT adapter, each gate fixed at ``gates[slot.key]``.
        Raise PELTError naming what PEFT cannot express of this model (e.g. a fused projection)."""
        raise PELTError(f"{self.name!r} cannot be exported to PEFT (it declares no PEFT mapping)")

    def settle(self, model: nn.Module, layer: int, gates: Mapping[str, float]) -> None:
        """`unipelt.slim`: make this tuner's part of layer ``layer`` read no gate bank. A gated part whose
        gate (``slot.key``) is in ``gates`` keeps ``gates[key]`` as a constant; a gated part whose gate is
        not is removed (the layer computes there what the backbone computes). Ungated parts stay.
        Default: nothing for an ungated tuner; a gated one that declares no settle is refused."""
        if self.gate:
            raise PELTError(f"{self.name!r} cannot be slimmed (it declares no settle)")

    def saved_form(self, model: nn.Module) -> tuple[list[nn.Parameter], dict[str, torch.Tensor]]:
        """Trainable parameters that checkpoints save (and `count_trainable` counts) in another form, and
        that form by parameter name: the prefix's network is saved as its output. Default: none."""
        return [], {}

    def load_saved_form(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        """Before ``weights`` are loaded: make the model hold the form they were saved in."""

    def v1_gate_path(self, spec: BackboneSpec, key: str) -> str | None:
        """The module (from a layer) where unipelt v1 kept gate ``key``, if this tuner owns it."""
        return None

    # helpers for validate()
    def _positive_int(self, *names: str) -> None:
        for key in names:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PELTError(f"{self.name}_{key} must be a positive integer, got {value!r}")

    def _positive_number(self, *names: str) -> None:
        for key in names:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise PELTError(f"{self.name}_{key} must be a positive finite number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


# ----------------------------------------------------------------------------- names without our wrappers
WRAPPED = ("base", "inner")  # the child a unipelt wrapper keeps the original module in


def is_ours(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "unipelt"


def backbone_path(model: nn.Module, path: str) -> str:
    """``path`` without the segments of unipelt's wrappers (``...self.inner.query_proj`` -> ``...self.query_proj``):
    the module's name in the backbone without unipelt."""
    out, module = [], model
    for segment in path.split(".") if path else []:
        if not (is_ours(module) and segment in WRAPPED):
            out.append(segment)
        module = getattr(module, segment)
    return ".".join(out)


def resolve(root: nn.Module, path: str, inside: bool = False) -> tuple[nn.Module, str]:
    """The parent and child name of the backbone's module at ``path`` (from ``root``) now that unipelt may
    have wrapped modules on the way (BERT's ``output`` in an adapter: ``output.dense`` is then
    ``output.base.dense``). ``inside``: the backbone's own module, inside any wrapper of it; else the
    outermost module standing in its place."""
    parent, module = root, root
    segments = path.split(".")
    for segment in segments:
        while not hasattr(module, segment) and is_ours(module) and _wrapped(module):
            module = getattr(module, _wrapped(module))
        parent, module = module, getattr(module, segment)
    name = segments[-1]
    while inside and is_ours(module) and _wrapped(module):
        parent, name = module, _wrapped(module)
        module = getattr(module, name)
    return parent, name


def innermost(module: nn.Module) -> nn.Module:
    """The backbone's module inside unipelt's wrappers of it."""
    while is_ours(module) and _wrapped(module):
        module = getattr(module, _wrapped(module))
    return module


def _wrapped(module: nn.Module) -> str | None:
    return next((name for name in WRAPPED if isinstance(getattr(module, name, None), nn.Module)), None)


def model_layer(model: nn.Module, index: int) -> nn.Module:
    """Layer ``index`` of a model's backbone."""
    return spec_for(model).layer_list(model)[index]


def replace_children(root: nn.Module, kinds: tuple[type, ...], new: Any) -> None:
    """Replace every descendant of ``root`` of one of ``kinds`` by ``new(child)``."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kinds):
                setattr(parent, name, new(child))
