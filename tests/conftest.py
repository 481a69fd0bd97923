"""Shared fixtures: tiny random Hugging Face encoders (no download, milliseconds to build)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from tests.cli_server import cache_dir, glue_dir, server, tiny_model  # noqa: F401 - module-scoped fixtures

# `pytest -n auto` runs one worker per core: a worker (or a CLI it starts) that also spread its kernels over
# every core would oversubscribe them, and OpenMP threads spinning on each other made the tiny models' steps
# several times slower. One thread each, here and in every process a test starts (they inherit the variable).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)


@pytest.fixture
def make_tiny() -> Callable[..., torch.nn.Module]:
    """make_tiny(family="bert"|"roberta", seed=0, num_labels=3, attn="sdpa"|"eager", **config)."""

    def make(family: str = "bert", seed: int = 0, num_labels: int = 3, attn: str = "sdpa",
             **overrides) -> torch.nn.Module:
        torch.manual_seed(seed)
        kwargs = {**TINY, "num_labels": num_labels, **overrides}
        if family == "bert":
            model = BertForSequenceClassification(BertConfig(**kwargs))
        elif family == "roberta":
            model = RobertaForSequenceClassification(RobertaConfig(**kwargs))
        else:
            raise ValueError(family)
        model.config._attn_implementation_internal = attn
        return model

    return make


def pytest_terminal_summary(terminalreporter) -> None:
    """How many bad inputs and faults tests/test_faults.py tried in this session (its `tried` calls)."""
    faults = sys.modules.get("test_faults") or sys.modules.get("tests.test_faults")  # as pytest imported it
    if faults is not None and faults.BAD_INPUTS:
        terminalreporter.write_line(f"tests/test_faults.py tried {len(faults.BAD_INPUTS)} bad inputs and faults "
                                    f"({len(set(faults.BAD_INPUTS))} distinct)")
