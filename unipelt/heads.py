"""The classification head: the model's own, its pooler made trainable, or a fresh pooling head.

``PELTConfig.head`` chooses what turns the last hidden states into logits:

- ``pooler``: the model's own head as transformers builds it (the paper's model and the default).
  For BERT that is the pretrained pooler (dense + tanh on [CLS]), part of the backbone and so
  frozen for PELT methods, then a linear classifier; other families' heads (RoBERTa's and
  ELECTRA's dense head, DistilBERT's ``pre_classifier``, DeBERTa's ``ContextPooler``,
  ModernBERT's head, decoders' last-token ``score``) lie outside the backbone and train.
- ``pooler_trainable``: the same, with the backbone's pooler training as part of the head; only
  where the family has one (``BackboneSpec.pooler``), as elsewhere it would change nothing.
- ``mean``: masked mean of the last hidden states over real tokens -> dropout -> linear.
- ``cls_mlp``: dropout -> a fresh dense + tanh on the summary token -> dropout -> linear
  (AdapterHub's classification head). The summary token is the first one for encoders and
  the last real one for decoders (``BackboneSpec.summary_token``): in a causal model the first
  token has seen nothing else.

``mean`` and ``cls_mlp`` replace the model's own head (its parameter-holding modules outside
the backbone become ``nn.Identity``) by ``model.pelt_head``; ``model.forward`` (``HeadForward``)
runs the model's own forward, feeds the head the backbone's last hidden states and the attention
mask and computes the loss as transformers does (the model's own ``loss_function``), so the model
is still called and returns as before. The hidden states reach it through a frame on a
``context.Stack``: nothing of a batch stays on a module, and ``torch.compile`` traces a model with
its head as one graph.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .backbones import BackboneSpec
from .context import Stack
from .errors import PELTError

HEADS = ("pooler", "pooler_trainable", "mean", "cls_mlp")
HEAD_ATTR = "pelt_head"

# One frame per running forward of a model with a pelt head: {"base", "hidden"}.
# Nothing of a batch is stored on a module (nested forwards and two models stay apart).
FRAMES = Stack("unipelt_head_frames")


def allowed_heads(model: nn.Module, spec: BackboneSpec) -> tuple[str, ...]:
    """The heads that can act on this model (``pooler_trainable`` only where it has a pooler)."""
    return tuple(h for h in HEADS if h != "pooler_trainable" or _pooler(model, spec) is not None)


def _pooler(model: nn.Module, spec: BackboneSpec) -> nn.Module | None:
    if spec.pooler is None:
        return None
    try:
        module = model.base_model.get_submodule(spec.pooler)
    except AttributeError:  # e.g. BertModel(add_pooling_layer=False)
        return None
    return module if any(True for _ in module.parameters()) else None


def head_dropout(config: Any) -> float:
    """The classifier dropout the family's own head uses (first of the usual config names)."""
    for name in ("classifier_dropout", "seq_classif_dropout", "cls_dropout", "hidden_dropout_prob",
                 "hidden_dropout", "resid_pdrop"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


class PoolingHead(nn.Module):
    """``mean``: masked mean -> dropout -> linear; ``cls_mlp``: dropout -> dense + tanh on the
    summary token -> dropout -> linear."""

    def __init__(self, kind: str, hidden: int, num_labels: int, dropout: float, summary_token: str) -> None:
        super().__init__()
        self.kind, self.summary_token = kind, summary_token
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, hidden) if kind == "cls_mlp" else None
        self.out = nn.Linear(hidden, num_labels)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, hidden) -> (batch, hidden), reading real tokens only."""
        if self.kind == "mean":
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        if self.summary_token == "first":
            return hidden[:, 0]
        last = mask.long().cumsum(-1).argmax(-1)  # the last real token, left or right padding
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.pool(hidden, mask))
        if self.dense is not None:
            x = self.dropout(torch.tanh(self.dense(x)))
        return self.out(x)


def attach_head(model: nn.Module, spec: BackboneSpec, head: str, init_std: float) -> None:
    """Install ``head`` on a model apply_pelt has frozen and injected (see module docstring).

    With ``mean`` and ``cls_mlp`` a backbone pooler no longer reaches the logits and is frozen
    even where the method would train it (fine-tuning, BitFit's biases).
    """
    allowed = allowed_heads(model, spec)
    if head not in allowed:
        why = (f"the {spec.family} family has no pooler inside the backbone (its own head already trains)"
               if head == "pooler_trainable" else f"{head!r} is not a head")
        raise PELTError(f"head {head!r} cannot be used here: {why}; allowed heads for {spec.family}: "
                        f"{', '.join(allowed)}")
    if head == "pooler":
        return
    if head == "pooler_trainable":
        for p in _pooler(model, spec).parameters():
            p.requires_grad_(True)
        return
    replace_own_head(model, spec)
    install_head(model, pooling_head(model, spec, head, model.config.num_labels, init_std), HeadForward)


def replace_own_head(model: nn.Module, spec: BackboneSpec) -> None:
    """The model's own head (its parameter-holding modules outside the backbone) becomes ``nn.Identity``;
    a backbone pooler no longer reaching the logits is frozen."""
    pooler = _pooler(model, spec)
    if pooler is not None:  # unused from now on: neither trained (finetune, BitFit) nor counted
        for p in pooler.parameters():
            p.requires_grad_(False)
    base = model.base_model
    for name, child in list(model.named_children()):
        if child is not base and any(True for _ in child.parameters()):
            setattr(model, name, nn.Identity())  # the model's own head: replaced, not kept unused


def pooling_head(model: nn.Module, spec: BackboneSpec, kind: str, num_labels: int, init_std: float) -> PoolingHead:
    """A fresh ``mean`` or ``cls_mlp`` head for ``num_labels`` outputs, on the backbone's device and dtype."""
    ref = next(model.base_model.parameters())
    module = PoolingHead(kind, model.config.hidden_size, num_labels, head_dropout(model.config), spec.summary_token)
    with torch.no_grad():
        for linear in (module.dense, module.out):
            if linear is not None:
                linear.weight.normal_(0.0, init_std)
                linear.bias.zero_()
    return module.to(ref.device, ref.dtype)


def install_head(model: nn.Module, module: nn.Module, forward: type[HeadForward], *args: Any) -> None:
    """``module`` becomes ``model.pelt_head``, fed the base model's last hidden states by ``forward``."""
    setattr(model, HEAD_ATTR, module)
    model.base_model.register_forward_hook(_keep_hidden)
    model.forward = forward(model.forward, *args)


class HeadForward:
    """``model.forward`` with the pelt head: the model's own forward (``inner``), whose logits (and loss)
    the pelt head's replace. An instance attribute, not hooks on the model: ``torch.compile(model)``
    compiles a top-level module's hooks as frames of their own, this runs in the forward's graph.

    The labels are kept from the model's own forward (its head is gone, so it would compute a loss on
    nothing); the base model's last hidden states reach the head through a frame on ``FRAMES``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner  # the bound forward it replaces (deepcopy rebinds it to the copy)
        self.__signature__ = inspect.signature(inner)
        names = list(self.__signature__.parameters)
        self.labels_index = names.index("labels") if "labels" in names else None
        self.mask_index = names.index("attention_mask") if "attention_mask" in names else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.inner.__self__
        labels, args = _take(args, kwargs, self.labels_index, "labels", pop=True)
        mask, _ = _take(args, kwargs, self.mask_index, "attention_mask", pop=False)
        frame = {"base": id(model.base_model), "hidden": None}
        FRAMES.push(frame)
        try:
            output = self.inner(*args, **kwargs)
        finally:
            FRAMES.pop()
        hidden = frame["hidden"]
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        logits = getattr(model, HEAD_ATTR)(hidden, mask)
        loss = None if labels is None else model.loss_function(labels, logits, self.loss_config(model))
        if isinstance(output, tuple):
            return ((loss,) if loss is not None else ()) + (logits,) + tuple(output[1:])
        fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
        return type(output)(loss=loss, logits=logits, **fields)


    def loss_config(self, model: nn.Module) -> Any:
        """What the loss reads (``num_labels``, ``problem_type``): the model's config."""
        return model.config


def _take(args: tuple, kwargs: dict, index: int | None, name: str, pop: bool) -> tuple[Any, tuple]:
    if name in kwargs:
        return (kwargs.pop(name) if pop else kwargs[name]), args
    if index is not None and index < len(args):
        value = args[index]
        if pop:
            args = (*args[:index], None, *args[index + 1:])
        return value, args
    return None, args


def _keep_hidden(base: nn.Module, args: tuple, output: Any) -> None:
    """Base-model hook: its last hidden states, for the head of the forward that called it."""
    frame = FRAMES.top()
    if frame is not None and frame["base"] == id(base) and frame["hidden"] is None:
        frame["hidden"] = output[0]  # last_hidden_state
