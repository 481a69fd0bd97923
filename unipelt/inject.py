"""apply_pelt(): freeze the backbone, inject each enabled submodule, enter a context per forward."""

from __future__ import annotations

import copy
import inspect
import itertools
from functools import partial

import torch
from torch import nn

from . import context, multitask
from .backbones import spec_for
from .config import PELTConfig
from .errors import PELTError
from .gates import GateBank, GateRequests, gate_keys, slot_holders
from .heads import attach_head
from .tuners import EXPLICIT_ATTENTION, Target
from .tuners.base import Merge

# A config may add at most as many parameters as the backbone has, and this many whatever its size: a size
# beyond that (``lora_r: 1000000000``) is refused before anything is allocated.
MIN_PARAMETER_BUDGET = 1 << 26
LAST_GATES = "_pelt_last_gates"  # base model attribute: the last forward's gates, detached
LAST_TASK_GATES = "_pelt_last_task_gates"  # a multi-task model's: {task index: its last forward's gates}
MERGED_ATTR = "pelt_merged"  # set by a merge that keeps unipelt modules: for inference, not to save or merge again
SLIM_WEIGHTS = "pelt_slim_weights"  # a slimmed model's trained tensors before its folds: what it saves


def apply_pelt(model: nn.Module, config: PELTConfig) -> nn.Module:
    """Turn a Hugging Face model with a head (e.g. ``AutoModelForSequenceClassification``) into
    a PELT model, in place.

    Every backbone weight is frozen except what the config trains (all of them for
    ``finetune``, biases for ``bitfit``); the head (whatever lies outside
    ``model.base_model``, e.g. ``classifier``) trains for every method; ``config.head`` may
    replace it or train the backbone's pooler (unipelt/heads.py). New modules are created on
    the backbone's device and dtype, once the config's sizes are known to fit the backbone
    (`MIN_PARAMETER_BUDGET`).
    """
    if not isinstance(config, PELTConfig):
        raise PELTError(f"config must be a PELTConfig, got {type(config).__name__}")
    spec_for(model)
    if hasattr(model, "pelt_config"):
        raise PELTError("apply_pelt was already applied to this model")
    if model.base_model is model:
        raise PELTError("apply_pelt needs a model with a head (e.g. AutoModelForSequenceClassification)")
    _check_size(model, config)
    return _inject(model, config)


def _check_size(model: nn.Module, config: PELTConfig) -> None:
    """PELTError if ``config`` would add more parameters than the backbone has (and than
    `MIN_PARAMETER_BUDGET`): counted by injecting into a copy of ``model`` whose tensors live on the meta
    device (shapes, no memory), so a size typed with too many zeros costs nothing."""
    backbone = sum(p.numel() for p in model.base_model.parameters())
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) not in memo:
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    skeleton = copy.deepcopy(model, memo)
    before = sum(p.numel() for p in skeleton.parameters())
    with torch.device("meta"):
        _inject(skeleton, config)
    added = sum(p.numel() for p in skeleton.parameters()) - before
    budget = max(backbone, MIN_PARAMETER_BUDGET)
    if added > budget:
        sizes = {k: v for k, v in config.flat().items() if isinstance(v, int) and not isinstance(v, bool)}
        raise PELTError(f"{config.name} would add {added:,} parameters to a backbone of {backbone:,} (at most "
                        f"{budget:,}): a size is too large ({', '.join(f'{k}={v}' for k, v in sizes.items())})")


