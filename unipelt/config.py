"""PELTConfig (one config per enabled submodule, plus gating) and PRESETS, the one table of methods.

Flat overrides (``PELTConfig.preset("unipelt_apl", lora_r=16)``, the CLI's
``--model.pelt_overrides '{lora_r: 16}'``) name ``<submodule>_<field>``; ``<submodule>: true``
adds a submodule and ``<submodule>_gate`` gates it. A field of a submodule the method does not
use is an error, not a silently ignored value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import PELTError, one_line
from .heads import HEADS
from .tuners import TUNERS, TunerConfig

__all__ = ["PELTConfig", "PELTError", "PRESETS", "Preset", "TASK_GATES"]


@dataclass(frozen=True)
class Preset:
    """A named method: its submodules, which of them are gated, display name and default rate.

    The single table of methods: the Lightning module's default rates, ``reproduce``'s method
    list and the report's row names all read it. Default rates are those of a third-party
    reproduction that says it follows the paper: defaults to tune, not the paper's word.
    """

    name: str
    label: str  # the paper's row name
    learning_rate: float
    submodules: tuple[str, ...] = ()
    gates: tuple[str, ...] = ()
    finetune: bool = False
    options: tuple[tuple[str, Any], ...] = ()  # flat fields besides these (``(("lora_dora", True),)``)

    @property
    def fields(self) -> dict[str, Any]:
        """The preset as flat config fields (``{"adapter": True, "adapter_gate": True}``)."""
        if self.finetune:
            return {"finetune": True}
        flat: dict[str, Any] = {s: True for s in self.submodules}
        flat.update({f"{g}_gate": True for g in self.gates})
        flat.update(self.options)
        return flat


class _PresetTable(dict):
    """``PRESETS``: a dict whose lookups ignore case (``"UniPELT_APL"`` is ``"unipelt_apl"``)."""

    def __getitem__(self, name: str) -> Preset:
        return super().__getitem__(name.lower() if isinstance(name, str) else name)

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name.lower() if isinstance(name, str) else name)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default


# In the paper's row order; single-method baselines are ungated, as in the paper.
PRESETS: dict[str, Preset] = _PresetTable((p.name, p) for p in (
    Preset("finetune", "Fine-tuning", 2e-5, finetune=True),
    Preset("bitfit", "BitFit", 1e-4, ("bitfit",)),
    Preset("adapter", "Adapter", 1e-4, ("adapter",)),
    Preset("prefix", "Prefix-tuning", 2e-4, ("prefix",)),
    Preset("lora", "LoRA", 5e-4, ("lora",)),
    Preset("unipelt_ap", "UniPELT (AP)", 5e-4, ("adapter", "prefix"), ("adapter", "prefix")),
    # The paper's full-data ablation: every gate fixed (docs/method.md: what NoGate means).
    Preset("unipelt_ap_nogate", "UniPELT (AP)-NoGate", 5e-4, ("adapter", "prefix")),
    Preset("unipelt_apl", "UniPELT (APL)", 5e-4, ("adapter", "prefix", "lora"),
           ("adapter", "prefix", "lora")),
    # No paper row; the same ablation for APL.
    Preset("unipelt_apl_nogate", "UniPELT (APL)-NoGate", 5e-4, ("adapter", "prefix", "lora")),
    # Issue 28, the design space: methods the paper did not have and unions that add or swap them. Rates
    # chosen on dev (results/minilm_k100_space/selected_rates.md: all-MiniLM-L6-v2, SST-2, K=100, seed 0, the
    # best mean dev accuracy over a x3 ladder of rates; STS-B's choices are listed there too).
    Preset("ia3", "IA3", 2.7e-2, ("ia3",)),
    Preset("dora", "DoRA", 4.5e-3, ("lora",), options=(("lora_dora", True),)),
    Preset("parallel_adapter", "Parallel adapter", 1e-4, ("parallel_adapter",)),
    Preset("unipelt_apl_dora", "UniPELT (APL, DoRA)", 1.667e-4, ("adapter", "prefix", "lora"),
           ("adapter", "prefix", "lora"), options=(("lora_dora", True),)),
    Preset("unipelt_apli", "UniPELT (APLI)", 1.667e-4, ("adapter", "prefix", "lora", "ia3"),
           ("adapter", "prefix", "lora", "ia3")),
    Preset("unipelt_all", "UniPELT (all)", 1.667e-4, ("adapter", "parallel_adapter", "prefix", "lora", "ia3"),
           ("adapter", "parallel_adapter", "prefix", "lora", "ia3")),
))

_TOP_FIELDS = ("name", "finetune", "init_std", "head", "tasks", "task_gates", "slim")
# Multi-task gates: shared gates + a task embedding (the default, chosen on dev), or a gate bank per task.
TASK_GATES = ("embedding", "bank")


@dataclass(frozen=True)
class PELTConfig:
    """Which submodules to inject, each with its own config (``None``: not used).

    ``submodules`` maps a registered name (``unipelt.tuners.TUNERS``) to its config; each
    config's ``gate`` says whether a learned gate scales it. Ungated submodules use a
    constant scale: 1 for adapter and prefix, ``lora_alpha / lora_r`` for LoRA (the
    authors' code). ``finetune`` trains every weight and excludes the others. ``head``: the
    classification head (``unipelt.heads.HEADS``; ``pooler``, the model's own, is the paper's).

    ``tasks`` (multi-task, docs/method.md#multi-task): each task's name and label names (none: a
    regression; a number n: n labels named ``LABEL_i``), in order. The backbone and every submodule are
    shared; each task has its own pooling head and, for gated submodules, its own gates: one shared gate
    bank whose gates add a learned per-task bias, a task embedding of the bank's size
    (``task_gates="embedding"``, the default), or a gate bank per task (``"bank"``). The model is then
    called with ``task=<name>``.

    ``slim``: a model `unipelt.slim` made: the gates it kept (``"layer3.adapter"``), each at its fixed
    value; every other gated part is removed (None: not slimmed).
    """

    name: str = "custom"
    finetune: bool = False
    submodules: dict[str, TunerConfig] = field(default_factory=dict)
    init_std: float = 0.02
    head: str = "pooler"
    tasks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    task_gates: str = TASK_GATES[0]
    slim: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PELTError(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.finetune, bool):
            raise PELTError(f"finetune must be true or false, got {self.finetune!r}")
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) \
                or not 0 < self.init_std < math.inf:
            raise PELTError(f"init_std must be a positive finite number, got {self.init_std!r}")
        if self.head not in HEADS:
            raise PELTError(f"head must be one of {', '.join(HEADS)}; got {self.head!r}")
        if self.slim is not None:
            bad = [(k, v) for k, v in (self.slim.items() if isinstance(self.slim, dict) else [("slim", self.slim)])
                   if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float))
                   or not 0 <= v <= 1]
            if bad:
                raise PELTError(f"slim must map gate names to fixed values in [0, 1]; got {bad[0][0]!r}: {bad[0][1]!r}")
        for key, sub in self.submodules.items():
            if key not in TUNERS or not isinstance(sub, TUNERS[key]):
                raise PELTError(f"submodule {key!r} must be a {TUNERS.get(key, TunerConfig).__name__}; "
                                f"registered submodules: {', '.join(TUNERS)}")
        if self.finetune and self.submodules:
            raise PELTError(f"finetune trains every weight and cannot be combined with "
                            f"{'/'.join(self.submodules)}")
        # in registry order, whatever order they were given in
        object.__setattr__(self, "submodules",
                           {k: self.submodules[k] for k in TUNERS if k in self.submodules})
        object.__setattr__(self, "tasks", _task_labels(self.tasks))
        if self.task_gates not in TASK_GATES:
            raise PELTError(f"task_gates must be one of {', '.join(TASK_GATES)}; got {self.task_gates!r}")
        if self.tasks and self.head not in ("mean", "cls_mlp"):
            raise PELTError(f"head {self.head!r} cannot serve several tasks (the model's own head has one label "
                            f"set); a multi-task model needs head mean or cls_mlp, one per task")

    def __getattr__(self, name: str) -> Any:
        """Flat read access: ``cfg.lora_r``, ``cfg.adapter_gate``; ``cfg.adapter`` is the sub-config or None."""
        if name.startswith("__"):
            raise AttributeError(name)
        subs = self.__dict__.get("submodules", {})
        if name in TUNERS:
            return subs.get(name)
        key, field_name = _split_flat(name)
        if key is not None:
            if key not in subs:
                raise AttributeError(f"{name}: this config has no {key}")
            return getattr(subs[key], field_name)
        raise AttributeError(name)

    @property
    def gated(self) -> bool:
        return any(s.gate for s in self.submodules.values())

    # ------------------------------------------------------------------ presets, flat form
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PELTConfig:
        """A named preset (any case) with flat overrides, e.g. ``preset("unipelt_apl", lora_r=16)``."""
        if not isinstance(name, str) or name not in PRESETS:
            raise PELTError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        preset = PRESETS[name]
        return cls.from_flat({"name": preset.name, **preset.fields}, overrides,
                             origin=f"preset {preset.name!r}")

    @classmethod
    def from_flat(cls, base: dict[str, Any], overrides: dict[str, Any] | None = None,
                  origin: str = "this config") -> PELTConfig:
        """Build from flat fields (the v1 format): ``{"adapter": True, "adapter_bottleneck": 48, ...}``."""
        flat = {**base, **(overrides or {})}
        allowed = list(_TOP_FIELDS) + [f for t in TUNERS for f in _flat_names(t)]
        unknown = [k for k in flat if k not in allowed]
        if unknown:
            raise PELTError(f"unknown PELTConfig field {unknown[0]!r}; allowed: {', '.join(allowed)}")
        on = {}
        for key in TUNERS:
            value = flat.get(key, False)
            if not isinstance(value, bool):
                raise PELTError(f"{key} must be true or false, got {value!r}")
            on[key] = value
        finetune = flat.get("finetune", False)
        if finetune is True and any(on.values()):
            raise PELTError(f"finetune trains every weight and cannot be combined with "
                            f"{'/'.join(k for k, v in on.items() if v)}")
        submodules = {}
        for key, enabled in on.items():
            fields = {f: flat[f"{key}_{f}"] for f in _field_names(key) if f"{key}_{f}" in flat}
            if not enabled:
                unused = [f"{key}_{f}" for f in fields if f"{key}_{f}" in (overrides or {})]
                if unused:
                    used = [k for k, v in on.items() if v] or (["finetune"] if finetune else ["none"])
                    raise PELTError(f"{unused[0]} does not apply: {origin} has no {key} "
                                    f"(its submodules: {', '.join(used)}); add {key}: true to use one")
                continue
            submodules[key] = _tuner(key, fields)
        return cls(name=flat.get("name", "custom"), finetune=finetune, submodules=submodules,
                   init_std=flat.get("init_std", 0.02), head=flat.get("head", "pooler"),
                   tasks=flat.get("tasks") or {}, task_gates=flat.get("task_gates", TASK_GATES[0]),
                   slim=flat.get("slim"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: ``{"name", "finetune", "init_std", ["head",] "<submodule>": {fields} or null}``.

        ``head`` is written only when it is not the default ``pooler``, ``tasks`` and ``task_gates`` only for a
        multi-task model: configs and checkpoint identities written before they existed stay equal to today's.
        """
        d: dict[str, Any] = {"name": self.name, "finetune": self.finetune, "init_std": self.init_std}
        if self.head != "pooler":
            d["head"] = self.head
        d.update(self._task_fields())
        if self.slim is not None:
            d["slim"] = dict(self.slim)
        d.update({k: (self.submodules[k].to_dict() if k in self.submodules else None) for k in TUNERS})
        return d

    def _task_fields(self) -> dict[str, Any]:
        if not self.tasks:
            return {}
        # a list: the tasks' order is the model's (heads, gates), and JSON writers may sort a mapping's keys
        return {"tasks": [{"name": name, "labels": list(labels)} for name, labels in self.tasks.items()],
                "task_gates": self.task_gates}

    def flat(self) -> dict[str, Any]:
        """The flat form (what ``preset`` overrides and the v1 checkpoints use)."""
        d: dict[str, Any] = {"name": self.name, "finetune": self.finetune, "init_std": self.init_std,
                             "head": self.head, **self._task_fields(),
                             **({"slim": dict(self.slim)} if self.slim is not None else {})}
        for key in TUNERS:
            d[key] = key in self.submodules
            if key in self.submodules:
                d.update({f"{key}_{f}": v for f, v in self.submodules[key].to_dict().items()})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PELTConfig:
        """Inverse of ``to_dict``; also reads the flat v1 form."""
        if not isinstance(d, dict):
            raise PELTError(f"a PELT config must be a mapping, got {type(d).__name__}")
        if any(isinstance(d.get(k), bool) for k in TUNERS) or any(_split_flat(k)[0] for k in d):
            return cls.from_flat(d)
        unknown = [k for k in d if k not in (*_TOP_FIELDS, *TUNERS)]
        if unknown:
            raise PELTError(f"unknown PELTConfig field {unknown[0]!r}; allowed: "
                            f"{', '.join((*_TOP_FIELDS, *TUNERS))}")
        submodules = {}
        for key in TUNERS:
            fields = d.get(key)
            if fields is None:
                continue
            if not isinstance(fields, dict):
                raise PELTError(f"{key} must be a mapping of its fields (or null), got {fields!r}")
            names = _field_names(key)
            bad = [f for f in fields if f not in names]
            if bad:
                raise PELTError(f"unknown {key} field {bad[0]!r}; allowed: {', '.join(names)}")
            submodules[key] = _tuner(key, fields)
        return cls(name=d.get("name", "custom"), finetune=d.get("finetune", False),
                   submodules=submodules, init_std=d.get("init_std", 0.02), head=d.get("head", "pooler"),
                   tasks=d.get("tasks") or {}, task_gates=d.get("task_gates", TASK_GATES[0]), slim=d.get("slim"))


def _task_labels(tasks: Any) -> dict[str, tuple[str, ...]]:
    """``{name: label names | number of labels}`` (or ``to_dict``'s list of ``{"name", "labels"}``) ->
    ``{name: label names}`` (a regression: none)."""
    if isinstance(tasks, list) and all(isinstance(t, Mapping) and set(t) == {"name", "labels"} for t in tasks):
        if len({t["name"] for t in tasks}) < len(tasks):
            raise PELTError(f"tasks: a task is named twice in {[t['name'] for t in tasks]}")
        tasks = {t["name"]: t["labels"] for t in tasks}
    if not isinstance(tasks, Mapping):
        raise PELTError(f"tasks must map each task's name to its label names (or number of labels), got {tasks!r}")
    out = {}
    for name, labels in tasks.items():
        if not isinstance(name, str) or not name or "." in name:
            raise PELTError(f"task name {name!r}: must be a non-empty string without '.'")
        if isinstance(labels, int) and not isinstance(labels, bool) and labels >= 1:
            labels = () if labels == 1 else tuple(f"LABEL_{i}" for i in range(labels))
        if isinstance(labels, str) or not isinstance(labels, (list, tuple)) or len(labels) == 1:
            raise PELTError(f"task {name!r}: labels must be a list of two or more names, [] for a regression, "
                            f"or a number of labels; got {labels!r}")
        out[name] = tuple(str(label) for label in labels)
    return out


def _tuner(key: str, fields: dict[str, Any]) -> TunerConfig:
    """A submodule's config; a value of the wrong kind (``targets: 5``) is a PELTError, not a TypeError."""
    try:
        return TUNERS[key](**fields)
    except TypeError as err:
        raise PELTError(f"{key}: {one_line(err)}") from None


def _field_names(key: str) -> list[str]:
    return [f.name for f in dataclasses.fields(TUNERS[key])]


def _flat_names(key: str) -> list[str]:
    return [key] + [f"{key}_{f}" for f in _field_names(key)]


def _split_flat(name: str) -> tuple[str | None, str]:
    for key in TUNERS:
        if name.startswith(key + "_") and name[len(key) + 1:] in _field_names(key):
            return key, name[len(key) + 1:]
    return None, name
