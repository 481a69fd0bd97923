"""No file a user passes is unpickled with arbitrary classes (issue 14).

A "checkpoint" whose unpickling would create a file is handed to every loader (the CLI's
`--ckpt_path`, the Python loaders, Lightning's `load_from_checkpoint`); each must refuse it and the
file must never appear. Exact resume's use of Lightning's private API is checked by name.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_modules.checkpointing import AtomicCheckpointIO, CheckpointFileError, ExactResume, load_checkpoint_file
from lightning_modules.compat import SUPPORTED_LIGHTNING, missing_private_api
from tests.fixtures import write_rte, write_tiny_model

ROOT = Path(__file__).resolve().parents[1]


class _CreatesAFile:
    """Unpickling this runs `exec`, which creates `target`: what a stranger's checkpoint could do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return exec, (f"open({str(self.target)!r}, 'w').close()",)


def write_malicious_checkpoint(path: Path, target: Path) -> Path:
    # Looks like ours (a zip written by torch.save with a "unipelt" entry) to every check before unpickling.
    torch.save({"unipelt": {"method": "lora"}, "state_dict": {}, "payload": _CreatesAFile(target)}, path)
    return path


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    """Without this, the refusals below could pass on a file that does nothing."""
    target = tmp_path / "pwned"
    evil = write_malicious_checkpoint(tmp_path / "evil.ckpt", target)
    torch.load(evil, weights_only=False)
    assert target.exists()


def test_python_loaders_refuse_it_and_nothing_runs(tmp_path):
    target = tmp_path / "pwned"
    evil = write_malicious_checkpoint(tmp_path / "evil.ckpt", target)
    for load in (load_checkpoint_file, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointFileError) as err:
            load(evil)
        message = str(err.value)
        assert "\n" not in message and str(evil) in message and "refused" in message and "exec" in message
        assert not target.exists()

    from lightning_modules import UniPELTLightningModule

    with pytest.raises(pickle.UnpicklingError, match="exec"):  # Lightning's own loader: torch refuses
        UniPELTLightningModule.load_from_checkpoint(evil)
    assert not target.exists()


def test_cli_refuses_it_in_one_line_exit_2_and_nothing_runs(tmp_path):
    target = tmp_path / "pwned"
    evil = write_malicious_checkpoint(tmp_path / "evil.ckpt", target)
    model, glue, out = write_tiny_model(tmp_path / "tiny-bert"), write_rte(tmp_path / "glue"), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "cli.py", "test", "--config", "configs/rte_k100.yaml",
         "--model.model_name_or_path", str(model), "--data.data_dir", str(glue),
         "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu", "--ckpt_path", str(evil)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: --ckpt_path"), proc.stderr[-3000:]
    assert str(evil) in lines[-1] and "refused" in lines[-1]
    assert not target.exists()
    assert not out.exists()


def test_safe_extras_load_and_others_are_named(tmp_path):
    """Paths (hyperparameters given as Path from Python) load; any other class is refused by name."""
    good = tmp_path / "paths.ckpt"
    torch.save({"unipelt": {}, "hyper_parameters": {"model_name_or_path": pathlib.Path("/m/bert")}}, good)
    assert load_checkpoint_file(good)["hyper_parameters"]["model_name_or_path"] == pathlib.Path("/m/bert")

    import collections

    other = tmp_path / "other.ckpt"
    torch.save({"unipelt": {}, "x": collections.deque([1])}, other)
    with pytest.raises(CheckpointFileError, match=r"refused: loading it asks for 'collections.deque'"):
        load_checkpoint_file(other)


def test_lightning_private_api_the_pipeline_uses_is_present():
    import pytorch_lightning

    missing = missing_private_api()
    assert not missing, (
        f"pytorch-lightning {pytorch_lightning.__version__} lacks {', '.join(missing)}, which the run pipeline "
        f"uses (lightning_modules/compat.py); supported: {SUPPORTED_LIGHTNING} (setup.cfg)"
    )


def test_exact_resume_says_which_private_name_is_gone_instead_of_resuming_wrongly():
    trainer = SimpleNamespace(fit_loop=SimpleNamespace())  # a Lightning whose fit loop renamed its loader state
    with pytest.raises(RuntimeError, match=r"_FitLoop\._combined_loader_states_to_load.*pytorch-lightning>=2\.4,<2\.7"):
        ExactResume().on_train_start(trainer, None)


def test_an_export_whose_weights_are_a_pickle_is_refused_and_nothing_runs(tmp_path, make_tiny):
    import unipelt
    from unipelt import PELTConfig, PELTError, apply_pelt
    from unipelt.io import WEIGHTS_NAME

    model = apply_pelt(make_tiny("bert"), PELTConfig.preset("lora"))
    folder = unipelt.save_pretrained(model, tmp_path / "export", base_model_name_or_path="tiny")
    target = tmp_path / "pwned"
    write_malicious_checkpoint(folder / WEIGHTS_NAME, target)
    with pytest.raises(PELTError, match="not a readable safetensors file"):
        unipelt.from_pretrained(folder, model=make_tiny("bert"))
    assert not target.exists()