def _inject(model: nn.Module, config: PELTConfig) -> nn.Module:
    """`apply_pelt` once the model and config are checked."""
    spec = spec_for(model)
    base = model.base_model
    ref = next(base.parameters())
    layers = spec.layer_list(model)

    for p in base.parameters():
        p.requires_grad_(config.finetune)
    in_base = {id(p) for p in base.parameters()}
    # The head (everything outside the base model) trains, except a language-modelling head: it
    # maps into the vocabulary and is often the input embedding matrix itself (tied weights).
    lm_head = model.get_output_embeddings() if spec.causal else None
    frozen = {id(p) for p in lm_head.parameters()} if lm_head is not None else set()
    for p in model.parameters():
        if id(p) not in in_base:
            p.requires_grad_(config.finetune or id(p) not in frozen)

    dims = spec.dims(model.config)
    banks = multitask.gate_bank_factory(config) if config.tasks else None
    target = Target(model, spec, dims, layers, GateRequests(dims.hidden, config.init_std, banks),
                    ref.device, ref.dtype, config.init_std)
    for sub in config.submodules.values():
        sub.inject(target)
    target.gates.build(layers, ref.device, ref.dtype)
    if spec.explicit_attention is not None and any(s.changes_attention for s in config.submodules.values()):
        explicit = EXPLICIT_ATTENTION[spec.explicit_attention]
        parent_path, _, child = spec.attention.rpartition(".")
        for layer in layers:
            parent = layer.get_submodule(parent_path) if parent_path else layer
            setattr(parent, child, explicit(getattr(parent, child)))
    # after the tuners: it may freeze BitFit's pooler bias
    if config.tasks:
        multitask.attach_task_heads(model, spec, config)
    else:
        attach_head(model, spec, config.head, config.init_std)

    # Anything that reads the context; and decoders, whose positions come from the mask (below).
    base._pelt_shared = dict(target.shared)
    if target.gates.pending or target.shared or spec.causal:
        signature = list(inspect.signature(base.forward).parameters)
        base._pelt_arg_index = {k: signature.index(k) for k in
                                ("input_ids", "attention_mask", "inputs_embeds", "position_ids")
                                if k in signature}
        base._pelt_causal = spec.causal
        base._pelt_context = True
        base.register_forward_pre_hook(_enter_context, with_kwargs=True)
        base.register_forward_hook(_leave_context, always_call=True)
    if not any(p.requires_grad for p in model.parameters()):
        # e.g. BitFit on a backbone without biases, under a frozen language-modelling head
        raise PELTError(f"{config.name} trains nothing on this {spec.family} model (bitfit needs bias "
                        f"terms; a language-modelling head stays frozen)")
    if config.slim is not None:
        settle(model, config)
    model.pelt_config = config
    return model


def settle(model: nn.Module, config: PELTConfig) -> None:
    """A slim config's structure (`unipelt.slim`): every gate in ``config.slim`` becomes a constant inside the
    submodule it scales, every other gated part is removed, and the gate banks go. Its folds follow once the
    weights are in (``fold_settled``)."""
    keys = set(gate_keys(model))
    unknown = sorted(set(config.slim) - keys)
    if unknown:
        raise PELTError(f"slim names gates this model does not have: {unknown[:3]}")
    layers = spec_for(model).layer_list(model)
    for sub in config.submodules.values():
        for layer in range(len(layers)):
            sub.settle(model, layer, config.slim)
    for layer in layers:
        if hasattr(layer, "pelt_gates"):
            del layer.pelt_gates
    holders = slot_holders(model)
    if holders or any(isinstance(m, GateBank) for m in model.modules()):
        raise PELTError(f"slim: {holders[0] if holders else 'a gate bank'} still reads a gate after every submodule "
                        "settled its gates (its tuner's settle missed it)")
    base = model.base_model
    # nothing left reads the per-forward context but a shared tensor (the prefix) or a decoder's positions
    base._pelt_context = bool(getattr(base, "_pelt_shared", None)) or spec_for(model).causal


def fold_settled(model: nn.Module) -> None:
    """A slim model's last step, once its weights are in: fold what folds, each part with its constant gate."""
    layers = len(spec_for(model).layer_list(model))
    for sub in config_of(model).submodules.values():
        if sub.merge is Merge.FOLD:
            for layer in range(layers):
                sub.fold(model, layer, {})


def _argument(module: nn.Module, args: tuple, kwargs: dict, name: str) -> torch.Tensor | None:
    if name in kwargs:
        return kwargs[name]
    index = module._pelt_arg_index.get(name)
    return args[index] if index is not None and index < len(args) else None


