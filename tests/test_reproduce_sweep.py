"""The sweep's edge rule on the head grid's committed sweep: it asked for the arms that were then run."""

import json
import shutil
from pathlib import Path

import pytest

from reproduce.sweep import arm_name, edge_arms

HEAD = Path(__file__).resolve().parents[1] / "results" / "minilm_k100_head"


def old_rate(task: str, method: str) -> float:
    old = json.loads((HEAD.parent / "minilm_k100" / "learning_rates.json").read_text())
    return float(old[("stsb:" if task == "stsb" else "") + method].split()[-1])


def test_arm_names():
    assert [arm_name(p) for p in (-2, -1, 0, 1, 3)] == ["d9", "d3", "x1", "x3", "x27"]


@pytest.mark.skipif(not (HEAD / "sweep" / "x9").is_dir(), reason="the head grid's sweep is not in this checkout")
def test_edges_of_the_head_sweep(tmp_path):
    methods = ("finetune", "adapter", "prefix", "lora", "unipelt_apl")
    for arm in ("d3", "x1", "x3"):
        shutil.copytree(HEAD / "sweep" / arm, tmp_path / arm)
    first = edge_arms(tmp_path, ("sst2", "stsb"), methods, old_rate)
    assert first == {(2, "sst2"): ["adapter", "lora"], (-2, "sst2"): ["prefix", "unipelt_apl"],
                     (-2, "stsb"): ["finetune", "unipelt_apl"]}
    assert {arm_name(p) for p, _ in first} <= {p.name for p in (HEAD / "sweep").iterdir()}
    assert edge_arms(HEAD / "sweep", ("sst2", "stsb"), methods, old_rate) == {}  # the finished sweep: inside
