"""apply_pelt(): freeze the backbone, inject the enabled submodules, keep the head trainable."""

from __future__ import annotations

import torch
from torch import nn

from .adapter import Adapter, AdapterOutput
from .architectures import family_of, layers_of
from .config import PELTConfig, PELTError
from .gates import ConstantGate, Gate, PELTContext
from .lora import LoRALinear
from .prefix import BASE_IMPLEMENTATIONS, IMPL_PREFIX, PrefixEncoder, attach_prefix

PREFIX_ATTR = "pelt_prefix"  # the shared PrefixEncoder lives at model.base_model.pelt_prefix


def apply_pelt(model: nn.Module, config: PELTConfig) -> nn.Module:
    """Turn a Hugging Face sequence-classification model into a PELT model, in place.

    Every backbone weight is frozen except what the config trains (all of them for
    ``finetune``, biases for ``bitfit``); the head (whatever lies outside
    ``model.base_model``, e.g. ``classifier``) trains for every method. New modules are
    created on the backbone's device and dtype.
    """
    if not isinstance(config, PELTConfig):
        raise PELTError(f"config must be a PELTConfig, got {type(config).__name__}")
    family = family_of(model)
    if hasattr(model, "pelt_config"):
        raise PELTError("apply_pelt was already applied to this model")
    base = model.base_model
    if base is model:
        raise PELTError("apply_pelt needs a model with a head (e.g. AutoModelForSequenceClassification)")
    hf = model.config
    hidden, n_layers, n_heads = hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads
    ref = next(base.parameters())
    device, dtype = ref.device, ref.dtype

    for p in base.parameters():
        p.requires_grad_(config.finetune)
    for p in model.parameters():  # the head: everything outside the base model
        if not any(p is q for q in base.parameters()):
            p.requires_grad_(True)
    if config.bitfit:
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)

    ctx = PELTContext()
    std = config.init_std

    def gate(on: bool, key: str) -> Gate | None:
        return Gate(hidden, ctx, key, std) if on else None

    if config.prefix:
        impl = hf._attn_implementation or "eager"
        if impl not in BASE_IMPLEMENTATIONS:
            raise PELTError(
                f"prefix needs attention implementation sdpa or eager, the model uses {impl!r}")
        encoder = PrefixEncoder(n_layers, hidden, n_heads, config.prefix_length,
                                config.prefix_mid_dim, std)
        base.add_module(PREFIX_ATTR, encoder.to(device, dtype))
        _set_attn_implementation(model, IMPL_PREFIX + impl)

    for i, layer in enumerate(layers_of(model)):
        attention = layer.get_submodule(family.self_attention)
        if config.adapter:
            out_name = family.ffn_output
            parent, child = _split(layer, out_name)
            adapter = Adapter(hidden, config.adapter_bottleneck, config.adapter_activation,
                              gate(config.adapter_gate, f"layer{i}.adapter"), std)
            setattr(parent, child, AdapterOutput(getattr(parent, child), adapter.to(device, dtype)))
        if config.lora:
            for target in config.lora_targets:
                g = gate(config.lora_gate, f"layer{i}.lora_{target}")
                wrapped = LoRALinear(getattr(attention, target), config.lora_r, config.lora_alpha,
                                     config.lora_dropout, g)
                # LoRALinear.base keeps its frozen weights; only new parts need moving.
                for m in (wrapped.lora_A, wrapped.lora_B, g):
                    if m is not None:
                        m.to(device, dtype)
                setattr(attention, target, wrapped)
        if config.prefix:
            g = gate(config.prefix_gate, f"layer{i}.prefix")
            attach_prefix(attention, i, ctx, g.to(device, dtype) if g is not None else None)

    if not config.finetune:
        base._pelt_ctx = ctx
        base.register_forward_pre_hook(_context_hook, with_kwargs=True)
    model.pelt_config = config
    return model


def _split(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, child = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), child


def _set_attn_implementation(model: nn.Module, impl: str) -> None:
    """Point every config of the model at ``impl`` (they are usually one shared object)."""
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            cfg._attn_implementation_internal = impl


def _context_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before each base-model forward: gate weights from the attention mask, this batch's prefix.

    A module-level function reading state from ``module`` (no closure), so deepcopy works.
    """
    ctx: PELTContext = module._pelt_ctx
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs["inputs_embeds"]
    shape = ref.shape[:2]
    dtype = next(module.parameters()).dtype
    if mask is None:
        weights = torch.full(shape, 1.0 / shape[1], dtype=dtype, device=ref.device)
    else:
        if mask.dim() != 2:
            raise PELTError("unipelt needs a 2D (batch, tokens) attention_mask of 0/1")
        weights = mask.to(dtype)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
    ctx.token_weights = weights
    encoder = getattr(module, PREFIX_ATTR, None)
    ctx.prefix_kv = encoder() if encoder is not None else None


def _prefix_encoder(model: nn.Module) -> PrefixEncoder | None:
    return getattr(model.base_model, PREFIX_ATTR, None)


def fold_prefix(model: nn.Module) -> nn.Module:
    """Replace the prefix reparameterisation MLP by static per-layer prefixes, for good.

    Not needed for inference speed: in eval mode the MLP output is cached automatically.
    Use it to keep training the static prefix or to drop the MLP from memory.
    """
    encoder = _prefix_encoder(model)
    if encoder is None:
        raise PELTError("fold_prefix: this model has no prefix (apply_pelt with prefix=True)")
    encoder.fold()
    return model


def gate_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """The last forward's per-example gates, e.g. {"layer3.adapter": tensor(batch)}; detached, no sync."""
    return {m.key: m.last for m in model.modules()
            if isinstance(m, (Gate, ConstantGate)) and m.last is not None}


def count_trainable(model: nn.Module) -> int:
    """Trainable parameters, counting an unfolded prefix as its folded size (the paper's count)."""
    encoder = _prefix_encoder(model)
    skip = set()
    total = 0
    if encoder is not None and not encoder.folded:
        skip = {id(p) for p in encoder.parameters()}
        if any(p.requires_grad for p in encoder.parameters()):
            total += encoder.folded_numel
    return total + sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in skip)
