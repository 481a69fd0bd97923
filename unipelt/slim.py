"""Gates that pay for themselves: `slim` drops what the gates turned off and folds the rest.

`slim(model, batches, min_gate)` calibrates every gate on ``batches`` (its mean over their examples,
`calibrate_gates`), removes each gated part of each layer whose mean is below ``min_gate`` (the layer
computes there what the backbone computes), fixes every other gate at its mean as a constant inside
the submodule it scales (no gate bank runs), and folds what folds: LoRA, DoRA and (IA)^3 into the
backbone's weights, the prefix into a static tensor scaled per layer. The result runs fewer ops; it is
an approximation of the gated model where gates vary between inputs, and `SlimReport` says by how much
on the calibration batches (the largest logit and probability differences, the agreement of argmaxes).

The slimmed model's config records the gates it kept (``PELTConfig.slim``), so `save_pretrained` /
`from_pretrained` rebuild it exactly: the same structure, the same tensors (saved before their folds),
the same folds.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import pelt_state_dict
from .errors import PELTError
from .export import calibrate_gates, unslimmed
from .gates import gate_keys
from .inject import SLIM_WEIGHTS, fold_settled, settle
from .tuners import TUNERS
from .tuners.base import Merge

REPORT_ATTR = "pelt_slim_report"


@dataclass(frozen=True)
class SlimReport:
    """What `slim` kept and how far the slimmed model is from the full one on the calibration batches."""

    min_gate: float
    gates: dict[str, float]  # every gate's mean over the calibration examples
    kept: dict[str, float]  # those at or above min_gate: fixed at that value
    folded: tuple[str, ...]  # submodules folded into the backbone's weights
    examples: int
    max_logit_diff: float
    max_prob_diff: float | None  # None for a regression head (one output)
    agreement: float | None  # fraction of examples (tokens, for a language model) with the same argmax

    def rows(self) -> list[dict[str, object]]:
        """One row per gate: layer, gate name, submodule, mean gate, kept, and how it stays (folded / module)."""
        rows = []
        for key, value in self.gates.items():
            layer, name = key.split(".", 1)
            sub = _submodule(name)
            how = "removed" if key not in self.kept else "folded" if sub in self.folded else "module"
            rows.append({"layer": int(layer.removeprefix("layer")), "gate": name, "submodule": sub,
                         "mean_gate": value, "kept": key in self.kept, "as": how})
        return rows

    def markdown(self) -> str:
        """A table of layers by gates (each cell: mean gate and what became of the part), then the differences."""
        rows = self.rows()
        order = list(TUNERS)
        names = sorted(dict.fromkeys(r["gate"] for r in rows), key=lambda n: (order.index(_submodule(n)), n))
        layers = sorted({r["layer"] for r in rows})
        cell = {(r["layer"], r["gate"]): f"{r['mean_gate']:.3f} {r['as']}" for r in rows}
        lines = ["| layer | " + " | ".join(names) + " |", "|---:|" + "---|" * len(names)]
        lines += [f"| {i} | " + " | ".join(cell.get((i, n), "") for n in names) + " |" for i in layers]
        kept = len(self.kept)
        probs = f", max |probability difference| {self.max_prob_diff:.3g}" if self.max_prob_diff is not None else ""
        agree = f", same argmax {self.agreement:.2%}" if self.agreement is not None else ""
        lines += ["", f"min_gate {self.min_gate}: {kept} of {len(self.gates)} gated parts kept, "
                  f"{len(self.gates) - kept} removed; folded into the weights: {', '.join(self.folded) or 'nothing'}.",
                  f"On the {self.examples} calibration examples: max |logit difference| {self.max_logit_diff:.3g}"
                  f"{probs}{agree}."]
        return "\n".join(lines) + "\n"


def _submodule(gate: str) -> str:
    """The submodule a gate scales: ``lora_query`` -> lora (the longest registered name it starts with)."""
    return max((t for t in TUNERS if gate == t or gate.startswith(t + "_")), key=len)


def slim(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], min_gate: float = 0.1) -> nn.Module:
    """A copy of ``model`` without the gated parts whose mean gate on ``batches`` is below ``min_gate``, the
    other gates fixed at their means, and what folds folded (``model`` is not changed). ``batches``: the
    model's keyword inputs (dicts with ``input_ids``, ``attention_mask``; labels are ignored), e.g. a dev
    DataLoader. The returned model is in eval mode; ``model.pelt_slim_report`` is its `SlimReport`."""
    config = unslimmed(model)
    if config.finetune or not config.submodules:
        raise PELTError("slim: this model has no submodules to remove or fold")
    if isinstance(min_gate, bool) or not isinstance(min_gate, (int, float)) or not 0 <= min_gate <= 1:
        raise PELTError(f"slim: min_gate must be a number in [0, 1], got {min_gate!r}")
    batches = list(batches)
    if not batches:
        raise PELTError("slim: no calibration batches")
    gates = calibrate_gates(model, batches) if gate_keys(model) else {}
    kept = {key: value for key, value in gates.items() if value >= min_gate}
    slimmed = copy.deepcopy(model)
    slimmed.pelt_config = dataclasses.replace(config, slim=kept)
    settle(slimmed, slimmed.pelt_config)
    weights = pelt_state_dict(slimmed)["weights"]  # before the folds: what save_pretrained writes
    fold_settled(slimmed)
    setattr(slimmed, SLIM_WEIGHTS, weights)
    slimmed.eval()
    folded = tuple(name for name, sub in config.submodules.items() if sub.merge is Merge.FOLD)
    setattr(slimmed, REPORT_ATTR, SlimReport(float(min_gate), gates, kept, folded, *compare(model, slimmed, batches)))
    return slimmed


@torch.no_grad()
def compare(full: nn.Module, slimmed: nn.Module, batches: list[Mapping[str, torch.Tensor]],
            ) -> tuple[int, float, float | None, float | None]:
    """Examples, max |logit difference|, max |probability difference| and argmax agreement of two models on
    ``batches`` (a language model's logits at real tokens only)."""
    device = next(full.parameters()).device
    was_training = full.training
    full.eval()
    examples, logit_diff, prob_diff, same, total = 0, 0.0, 0.0, 0, 0
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "label", "idx")}
            a, b = full(**inputs).logits.float(), slimmed(**inputs).logits.float()
            mask = inputs.get("attention_mask")
            if a.dim() == 3 and mask is not None:  # (batch, tokens, vocab): real tokens only
                a, b = a[mask.bool()], b[mask.bool()]
            examples += next(iter(inputs.values())).shape[0]
            logit_diff = max(logit_diff, float((a - b).abs().max()))
            if a.shape[-1] > 1:
                prob_diff = max(prob_diff, float((a.softmax(-1) - b.softmax(-1)).abs().max()))
                same += int((a.argmax(-1) == b.argmax(-1)).sum())
                total += a.argmax(-1).numel()
    finally:
        full.train(was_training)
    classified = total > 0
    return examples, logit_diff, prob_diff if classified else None, same / total if classified else None
