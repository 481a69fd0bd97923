"""Reliability through the real CLI (issue 6): exact resume after SIGKILL, atomic and checked checkpoints,
NaN stops, one-line answers to bad input, determinism.

Every case runs `cli.main()` (the `unipelt` console script, i.e. `python cli.py ...`) in its own
process, with its own exit code and stderr. Importing torch + transformers + Lightning takes ~10 s
here, so a module-scoped "CLI server" imports `cli` once and forks one child per command; a child is
a real process like `python cli.py`: it can be SIGKILLed, its exit status is the one a shell sees,
and an uncaught exception prints a traceback on its stderr. `test_console_script_in_a_fresh_process`
checks that a plain `python cli.py` behaves the same.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.cli_server import CliServer  # noqa: F401 - tests/test_faults.py imports it from here too
from tests.fixtures import write_rte, write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CALLBACKS = "tests.test_reliability"


# ----------------------------------------------------------------------------- callbacks injected via the CLI
class KillAtStep(pl.Callback):
    """SIGKILL this process right after optimizer step `step` (before that step's checkpoint, if any)."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillInValidation(pl.Callback):
    """SIGKILL this process inside the validation that ends epoch `epoch`, after its first batch."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonAtStep(pl.Callback):
    """Make one trainable weight NaN before optimizer step `step`, as a diverging run would."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))


def run_args(model: Path, data: Path, out: Path, cache: Path, **options: object) -> list[str]:
    """A tiny RTE run: K=32, batch 4 (8 steps an epoch), 16 dev rows, CPU."""
    settings = {
        "config": ROOT / "configs" / "rte_k100.yaml",
        "model.model_name_or_path": model,
        "data.data_dir": data,
        "data.cache_dir": cache,
        "data.k_shot": 32,
        "data.dev_size": 16,
        "data.batch_size": 4,
        "trainer.default_root_dir": out,
        "trainer.accelerator": "cpu",
        "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
        "trainer.max_epochs": 3,
        "model.learning_rate": 0.01,
        **options,
    }
    args = []
    for key, value in settings.items():
        if value is not None:
            args += [f"--{key}", str(value)]
    return args


def final_state(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    summary = json.loads((out / "summary.json").read_text())
    return ckpt["state_dict"], summary


def assert_same_run(a: Path, b: Path) -> None:
    (wa, sa), (wb, sb) = final_state(a), final_state(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert sa["test"] == sb["test"]  # exact floats
    assert sa["best_val"] == sb["best_val"]
    assert sa["global_steps"] == sb["global_steps"] and sa["epochs"] == sb["epochs"]
    assert Path(sa["best_checkpoint"]).name == Path(sb["best_checkpoint"]).name


def only_line(stderr: str) -> str:
    """A refusal prints one line on stderr, `error: ...`, and nothing else (no seed, device or progress lines)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    return lines[-1]


def tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


# ----------------------------------------------------------------------------- 1. exact resume after SIGKILL
@pytest.mark.parametrize("when", ["mid-epoch", "in-validation"])
def test_sigkill_then_resume_gives_the_uninterrupted_run(server, tiny_model, glue_dir, cache_dir, tmp_path, when):
    """mid-epoch: killed after a random step (8 a epoch, 3 epochs, `last.ckpt` every 3 steps and after
    each validation). in-validation: `last.ckpt` due every 4 steps, so also at the epoch's last step;
    killed inside the validation that follows, in the epoch whose dev score is the best: a resume that
    skipped that validation would keep another best checkpoint (issue 26: best-1-50 for best-0-25)."""
    every = 3 if when == "mid-epoch" else 4
    ref, run = tmp_path / "reference", tmp_path / "killed"
    common = dict(cache=cache_dir, **{"model.checkpoint_every_n_steps": every})
    rc, err = server.run(["fit", *run_args(tiny_model, glue_dir, ref, **common)])
    assert rc == 0, err[-3000:]

    if when == "mid-epoch":
        kill_at = random.Random().choice([s for s in range(4, 24) if s % 8])
        kill = {"trainer.callbacks+": f"{CALLBACKS}.KillAtStep", "trainer.callbacks.step": kill_at}
        # Killed before step kill_at's own checkpoint: the last one is from the step-interval or an epoch end.
        expected_step = max(s for s in range(1, kill_at) if s % every == 0 or s % 8 == 0)
    else:
        best_epoch = int(Path(json.loads((ref / "summary.json").read_text())["best_checkpoint"]).stem.split("-")[1])
        kill_at = 8 * best_epoch + 8
        kill = {"trainer.callbacks+": f"{CALLBACKS}.KillInValidation", "trainer.callbacks.epoch": best_epoch}
        expected_step = 8 * best_epoch + 4  # the epoch's last step is saved only once validated
    rc, err = server.run(["fit", *run_args(tiny_model, glue_dir, run, **common, **kill)])
    assert rc == -signal.SIGKILL, (kill_at, rc, err[-3000:])
    assert not (run / "summary.json").exists()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")  # weights_only=True works
    assert saved["global_step"] == expected_step, kill_at

    rc, err = server.run(["fit", *run_args(tiny_model, glue_dir, run, **common, ckpt_path="last")])
    assert rc == 0, err[-3000:]
    assert "not resumable" not in err
    assert_same_run(ref, run), f"killed at step {kill_at}"


# ----------------------------------------------------------------------------- 5. determinism and the two seeds
def test_same_config_and_seed_is_bit_identical_and_the_seeds_are_separate(
    server, tiny_model, glue_dir, cache_dir, tmp_path
):
    runs = {
        "a": {},
        "b": {},
        "train_seed": {"seed_everything": 1},
        "data_seed": {"data.seed": 1},
    }
    for name, options in runs.items():
        rc, err = server.run(
            ["fit", *run_args(tiny_model, glue_dir, tmp_path / name, cache_dir, **{"trainer.max_epochs": 2, **options})]
        )
        assert rc == 0, err[-3000:]
    assert_same_run(tmp_path / "a", tmp_path / "b")
    weights = {name: final_state(tmp_path / name)[0] for name in runs}
    for other in ("train_seed", "data_seed"):
        assert any(not torch.equal(weights["a"][k], weights[other][k]) for k in weights["a"]), other

    # The split is the data seed's alone: the training seed leaves it, the data seed changes it.
    from lightning_modules.run import build_cli

    def train_rows(**options: object) -> list[int]:
        args = run_args(tiny_model, glue_dir, tmp_path / "unused", cache_dir, **options)
        cli = build_cli(args, run=False)
        cli.datamodule.setup("fit")
        return list(cli.datamodule.datasets["train"]["input_ids"])

    base = train_rows()
    assert train_rows(seed_everything=7) == base
    assert train_rows(**{"data.seed": 7}) != base


# ----------------------------------------------------------------------------- 2. atomic, checked checkpoints
ATOMIC_WRITER = """
import os, signal, threading, torch
from lightning_modules import AtomicCheckpointIO
threading.Timer({delay}, os.kill, (os.getpid(), signal.SIGKILL)).start()
io, i = AtomicCheckpointIO(), 0
while True:
    i += 1
    io.save_checkpoint({{"unipelt": {{"i": i}}, "big": torch.full((16_000_000,), float(i))}}, {target!r})
"""


def test_sigkill_while_saving_leaves_a_whole_checkpoint(server, tmp_path):
    """A process saving checkpoints in a loop (64 MB each) is SIGKILLed at random moments."""
    from lightning_modules import AtomicCheckpointIO

    target = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"unipelt": {"i": 0}, "big": torch.zeros(16_000_000)}, target)
    rng, kills, mid_write = random.Random(), 0, 0
    while kills < 3 or (not mid_write and kills < 10):
        rc, err = server.run([], code=ATOMIC_WRITER.format(delay=rng.uniform(0.05, 0.6), target=str(target)))
        assert rc == -signal.SIGKILL, err[-2000:]
        kills += 1
        mid_write += any(target.parent.glob(".last.ckpt.*.tmp"))  # killed between open() and os.replace
        saved = torch.load(target)  # whole: the old or the new one, never half
        assert torch.equal(saved["big"], torch.full((16_000_000,), float(saved["unipelt"]["i"])))
    assert mid_write, f"no kill landed inside a save in {kills} tries"
    AtomicCheckpointIO().save_checkpoint({"unipelt": {}}, target)  # tidies temporary files of dead writers
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


@pytest.fixture(scope="module")
def finished_run(server, tiny_model, glue_dir, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    rc, err = server.run(["fit", *run_args(tiny_model, glue_dir, out, cache_dir, **{"trainer.max_epochs": 1})])
    assert rc == 0, err[-3000:]
    return out


def _bad_checkpoints(folder: Path, good: Path, tiny_model: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "text.ckpt").write_text("model: bert\n")
    corrupt = bytearray(data)
    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    corrupt[info.header_offset + 40 : info.header_offset + 80] = b"\xff" * 40
    (folder / "corrupt.ckpt").write_bytes(bytes(corrupt))
    torch.save({"state_dict": {}, "epoch": 3}, folder / "foreign.ckpt")
    return {
        "truncated": (folder / "truncated.ckpt", "not a PyTorch checkpoint"),
        "empty": (folder / "empty.ckpt", "empty"),
        "text": (folder / "text.ckpt", "not a PyTorch checkpoint"),
        "corrupt": (folder / "corrupt.ckpt", "checkpoint"),
        "foreign": (folder / "foreign.ckpt", "not a unipelt checkpoint"),
        "missing": (folder / "nope.ckpt", "no such file"),
    }


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_bad_or_mismatched_checkpoint_is_one_line_exit_2_and_writes_nothing(
    server, finished_run, tiny_model, glue_dir, cache_dir, tmp_path, subcommand
):
    good = finished_run / "checkpoints" / "last.ckpt"
    other_model = write_tiny_model(tmp_path / "other-bert", seed=1)
    cases = {name: (path, [], expect) for name, (path, expect) in _bad_checkpoints(tmp_path, good, tiny_model).items()}
    cases["method"] = (good, ["--model.method", "lora"], "method differs")
    cases["backbone"] = (good, ["--model.model_name_or_path", str(other_model)], "backbone differs")
    cases["task"] = (good, ["--data.task", "mrpc", "--data.data_dir", str(tmp_path / "mrpc")], "task differs")
    from tests.fixtures import WORDS

    (tmp_path / "mrpc" / "MRPC").mkdir(parents=True)
    for split in ("train", "dev"):
        rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        rows += [f"{i % 2}\t{i}\t{i}\t{WORDS[i % 30]} a\t{WORDS[i % 29]} b" for i in range(50)]
        (tmp_path / "mrpc" / "MRPC" / f"{split}.tsv").write_text("\n".join(rows) + "\n")

    for name, (path, extra, expect) in cases.items():
        out = tmp_path / f"out-{name}"
        before = tree(finished_run)
        args = run_args(tiny_model, glue_dir, out, cache_dir, ckpt_path=path)
        rc, err = server.run([subcommand, *args, *extra])
        line = only_line(err)
        assert rc == 2, (name, err[-2000:])
        assert expect in line and "--ckpt_path" in line, (name, line)
        assert not out.exists(), (name, sorted(p.name for p in out.rglob("*")))
        assert tree(finished_run) == before


# ----------------------------------------------------------------------------- 3. NaN stops the run
def test_nan_stops_with_step_and_learning_rate_and_keeps_the_last_good_checkpoint(
    server, tiny_model, glue_dir, cache_dir, tmp_path
):
    out = server.tmp / f"nan-{tmp_path.name}"  # under the directory the command runs in: shown relative to it
    poison = {"trainer.callbacks+": f"{CALLBACKS}.PoisonAtStep", "trainer.callbacks.step": 5}
    rc, err = server.run(
        ["fit", *run_args(tiny_model, glue_dir, out, cache_dir, **{"model.checkpoint_every_n_steps": 2}, **poison)]
    )
    line = one_line_error(err)
    assert rc == 1, err[-3000:]
    assert "global step 5" in line and "learning rate (0.01)" in line, line
    assert f" {out.name}/checkpoints/last.ckpt" in line and str(server.tmp) not in line, line
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (out / "summary.json").exists()
    # ... and the run goes on from it.
    rc, err = server.run(
        ["fit", *run_args(tiny_model, glue_dir, out, cache_dir, ckpt_path="last", **{"trainer.max_epochs": 1})]
    )
    assert rc == 0, err[-3000:]
    assert json.loads((out / "summary.json").read_text())["global_steps"] == 8


def test_huge_learning_rate_stops_cleanly(server, tiny_model, glue_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    rc, err = server.run(["fit", *run_args(tiny_model, glue_dir, out, cache_dir, **{"model.learning_rate": 1e30})])
    line = one_line_error(err)
    assert rc == 1 and "non-finite" in line and "learning rate (1e+30)" in line, line
    assert not (out / "summary.json").exists()


# ----------------------------------------------------------------------------- 4. bad input: one line, exit 2
def _bad_inputs(root: Path, model: Path, glue: Path) -> dict[str, tuple[dict, str]]:
    """name -> (options over run_args, what the one line must contain)."""
    from tests.fixtures import write_stsb

    def glue_with(name: str, edit) -> Path:
        folder = write_rte(root / name, n_train=60, n_dev=21)
        path = folder / "RTE" / "train.tsv"
        path.write_text(edit(path.read_text().splitlines()))
        return folder

    no_label = glue_with("no-label", lambda lines: "\n".join(line.rsplit("\t", 1)[0] for line in lines) + "\n")
    short_row = glue_with("short-row", lambda lines: "\n".join(lines[:7] + ["7\tonly two"] + lines[8:]) + "\n")
    bad_label = glue_with("bad-label", lambda lines: "\n".join(lines[:4] + [lines[4].rsplit("\t", 1)[0] + "\tmaybe"]
                                                             + lines[5:]) + "\n")
    only_stsb = write_stsb(root / "only-stsb")
    (root / "empty-model").mkdir()
    (root / "json-model").mkdir()
    (root / "json-model" / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    no_tokenizer = root / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((model / name).read_bytes())
    no_dev = write_rte(root / "no-dev")
    (no_dev / "RTE" / "dev.tsv").unlink()
    finished = root / "finished"
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    return {
        "task": ({"data.task": "rtee"}, "--data.task='rtee'"),
        "method": ({"model.method": "lorra"}, "--model.method 'lorra'"),
        "k0": ({"data.k_shot": 0}, "--data.k_shot=0"),
        "k-negative": ({"data.k_shot": -5}, "--data.k_shot=-5"),
        "k-beyond-pool": ({"data.k_shot": 50}, "k_shot=50"),
        "data-dir-missing": ({"data.data_dir": root / "no-such-dir"}, "--data.data_dir="),
        "data-dir-misspelled": ({"data.data_dir": only_stsb}, "has no RTE/ folder"),
        "tsv-missing-column": ({"data.data_dir": no_label}, "train.tsv:1: header lacks column(s) ['label']"),
        "tsv-malformed-row": ({"data.data_dir": short_row}, "train.tsv:8: expected 4 tab-separated columns"),
        "label-not-in-task": ({"data.data_dir": bad_label}, "train.tsv:5: label 'maybe'"),
        "model-missing": ({"model.model_name_or_path": root / "no-model"}, "--model.model_name_or_path"),
        "model-empty-dir": ({"model.model_name_or_path": root / "empty-model"}, "--model.model_name_or_path"),
        "model-bad-config": ({"model.model_name_or_path": root / "json-model"}, "--model.model_name_or_path"),
        "model-no-tokenizer": ({"model.model_name_or_path": no_tokenizer}, "no usable tokenizer"),
        "split-file-missing": ({"data.data_dir": no_dev}, "RTE/dev.tsv"),
        "batch-size": ({"data.batch_size": 0}, "--data.batch_size=0: must be an integer >= 1"),
        "max-seq-length": ({"data.max_seq_length": 512}, "--data.max_seq_length 512 is over the 128 positions"),
        "learning-rate": ({"model.learning_rate": -1}, "--model.learning_rate -1"),
        "finished-run": ({"trainer.default_root_dir": finished}, "already holds a finished run"),
    }


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(server, tiny_model, glue_dir, cache_dir, tmp_path):
    cases = _bad_inputs(tmp_path / "inputs", tiny_model, glue_dir)
    failures = []
    for name, (options, expect) in cases.items():
        out = tmp_path / f"out-{name}"
        cache = tmp_path / f"cache-{name}"
        before = tree(tmp_path / "inputs")
        rc, err = server.run(["fit", *run_args(tiny_model, glue_dir, out, cache, **options)])
        try:
            line = only_line(err)
            assert rc == 2, rc
            assert expect in line, line
            assert not out.exists(), sorted(str(p) for p in out.rglob("*"))
            assert tree(tmp_path / "inputs") == before
        except AssertionError as failure:
            failures.append(f"{name}: {failure}")
    assert not failures, "\n".join(failures)


def test_console_script_in_a_fresh_process(tiny_model, glue_dir, cache_dir, tmp_path):
    """The same answer from a plain `python cli.py` (no CLI server) as from the forked children."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out, bad = tmp_path / "run", {"data.k_shot": 0}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "fit", *run_args(tiny_model, glue_dir, out, cache_dir, **bad)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert only_line(proc.stderr) == "error: --data.k_shot=0: must be an integer >= 1"
    assert not out.exists()


# ----------------------------------------------------------------------------- the resumable loader alone
@pytest.mark.parametrize("by_index", [True, False])
def test_resumable_loader_hands_out_exactly_the_rest_of_the_epoch(by_index):
    from torch.utils.data import DistributedSampler

    from datamodules.resumable import ResumableDataLoader
    from datamodules.samplers import EpochSeededRandomSampler

    data = list(range(23))
    sampler = (
        EpochSeededRandomSampler(data, seed=4)
        if by_index
        else DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=4)  # no `start`: drops batches
    )
    loader = ResumableDataLoader(data, batch_size=4, sampler=sampler)
    sampler.set_epoch(2)
    full = [b.tolist() for b in loader]
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 3} and seen == full[:3]

    again = ResumableDataLoader(data, batch_size=4, sampler=sampler)
    sampler.set_epoch(0)
    again.load_state_dict(state)
    assert sampler.epoch == 2
    assert [b.tolist() for b in again] == full[3:]
    assert again.state_dict() == {"epoch": 2, "batches": len(full)}
    assert [b.tolist() for b in again] == full  # the next pass over the epoch is whole again

    other_epoch = ResumableDataLoader(data, batch_size=4, sampler=sampler)
    other_epoch.load_state_dict(state)
    it = iter(other_epoch)
    sampler.set_epoch(3)  # Lightning sets the epoch after iter(): a state of epoch 2 does not apply to 3
    assert len(list(it)) == len(full)
