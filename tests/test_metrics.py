"""GLUE's Matthews correlation: the phi coefficient, and 0 (not torchmetrics' limit) for one-class predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryMatthewsCorrCoef

from lightning_modules.metrics import GLUEMatthewsCorrCoef

# CoLA's dev set: 721 acceptable, 322 unacceptable.
COLA_DEV = torch.tensor([1] * 721 + [0] * 322)


@pytest.mark.parametrize("constant", [0, 1])
def test_a_constant_prediction_scores_zero_as_glue_scores_it(constant):
    preds = torch.full_like(COLA_DEV, constant)
    assert GLUEMatthewsCorrCoef()(preds, COLA_DEV).item() == 0.0
    # torchmetrics' own value, which the table showed for collapsed CoLA runs before (±2.56).
    assert abs(BinaryMatthewsCorrCoef()(preds, COLA_DEV).item()) == pytest.approx(0.0256, abs=1e-4)


def test_one_class_labels_score_zero():
    assert GLUEMatthewsCorrCoef()(torch.tensor([0, 1, 1, 0]), torch.ones(4, dtype=torch.long)).item() == 0.0


def test_equals_the_phi_coefficient_accumulated_over_batches():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (500,), generator=gen)
    noisy = torch.where(torch.rand(500, generator=gen) < 0.3, 1 - labels, labels)
    metric = GLUEMatthewsCorrCoef()
    for chunk in range(0, 500, 64):
        metric.update(noisy[chunk : chunk + 64], labels[chunk : chunk + 64])
    phi = np.corrcoef(noisy.numpy(), labels.numpy())[0, 1]  # Matthews correlation is Pearson's on 0/1
    assert metric.compute().item() == pytest.approx(phi, abs=1e-6)
    assert 0.2 < phi < 0.6


def test_perfect_and_inverted_predictions():
    assert GLUEMatthewsCorrCoef()(COLA_DEV, COLA_DEV).item() == pytest.approx(1.0)
    assert GLUEMatthewsCorrCoef()(1 - COLA_DEV, COLA_DEV).item() == pytest.approx(-1.0)


def test_probabilities_are_thresholded_like_torchmetrics():
    probs = torch.tensor([0.9, 0.2, 0.7, 0.4, 0.6, 0.1])
    labels = torch.tensor([1, 0, 0, 0, 1, 1])
    assert GLUEMatthewsCorrCoef()(probs, labels).item() == pytest.approx(BinaryMatthewsCorrCoef()(probs, labels).item())
