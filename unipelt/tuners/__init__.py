"""The registry of submodules, in injection order. A new submodule: one file + one line here."""

from __future__ import annotations

from .adapter import AdapterConfig
from .base import Target, TunerConfig
from .bitfit import BitFitConfig
from .lora import LoRAConfig
from .prefix import EXPLICIT_ATTENTION, PrefixConfig, fold_prefix

# BitFit first (it unfreezes the backbone's biases before anything is added); LoRA before the
# prefix (an explicit prefix attention wraps the module whose projections LoRA wraps).
TUNERS: dict[str, type[TunerConfig]] = {
    "bitfit": BitFitConfig,
    "adapter": AdapterConfig,
    "lora": LoRAConfig,
    "prefix": PrefixConfig,
}

__all__ = ["TUNERS", "EXPLICIT_ATTENTION", "Target", "TunerConfig", "AdapterConfig", "BitFitConfig", "LoRAConfig",
           "PrefixConfig", "fold_prefix"]
