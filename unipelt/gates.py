"""Gates: ``Linear(hidden, n) + sigmoid`` per token, reduced per example by the forward context.

The gates that read the same input (in BERT the attention input feeds the prefix gate and the
LoRA gates of q and v) share one ``GateBank``: one ``Linear(hidden, n)`` and one sigmoid
instead of n, computed once per layer and forward (the context caches it) however many
submodules read it. Each row of the bank is one of the paper's gates (its own ``W``, ``b``):
fusing them changes neither the function nor the parameter count (769 per gate on bert-base).

The reduction over tokens is the context's (``ForwardContext.reduce``): the mean over real
tokens, so padding a batch cannot change any example's gate (the authors' code padded every
input to 128).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .context import current


class GateBank(nn.Module):
    """The gates of one layer that read one input; ``keys`` name them (``"prefix"``, ``"lora_query"``)."""

    def __init__(self, hidden: int, keys: list[str], layer: int, init_std: float) -> None:
        super().__init__()
        self.keys = tuple(keys)
        self.layer = layer
        self.proj = nn.Linear(hidden, len(keys))
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    @property
    def gate_keys(self) -> tuple[str, ...]:
        """Its gates as ``gate_values()`` names them: ``layer3.prefix``."""
        return tuple(f"layer{self.layer}.{key}" for key in self.keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, hidden) -> (batch, n) gate values ((batch, tokens, n) in causal models).

        The sigmoid runs in float32 (stable under bf16 autocast); the gates take x's dtype. Casts
        only where a dtype differs: in a decoder's generation step every op per layer counts."""
        logits = nn.functional.linear(x, self.proj.weight, self.proj.bias)  # not a module call: fewer us
        gates = current().reduce(torch.sigmoid(logits if logits.dtype == torch.float32 else logits.float()))
        return gates if gates.dtype == x.dtype else gates.to(x.dtype)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)``, computed once per forward however many submodules read it."""
        ctx = current()
        gates = ctx.gates.get(self)
        if gates is None:
            gates = self.forward(x)
            ctx.gates[self] = gates
            # gate_values() reduces per example when asked, not on every forward
            ctx.record[self] = gates.detach() if gates.requires_grad else gates
        return gates

    def cached(self) -> torch.Tensor:
        """This forward's values; the bank must have been called on its input already."""
        return current().gates[self]

    def hold(self, fixed: Mapping[str, float]) -> None:
        """Every gate of the bank at its value in ``fixed`` (keyed by ``gate_keys``) for every input:
        zero weights, bias ``logit(value)`` (how ``merge`` fixes gates at calibrated values)."""
        values = torch.tensor([fixed[k] for k in self.gate_keys], dtype=torch.float64)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.copy_(torch.logit(values).to(self.proj.bias.dtype))


def gate_keys(model: nn.Module) -> list[str]:
    """Every gate of ``model``, named as ``gate_values()`` names them."""
    return [key for m in model.modules() if isinstance(m, GateBank) for key in m.gate_keys]


def slot_holders(model: nn.Module) -> list[str]:
    """The modules of ``model`` that hold a gate slot (as an attribute, or in a dict attribute)."""
    def holds(value: object) -> bool:
        return isinstance(value, GateSlot) or (isinstance(value, dict) and any(map(holds, value.values())))

    return [name for name, m in model.named_modules() if any(map(holds, vars(m).values()))]


class GateSlot:
    """One gate of a bank, held by the submodule it scales (a plain object: the bank itself is
    registered once, in the layer's ``pelt_gates``)."""

    __slots__ = ("bank", "index")

    def __init__(self, bank: GateBank, index: int) -> None:
        self.bank = bank
        self.index = index

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(batch,) gate values for the input ``x`` of the bank ((batch, tokens) when causal)."""
        return self.bank.values(x)[..., self.index]

    def cached(self) -> torch.Tensor:
        return self.bank.cached()[..., self.index]

    @property
    def key(self) -> str:
        """Its name in ``gate_values()`` and in the fixed gates of ``merge``: ``layer3.lora_value``."""
        return self.bank.gate_keys[self.index]

    def scale(self, x: torch.Tensor | None) -> torch.Tensor:
        """The gate for input ``x``, shaped to scale (batch, tokens, features): (batch, 1, 1), or
        (batch, tokens, 1) when causal, in one slice (a decoder's generation step is counted in ops).
        ``x=None``: the values this forward already computed (a submodule later in the layer than its
        gate's input, e.g. (IA)^3 on the FFN reading the attention input's gate)."""
        values = self.bank.values(x) if x is not None else self.bank.cached()
        if values.dim() == 3:
            return values if values.shape[-1] == 1 else values[..., self.index:self.index + 1]
        return values[:, self.index:self.index + 1].unsqueeze(-1)


class GateRequests:
    """Collects the gates tuners ask for, then builds one bank per (layer, input site)."""

    def __init__(self, hidden: int, init_std: float) -> None:
        self.hidden = hidden
        self.init_std = init_std
        self.pending: dict[tuple[int, str], list[tuple[str, GateSlot]]] = {}

    def request(self, layer: int, site: str, key: str) -> GateSlot:
        """A gate reading ``site`` (e.g. ``"attention"``: the attention input) of ``layer``."""
        slot = GateSlot(None, -1)  # type: ignore[arg-type]  # bound by build()
        self.pending.setdefault((layer, site), []).append((key, slot))
        return slot

    def build(self, layers: nn.ModuleList, device: torch.device, dtype: torch.dtype) -> None:
        """Create the banks (``layer.pelt_gates[site]``) and bind every requested slot to its row."""
        for (layer_idx, site), requests in self.pending.items():
            bank = GateBank(self.hidden, [k for k, _ in requests], layer_idx, self.init_std)
            layer = layers[layer_idx]
            if not hasattr(layer, "pelt_gates"):
                layer.add_module("pelt_gates", nn.ModuleDict())
            layer.pelt_gates[site] = bank.to(device, dtype)
            for index, (_, slot) in enumerate(requests):
                slot.bank, slot.index = bank, index
