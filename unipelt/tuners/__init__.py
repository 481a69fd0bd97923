"""The registry of submodules, in injection order. A new submodule: one file + one line here."""

from __future__ import annotations

from .adapter import AdapterConfig
from .base import Target, TunerConfig
from .bitfit import BitFitConfig
from .ia3 import IA3Config
from .lora import LoRAConfig
from .parallel_adapter import ParallelAdapterConfig
from .prefix import EXPLICIT_ATTENTION, PrefixConfig, fold_prefix

# BitFit first (it unfreezes the backbone's biases before anything is added); LoRA before the
# prefix (an explicit prefix attention wraps the module whose projections LoRA wraps); (IA)^3 after
# LoRA (it scales what a LoRA projection outputs, and folds after it); the parallel adapter after
# the adapter (it wraps the FFN inside the adapter's wrapper, or BERT's output block outside it).
TUNERS: dict[str, type[TunerConfig]] = {
    "bitfit": BitFitConfig,
    "adapter": AdapterConfig,
    "lora": LoRAConfig,
    "ia3": IA3Config,
    "parallel_adapter": ParallelAdapterConfig,
    "prefix": PrefixConfig,
}

__all__ = ["TUNERS", "EXPLICIT_ATTENTION", "Target", "TunerConfig", "AdapterConfig", "BitFitConfig", "IA3Config",
           "LoRAConfig", "ParallelAdapterConfig", "PrefixConfig", "fold_prefix"]
