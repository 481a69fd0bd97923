"""`cli.py slim`: a trained run's checkpoint slimmed on its dev split, exported with a table of what it kept."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from cli import main
from lightning_modules.run import build_cli
from lightning_modules.summary import SUMMARY_FILE
from tests.fixtures import write_rte, write_tiny_model
from tests.test_cli import common_args


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    return write_rte(tmp_path_factory.mktemp("glue"), n_train=60, n_dev=21)


@pytest.fixture(scope="module")
def trained_run(glue_dir, tmp_path_factory) -> Path:
    """The best checkpoint of a 2-epoch UniPELT (all) run on a tiny BERT, RTE K=16."""
    root = tmp_path_factory.mktemp("run")
    model = write_tiny_model(root / "tiny-bert")
    build_cli(["fit", *common_args(model, glue_dir, root / "run", "unipelt_all"), "--trainer.max_epochs", "2",
               "--model.learning_rate", "0.01"])
    return Path(json.loads((root / "run" / SUMMARY_FILE).read_text())["best_checkpoint"])


def run_slim(*args: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(["slim", *args])
    return done.value.code


def reference(trained_run: Path, glue_dir: Path):
    """The checkpoint's model and its dev loader, rebuilt as `validate --ckpt_path` rebuilds them."""
    from lightning_modules import UniPELTLightningModule, load_checkpoint_file
    from lightning_modules.kinds import CLASSIFICATION
    from lightning_modules.run import PELTCLI, checkpoint_defaults

    checkpoint = load_checkpoint_file(trained_run)
    cli = PELTCLI(CLASSIFICATION, args=["--data.data_dir", str(glue_dir), "--trainer.logger", "false"], run=False,
                  ckpt_defaults=checkpoint_defaults("validate", checkpoint, CLASSIFICATION))
    assert isinstance(cli.model, UniPELTLightningModule)
    cli.model.load_trainable(checkpoint)
    cli.datamodule.setup("validate")
    return cli.model.model, cli.datamodule.val_dataloader()


def test_slim_writes_an_export_and_a_table_equal_to_unipelt_slim_on_the_dev_split(trained_run, glue_dir, tmp_path,
                                                                                    capsys):
    import unipelt

    model, dev = reference(trained_run, glue_dir)
    gates = sorted(unipelt.calibrate_gates(model, dev).values())
    min_gate = round((gates[len(gates) // 3] + gates[len(gates) // 3 + 1]) / 2, 6)  # a third of them go
    out = tmp_path / "slim"
    assert run_slim("--ckpt_path", str(trained_run), "--min_gate", str(min_gate), "--out", str(out),
                    "--data.data_dir", str(glue_dir)) == 0
    assert "wrote" in capsys.readouterr().out
    table = (out / "slim.md").read_text()
    rows = list(csv.DictReader((out / "slim.csv").open()))
    assert "| layer | adapter |" in table and "max |logit difference|" in table
    assert len(rows) == 2 * 6  # 2 layers; adapter, lora q and v, ia3, parallel adapter, prefix
    assert all((r["as"] == "removed") == (float(r["mean_gate"]) < min_gate) for r in rows)
    assert {r["as"] for r in rows} == {"removed", "folded", "module"}

    loaded = unipelt.from_pretrained(out)
    record = json.loads((out / "unipelt_config.json").read_text())
    assert record["pelt_config"]["slim"] == {f"layer{r['layer']}.{r['gate']}": pytest.approx(float(r["mean_gate"]))
                                             for r in rows if r["as"] != "removed"}
    expected = unipelt.slim(model, dev, min_gate=min_gate)  # the same, in Python, on the run's dev split
    batch = next(iter(dev))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected(**inputs).logits)


@pytest.mark.parametrize("args,words", [
    (["--min_gate", "1.5"], "--min_gate 1.5: a gate is a number in [0, 1]"),
    (["--min_gate", "0.1"], "slim: the following arguments are required: --out"),
])
def test_bad_options_are_one_line_exit_2(trained_run, tmp_path, capsys, args, words):
    out_args = [] if "required" in words else ["--out", str(tmp_path / "x")]
    assert run_slim("--ckpt_path", str(trained_run), *args, *out_args) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_a_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    assert run_slim("--ckpt_path", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "none.ckpt" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()
