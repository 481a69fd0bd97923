"""The run pipeline's place in the layers (unipelt < datamodules < lightning_modules < cli.py, reproduce/):
imports point down only, nothing imports cli.py, no circle; and the entry point loads no torch to answer help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_core_imports import cycles, imports, module_name

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"unipelt": 0, "datamodules": 1, "lightning_modules": 2, "reproduce": 3, "cli": 3}


def source_graph() -> dict[str, set[str]]:
    folders = [folder for folder in LAYERS if folder != "cli"]
    paths = [ROOT / "cli.py", *(p for folder in folders for p in sorted((ROOT / folder).rglob("*.py")))]
    known = {module_name(p): p for p in paths}
    return {name: imports(name, path, known) for name, path in known.items()}


def test_imports_point_down_and_nothing_imports_cli():
    edges = source_graph()
    upward = [(a, b) for a, deps in edges.items() for b in deps
              if b == "cli" or LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]]
    assert not upward, upward
    assert "lightning_modules.instruct_cli" not in edges  # the second CLI is gone
    assert not cycles(edges)


def test_the_entry_point_and_the_pipeline_package_load_no_torch():
    probe = ("import sys, cli, lightning_modules, lightning_modules.help, lightning_modules.errors; "
             "print(sorted(m for m in ('torch', 'pytorch_lightning', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
