"""The tasks' metrics, from torchmetrics: GLUE's scored the way GLUE and the paper score them, plus macro-F1."""

from __future__ import annotations

import torch
from torchmetrics.classification import Accuracy, BinaryMatthewsCorrCoef, F1Score
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from datamodules.tasks import TaskInfo


class GLUEMatthewsCorrCoef(BinaryMatthewsCorrCoef):
    """Matthews correlation that is 0 when all predictions (or all labels) are one class.

    That case is 0/0. GLUE's scorer and the paper (scikit-learn's ``matthews_corrcoef``) call it 0;
    torchmetrics returns a limit instead, +-0.0256 for a constant prediction on CoLA's dev set, which
    would put a model that never predicts "unacceptable" above one that is slightly right, and a
    collapsed run at 2.6 in the table where the paper's collapsed runs read 0.
    """

    def compute(self) -> torch.Tensor:
        tn, fp, fn, tp = self.confmat.reshape(-1)
        if min(tp + fp, tn + fn, tp + fn, tn + fp) == 0:
            return torch.zeros((), dtype=torch.float32, device=self.confmat.device)
        return super().compute()


def make_metric(name: str, task: TaskInfo) -> torch.nn.Module:
    """One of a task's metric names (``TaskInfo.metrics``) as a torchmetrics object."""
    if name == "accuracy":
        return Accuracy(task="multiclass", num_classes=task.num_labels)
    if name == "f1":
        return F1Score(task="binary")
    if name == "f1_macro":  # a user's own classes: every class counts the same, however rare
        return F1Score(task="multiclass", num_classes=task.num_labels, average="macro")
    if name == "matthews":
        return GLUEMatthewsCorrCoef()
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        return SpearmanCorrCoef()
    raise ValueError(f"unknown metric {name!r}")
