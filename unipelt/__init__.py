"""UniPELT (Mao et al., ACL 2022) for Hugging Face models: gated adapter, prefix, LoRA (DoRA, rsLoRA), (IA)^3,
parallel adapter, BitFit."""

from .backbones import BACKBONES, BackboneSpec, spec_for
from .checkpoint import load_pelt_state_dict, pelt_state_dict
from .config import PRESETS, PELTConfig, PELTError, Preset
from .export import calibrate_gates, merge, to_peft
from .heads import HEADS
from .inject import apply_pelt, count_trainable, gate_values
from .io import from_pretrained, push_to_hub, save_pretrained
from .slim import SlimReport, slim
from .tuners import fold_prefix

__all__ = [
    "PELTConfig",
    "PRESETS",
    "Preset",
    "HEADS",
    "PELTError",
    "BACKBONES",
    "BackboneSpec",
    "spec_for",
    "apply_pelt",
    "fold_prefix",
    "pelt_state_dict",
    "load_pelt_state_dict",
    "gate_values",
    "count_trainable",
    "save_pretrained",
    "from_pretrained",
    "push_to_hub",
    "merge",
    "calibrate_gates",
    "to_peft",
    "slim",
    "SlimReport",
]
