"""`unipelt reproduce` from an installed package: the configs ship as package data and every run
starts through the installed entry point, with no checkout on any path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import resources
from pathlib import Path

import pytest

from reproduce import grid
from reproduce.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "cli.py", "unipelt", "datamodules", "lightning_modules",
           "reproduce", "configs")


def test_configs_resolve_through_importlib_resources():
    folder = grid.shipped_configs()
    assert folder == Path(str(resources.files("configs"))) and folder.is_dir()
    for task in TASKS:  # every config a grid can plan
        for tag in ("k100", "k500", "k1000", "full"):
            assert (folder / f"{task}_{tag}.yaml").is_file(), f"{task}_{tag}.yaml"
    assert grid.GridOptions(out=Path("g")).configs_dir == folder


def test_installed_runs_start_through_the_entry_point(tmp_path, monkeypatch):
    """Outside a checkout (no setup.cfg beside the packages) the command is the `unipelt` script
    beside this Python, else the installed cli module's file: never a checkout's cli.py."""
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.setattr(grid, "REPO_ROOT", site)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    import cli

    assert grid.default_cli() == [str(bindir / "python"), str(Path(cli.__file__).resolve())]
    (bindir / "unipelt").write_text("#!/bin/sh\n")
    assert grid.default_cli() == [str(bindir / "unipelt")]
    monkeypatch.setattr(grid, "REPO_ROOT", ROOT)  # a checkout runs its own cli.py
    assert grid.default_cli() == [str(bindir / "python"), str(ROOT / "cli.py")]


@pytest.mark.slow
def test_wheel_install_runs_a_grid_without_the_checkout(tmp_path):
    """Build a wheel, install it (non-editable) into a fresh venv, run a one-run grid from another folder."""
    from tests.fixtures import write_rte, write_tiny_model

    src = tmp_path / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    # A user's shell has no PYTHONPATH to the checkout (a developer's may): with one, pip would find the
    # checkout's package already there and install nothing.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                   check=True, cwd=src, env=env)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies (torch, transformers, ...) come from this environment's site-packages, added as a
    # plain path: its .pth files (an editable install of the checkout) are not processed there.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    wheel = next((tmp_path / "dist").glob("unipelt-*.whl"))
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)], check=True, env=env)

    work = tmp_path / "work"
    write_tiny_model(work / "tiny-bert")
    write_rte(work / "glue")
    found = subprocess.run([str(python), "-c", "import cli, configs; print(cli.__file__, configs.__file__)"],
                           capture_output=True, text=True, cwd=work, env=env)
    assert found.returncode == 0, found.stderr[-3000:]
    where = found.stdout
    assert str(ROOT) not in where and str(site) in where  # the installed copies, not the checkout
    args = ["reproduce", "--tasks", "rte", "--methods", "lora", "--seeds", "0", "--out", "grid",
            "--data-dir", "glue", "--model", "tiny-bert", "--", "--data.k_shot", "16", "--data.dev_size", "24",
            "--data.batch_size", "8", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu"]
    done = subprocess.run([str(venv / "bin" / "unipelt"), *args], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rec = json.loads((work / "grid/rte/k100/lora/seed0/metrics.json").read_text())
    assert rec["status"] == "done" and "test/accuracy" in rec["test"]
    cmd = rec["command"]
    assert cmd[0] == str(venv / "bin" / "unipelt").removeprefix(str(work) + "/")
    assert Path(cmd[cmd.index("--config") + 1]) == site / "configs" / "rte_k100.yaml"
    text = json.dumps(rec)
    assert str(ROOT) not in text and str(work) not in text  # no checkout, and paths relative to the run folder
    assert cmd[cmd.index("--trainer.default_root_dir") + 1] == "grid/rte/k100/lora/seed0"