def _enter_context(base: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Base-model pre-hook: this batch's token weights and shared tensors become the current context.

    Module-level functions reading only the module they are given (no closure): deepcopy works.
    """
    if not base._pelt_context:  # a slimmed model with nothing that reads it
        return None
    ids = _argument(base, args, kwargs, "input_ids")
    reference = ids if ids is not None else _argument(base, args, kwargs, "inputs_embeds")
    mask = _argument(base, args, kwargs, "attention_mask")
    causal = base._pelt_causal
    if causal and mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        # generate() with a static cache passes transformers' own 4D masks (a dict of them per layer
        # type for Qwen2/3). Per-token gates need no mask; gate_values() then averages all tokens.
        mask = None
    context.check_mask(mask)
    weights = partial(context.token_weights, mask, tuple(reference.shape[:2]), reference.device,
                      next(base.parameters()).dtype)
    if not causal:  # encoders reduce every gate with them; decoders only when gate_values() asks
        weights = weights()
    if base.training and torch.is_grad_enabled():
        context.bind_checkpointing(spec_for(base).layer_list(base))
    shared = {name: getattr(base, name)() for name in base._pelt_shared}
    task = context.task_of(id(base))  # a multi-task model's forward: its task's gates
    context.enter(context.ForwardContext(id(base), weights, shared, causal, base._pelt_shared, task))
    if causal and mask is not None and mask.dim() == 2 and _argument(base, args, kwargs, "position_ids") is None:
        # Positions count real tokens, so left padding shifts none (generate() passes its own).
        kwargs["position_ids"] = context.positions_from_mask(mask, reference.shape[1])
        return args, kwargs
    return None


def _leave_context(base: nn.Module, args: tuple, output: object) -> None:
    ctx = context.leave(id(base))
    if ctx is not None:
        # the token weights, or (decoders) the function computing them when gate_values() asks
        setattr(base, LAST_GATES, (ctx.record, ctx.weights))
        if ctx.task is not None:  # a multi-task model: also the last forward of each task
            setattr(base, LAST_TASK_GATES, {**getattr(base, LAST_TASK_GATES, {}), ctx.task: (ctx.record, ctx.weights)})


def config_of(model: nn.Module) -> PELTConfig:
    """The PELT config of a model `apply_pelt` changed; PELTError for any other (or a merged one)."""
    cfg = getattr(model, "pelt_config", None)
    if cfg is None:
        raise PELTError("this model has no PELT config; call apply_pelt(model, config) first")
    if getattr(model, MERGED_ATTR, False):
        raise PELTError("this model is merged (for inference only); use the model it was merged from")
    return cfg


def gate_values(model: nn.Module, task: str | None = None) -> dict[str, torch.Tensor]:
    """The last forward's per-example gates, e.g. ``{"layer3.adapter": tensor(batch)}``; detached, no sync.
    ``task``: a multi-task model's last forward of that task.

    ``{}`` for a model without gates (an ungated method). A gate depends on the input, so before the
    model's first forward (of ``task``) there is nothing to report: PELTError saying so, rather than an empty dict."""
    if task is None:
        record, weights = getattr(model.base_model, LAST_GATES, None) or ({}, None)
    else:
        index = multitask.task_index(tuple(config_of(model).tasks), task)
        record, weights = getattr(model.base_model, LAST_TASK_GATES, {}).get(index) or ({}, None)
    if not record and gate_keys(model):
        raise PELTError(f"gate_values: no forward{'' if task is None else f' of task {task!r}'} has run on this model "
                        "yet, and a gate depends on the input; run a batch first (model(**batch)): then each gate's "
                        "value per example of that batch")
    if record and callable(weights):
        weights = weights()
    return {key: values[:, i]
            for bank, gates in record.items() for values in [context.per_example(gates, weights)]
            for i, key in enumerate(bank.gate_keys)}


def count_trainable(model: nn.Module) -> int:
    """Trainable parameters as the paper counts them: what a tuner saves in another form (an unfolded
    prefix: its output) counts at that form's size."""
    config: PELTConfig | None = getattr(model, "pelt_config", None)
    total, skip = 0, set()
    for sub in config.submodules.values() if config is not None else ():
        params, form = sub.saved_form(model)
        if any(p.requires_grad for p in params):
            total += sum(t.numel() for t in form.values())
        skip.update(id(p) for p in params)
    return total + sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in skip)
