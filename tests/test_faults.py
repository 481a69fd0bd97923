"""What an attacker or a careless user does to a run, through the real CLI and API (issue 26): files that try to
choose where we write, outputs that would destroy inputs, two runs in one folder, damaged and tampered files,
destinations that cannot be written, odd labels, the umask, and the one line a refusal prints.

CLI cases run `cli.main()` in forked children of one server process (tests/test_reliability.py's `CliServer`):
real processes with real exit codes and stderr. `BAD_INPUTS` counts the bad inputs and faults tried here.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.cli_server import CliServer
from tests.test_reliability import ROOT, only_line, run_args, tree

CALLBACKS = "tests.test_faults"
BAD_INPUTS: list[str] = []  # every bad input or fault a test below tries (the count is reported)


def tried(*names: str) -> None:
    BAD_INPUTS.extend(names)


# ----------------------------------------------------------------------------- callbacks injected via the CLI
class FailIfReached(pl.Callback):
    """The work must not start: a destination or input check belongs before it."""

    def on_train_start(self, trainer, pl_module) -> None:
        raise AssertionError("training started before the refusal")

    def on_predict_start(self, trainer, pl_module) -> None:
        raise AssertionError("predicting started before the refusal")


class WaitForFile(pl.Callback):
    """Hold the run at the start of training until `path` exists (at most two minutes); `path`.waiting says
    that it waits (what the run writes before training, its log folder, is then written)."""

    def __init__(self, path: str = "") -> None:
        self.path = Path(path)

    def on_train_start(self, trainer, pl_module) -> None:
        self.path.with_suffix(".waiting").touch()
        deadline = time.monotonic() + 120
        while not self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)


# ----------------------------------------------------------------------------- fixtures
def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


WORDS = "the cat dog sees a big small house runs happy sad tree".split()


def sentences(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5)) for i in range(n)]


@pytest.fixture(scope="module")
def own_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own")
    texts = sentences(60)
    return {
        "train": write_csv(root / "reviews.csv", ["text", "label"], [[t, "pos" if i % 2 else "neg"]
                                                                     for i, t in enumerate(texts)]),
        "predict": write_csv(root / "new.csv", ["text", "id"], [[t, i] for i, t in enumerate(texts[:7])]),
    }


def own_args(model: Path, files: dict[str, Path], out: Path, cache: Path, **options: object) -> list[str]:
    settings = {"model.model_name_or_path": model, "data.train_file": files["train"], "data.cache_dir": cache,
                "data.k_shot": 16, "data.dev_size": 8, "data.batch_size": 4, "trainer.max_epochs": 1,
                "trainer.accelerator": "cpu", "trainer.enable_progress_bar": "false",
                "trainer.default_root_dir": out, "model.learning_rate": 0.01, **options}
    return [arg for key, value in settings.items() if value is not None for arg in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def own_run(server, tiny_model, own_files, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("own-run") / "run"
    rc, err = server.run(["fit", *own_args(tiny_model, own_files, out, cache_dir)])
    assert rc == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def glue_run(server, tiny_model, glue_dir, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("glue-run") / "run"
    rc, err = server.run(["fit", *run_args(tiny_model, glue_dir, out, cache_dir, **{"trainer.max_epochs": 1})])
    assert rc == 0, err[-3000:]
    return out


def refused(server: CliServer, args: list[str], expect: str | list[str], **kwargs) -> str:
    rc, err = server.run(args, **kwargs)
    line = only_line(err)
    assert rc == 2, (rc, err[-2000:])
    for text in [expect] if isinstance(expect, str) else expect:
        assert text in line, (text, line)
    return line


def tampered(checkpoint: Path, out: Path, edit) -> Path:
    data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    edit(data)
    torch.save(data, out)
    return out


def predict_args(ckpt: Path, *extra: str) -> list[str]:
    return ["predict", "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false", *extra]


# ============================================================================= 1. files never choose where we write
def test_a_checkpoint_never_chooses_where_we_write(server, own_run, own_files, tmp_path):
    """A checkpoint whose task is named `../../../../outside` and whose data cache is elsewhere: `test` from a
    deep folder neither creates a run folder outside it nor writes a cache where the checkpoint says."""
    evil_cache = tmp_path / "evil-cache"

    def rename(ckpt: dict) -> None:
        ckpt["hyper_parameters"]["task"]["name"] = "../../../../outside"
        ckpt["datamodule_hyper_parameters"]["name"] = "../../../../outside"
        ckpt["unipelt"]["task"] = "../../../../outside"
        ckpt["datamodule_hyper_parameters"]["cache_dir"] = str(evil_cache)

    def cache_only(ckpt: dict) -> None:
        ckpt["datamodule_hyper_parameters"]["cache_dir"] = str(evil_cache)

    last = own_run / "checkpoints" / "last.ckpt"
    deep = tmp_path / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    env = {"UNIPELT_CACHE": str(tmp_path / "own-cache")}
    saved_cwd, server.tmp = server.tmp, deep
    try:
        args = ["test", "--data.test_file", str(own_files["train"]), "--trainer.enable_progress_bar", "false"]
        tried("checkpoint task name ../../../../outside")
        refused(server, [*args, "--ckpt_path", str(tampered(last, tmp_path / "renamed.ckpt", rename))],
                ["'../../../../outside'", "cannot name a run folder"], env=env)
        tried("checkpoint data.cache_dir elsewhere")
        rc, err = server.run([*args, "--ckpt_path", str(tampered(last, tmp_path / "cache.ckpt", cache_only))],
                             env=env)
        assert rc == 0, err[-3000:]
    finally:
        server.tmp = saved_cwd
    assert not evil_cache.exists()
    assert (tmp_path / "own-cache").is_dir()  # the cache went where this process says
    created = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_dir())
    assert all(p.startswith(("a/b/c/d", "own-cache")) or p in ("a", "a/b", "a/b/c") for p in created), created


def test_run_folders_are_built_from_plain_names_only():
    from types import SimpleNamespace

    from lightning_modules.errors import UsageError
    from lightning_modules.kinds import CLASSIFICATION
    from lightning_modules.run import default_run_dir

    def config(name: str) -> SimpleNamespace:
        data = SimpleNamespace(task=None, name=name, train_file=None, k_shot=8, seed=1)
        return SimpleNamespace(data=data, model=SimpleNamespace(method="lora"), seed_everything=2)

    assert default_run_dir(config("my reviews"), CLASSIFICATION) == Path("runs/my reviews_k8/lora/split1_seed2")
    bad = ["../../../../outside", "..", ".hidden", "a/b", "a\\b", "/etc", "tab\there", "x" * 101]
    tried(*(f"run folder part {b!r}" for b in bad))
    for name in bad:
        with pytest.raises(UsageError, match="cannot name a run folder"):
            default_run_dir(config(name), CLASSIFICATION)


def test_no_option_naming_a_destination_is_taken_from_a_checkpoint():
    """Every option of either kind of run that names where we write is declared (RunKind.writes), and
    `checkpoint_defaults` takes none of them from a checkpoint."""
    from lightning_modules.kinds import CLASSIFICATION, INSTRUCTION, MULTITASK
    from lightning_modules.run import checkpoint_defaults

    reads = {"--data.data_dir"}  # folders the run reads (checked as inputs, never written)
    for kind in (CLASSIFICATION, INSTRUCTION, MULTITASK):
        looks_like_a_destination = {o for o in kind.options if o.endswith(("_dir", "_output")) and o not in reads}
        assert looks_like_a_destination == {f"--{w}" for w in kind.writes}, kind.name
        stored = {"hyper_parameters": {w.split(".", 1)[1]: "/elsewhere" for w in kind.writes if w.startswith("model")},
                  "datamodule_hyper_parameters": {w.split(".", 1)[1]: "/elsewhere" for w in kind.writes
                                                  if w.startswith("data")}}
        for subcommand in ("validate", "test", "predict"):
            assert not set(checkpoint_defaults(subcommand, stored, kind)) & kind.writes
    tried("checkpoint predict_output elsewhere (decoder)")


# ============================================================================= 2. an input is never an output
def test_predict_never_overwrites_an_input_nor_replaces_its_columns(server, own_run, own_files, tiny_model, tmp_path):
    last = own_run / "checkpoints" / "last.ckpt"
    rows = shutil.copy(own_files["predict"], tmp_path / "rows.csv")
    clashing = write_csv(tmp_path / "scored.csv", ["text", "prediction", "prob_pos"],
                         [[t, "mine", "0.5"] for t in sentences(5)])
    before = {p: p.read_bytes() for p in (rows, clashing, *tiny_model.iterdir())}
    cases = {
        "predictions is the input": (["--data.predict_file", str(rows), "--predictions", str(rows)],
                                     "the input --data.predict_file"),
        "predictions inside the backbone's folder": (
            ["--data.predict_file", str(rows), "--predictions", str(tiny_model / "config.json")],
            "inside the input folder --model.model_name_or_path"),
        "input already has the output columns": (
            ["--data.predict_file", str(clashing), "--predictions", str(tmp_path / "out.csv")],
            "already has the column(s) ['prediction', 'prob_pos']"),
    }
    tried(*cases)
    for extra, expect in cases.values():
        refused(server, predict_args(last, *extra, "--trainer.callbacks+", f"{CALLBACKS}.FailIfReached"), expect)
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "out.csv").exists()
    # An output that is no input is replaced (docs/data.md says so).
    out = tmp_path / "preds.csv"
    out.write_text("old\n")
    rc, err = server.run(predict_args(last, "--data.predict_file", str(rows), "--predictions", str(out)))
    assert rc == 0, err[-3000:]
    assert out.read_text().splitlines()[0] == "text,id,prediction,prob_neg,prob_pos"


def test_generations_never_replace_a_column_of_the_input(tmp_path):
    from lightning_modules.errors import UsageError
    from lightning_modules.predictions import write_generations

    tried("decoder input row with a 'generation' column")
    with pytest.raises(UsageError, match=r"already has the column\(s\) \['generation'\]"):
        write_generations([{"prompt": "a", "generation": "mine"}], [[(0, "new")]], tmp_path / "g.jsonl")
    assert not (tmp_path / "g.jsonl").exists()


# ============================================================================= 3. one run per folder
def test_a_second_fit_into_a_folder_being_written_is_refused(server, tiny_model, glue_dir, cache_dir, tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    args = run_args(tiny_model, glue_dir, out, cache_dir, **{"trainer.max_epochs": 1})
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "fit", *args, "--trainer.callbacks+", f"{CALLBACKS}.WaitForFile",
         "--trainer.callbacks.path", str(go)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not go.with_suffix(".waiting").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / ".unipelt.lock").exists(), first.stderr.read() if first.poll() is not None else "no lock"
        tried("second fit into a folder being written")
        before = tree(out)
        line = refused(server, ["fit", *run_args(tiny_model, glue_dir, out, cache_dir, seed_everything=1)],
                       [str(out), f"process {first.pid}"])
        assert "is being written by" in line
        assert tree(out) == before  # the second run wrote nothing
    finally:
        go.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert json.loads((out / "summary.json").read_text())["seed"] == 0 and (out / "export").is_dir()
    assert not (out / ".unipelt.lock").exists()


def test_the_lock_of_a_dead_process_is_taken_over(server, tiny_model, glue_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".unipelt.lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    tried("stale lock of a dead process")
    rc, err = server.run(["fit", *run_args(tiny_model, glue_dir, out, cache_dir, **{"trainer.max_epochs": 1})])
    assert rc == 0, err[-3000:]
    assert (out / "summary.json").exists() and not (out / ".unipelt.lock").exists()


def test_resuming_takes_only_this_runs_checkpoint(server, glue_run, tiny_model, glue_dir, cache_dir, tmp_path):
    """A run folder whose fit was killed (no summary yet): resuming it with another seed, split, data or method
    is refused in one line naming what differs; with the run's own settings it goes on."""
    run = tmp_path / "run"
    shutil.copytree(glue_run, run)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "export")
    before = tree(run)
    last = str(run / "checkpoints" / "last.ckpt")
    cases = {
        "training seed": ({"seed_everything": 1}, "--seed_everything 0 there, 1 here"),
        "split seed": ({"data.seed": 3}, "--data.seed 0 there, 3 here"),
        "data (K)": ({"data.k_shot": 24}, "--data.k_shot 32 there, 24 here"),
        "batch size": ({"data.batch_size": 8}, "--data.batch_size 4 there, 8 here"),
        "learning rate": ({"model.learning_rate": 0.02}, "--model.learning_rate 0.01 there, 0.02 here"),
        "method": ({"model.method": "lora"}, "method differs"),
    }
    tried(*(f"resume with another {name}" for name in cases))
    for options, expect in cases.values():
        for ckpt in ("last", last):
            settings = {"ckpt_path": ckpt, "trainer.max_epochs": 2, **options}
            refused(server, ["fit", *run_args(tiny_model, glue_dir, run, cache_dir, **settings)], expect)
    assert tree(run) == before
    rc, err = server.run(["fit", *run_args(tiny_model, glue_dir, run, cache_dir, ckpt_path="last",
                                           **{"trainer.max_epochs": 2, "data.num_workers": 0})])
    assert rc == 0, err[-3000:]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


# ============================================================================= 4. damaged checkpoints and exports
def flip_byte_in_largest_record(src: Path, dst: Path) -> str:
    """A byte of the largest tensor record changed (as a disk or a copy would), its CRC left as it was."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01  # the lowest bit of one byte: a finite number stays finite
    dst.write_bytes(bytes(data))
    return info.filename


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_what_is_wrong(server, own_run, own_files, tmp_path):
    last = own_run / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    weight = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)

    def nan_weight(ckpt: dict) -> None:
        ckpt["state_dict"][weight] = torch.full_like(ckpt["state_dict"][weight], float("nan"))

    def inf_moment(ckpt: dict) -> None:
        moments = ckpt["optimizer_states"][0]["state"][0]
        moments["exp_avg"] = torch.full_like(moments["exp_avg"], float("inf"))

    def reshaped(ckpt: dict) -> None:
        ckpt["state_dict"][weight] = torch.zeros(3, 5)

    flipped = tmp_path / "flipped.ckpt"
    record = flip_byte_in_largest_record(last, flipped)
    cases = {
        "a byte flipped in a tensor record": (flipped, [f"record {record!r} fails its check", "CRC"]),
        "NaN weights": (tampered(last, tmp_path / "nan.ckpt", nan_weight), [f"state_dict.{weight}", "NaN"]),
        "inf optimizer moment": (tampered(last, tmp_path / "inf.ckpt", inf_moment), ["exp_avg", "NaN or infinite"]),
        "wrong-shape tensor": (tampered(last, tmp_path / "shape.ckpt", reshaped), [weight, "shape (3, 5)"]),
    }
    tried(*cases)
    for ckpt, expect in cases.values():
        for subcommand in ("predict", "test"):
            extra = (["--data.predict_file", str(own_files["predict"]), "--predictions", str(tmp_path / "p.csv")]
                     if subcommand == "predict" else ["--data.test_file", str(own_files["train"])])
            args = [subcommand, "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false", *extra,
                    "--trainer.default_root_dir", str(tmp_path / "out")]
            refused(server, args, [str(ckpt), *expect])
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "out").exists()


@pytest.fixture
def export(make_tiny, tmp_path) -> Path:
    import unipelt

    model = unipelt.apply_pelt(make_tiny("bert"), unipelt.PELTConfig.preset("unipelt_apl"))
    return unipelt.save_pretrained(model, tmp_path / "export", base_model_name_or_path="tiny")


def rewrite_weights(folder: Path, edit, keep_digest: bool = False) -> None:
    """Edit an export's tensors and (unless ``keep_digest``) record the new file's SHA-256, as a careful
    tamperer would, so that the tensor check itself is what must catch it."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from unipelt.io import CONFIG_NAME, WEIGHTS_NAME

    weights = load_file(folder / WEIGHTS_NAME)
    edit(weights)
    save_file(weights, folder / WEIGHTS_NAME)
    if not keep_digest:
        record = json.loads((folder / CONFIG_NAME).read_text())
        record["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
        (folder / CONFIG_NAME).write_text(json.dumps(record))


def test_a_damaged_export_is_refused_naming_the_file_and_the_tensor(export, make_tiny):
    from safetensors.torch import load_file

    import unipelt
    from unipelt import PELTError
    from unipelt.io import WEIGHTS_NAME

    name = next(k for k in sorted(load_file(export / WEIGHTS_NAME)) if "lora_A" in k)
    pristine = (export / WEIGHTS_NAME).read_bytes()
    cases = {
        "NaN tensor": (lambda w: w[name].fill_(float("nan")), f"tensor {name} holds NaN"),
        "wrong-shape tensor": (lambda w: w.__setitem__(name, torch.zeros(3, 5)), f"tensor {name} has shape (3, 5)"),
    }
    tried(*(f"export: {c}" for c in cases), "export: a byte flipped")
    for edit, expect in cases.values():
        (export / WEIGHTS_NAME).write_bytes(pristine)
        rewrite_weights(export, edit)
        with pytest.raises(PELTError) as caught:
            unipelt.from_pretrained(export, model=make_tiny("bert"))
        assert expect in str(caught.value) and str(export / WEIGHTS_NAME) in str(caught.value)
    (export / WEIGHTS_NAME).write_bytes(pristine)
    rewrite_weights(export, lambda w: w[name].mul_(1.0001), keep_digest=True)  # finite, right shape: only bytes
    with pytest.raises(PELTError, match="SHA-256"):
        unipelt.from_pretrained(export, model=make_tiny("bert"))


def test_a_config_too_large_for_the_backbone_is_refused_before_anything_is_allocated(make_tiny, export):
    import resource

    import unipelt
    from unipelt import PELTError
    from unipelt.io import CONFIG_NAME

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    tried("lora_r 1000000 on a tiny backbone (1.5 GB)", "export record lora.r 1000000000")
    with pytest.raises(PELTError, match=r"would add [\d,]+ parameters to a backbone of [\d,]+.*lora_r=1000000"):
        unipelt.apply_pelt(make_tiny("bert"), unipelt.PELTConfig.preset("lora", lora_r=1_000_000))
    record = json.loads((export / CONFIG_NAME).read_text())
    record["pelt_config"]["lora"]["r"] = 1_000_000_000
    (export / CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(PELTError, match="lora_r=1000000000"):
        unipelt.from_pretrained(export, model=make_tiny("bert"))
    assert time.monotonic() - start < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 300_000  # KiB: nothing near 1.5 GB


def test_a_config_too_large_is_one_line_from_the_cli(server, tiny_model, glue_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    tried("--model.pelt_overrides lora_r 1000000000")
    options = {"model.method": "lora", "model.pelt_overrides": "{lora_r: 1000000000}"}
    refused(server, ["fit", *run_args(tiny_model, glue_dir, out, cache_dir, **options)], "lora_r=1000000000")
    assert not out.exists()


# ============================================================================= 5. destinations, disk full
def test_every_bad_destination_is_refused_before_any_work(server, own_run, own_files, tiny_model, glue_dir,
                                                          cache_dir, tmp_path):
    last = own_run / "checkpoints" / "last.ckpt"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    folder_named_csv = tmp_path / "named.csv"
    folder_named_csv.mkdir()
    root_with_file_export = tmp_path / "export-is-a-file"
    root_with_file_export.mkdir()
    (root_with_file_export / "export").write_text("x")
    root_with_dir_summary = tmp_path / "summary-is-a-folder"
    (root_with_dir_summary / "summary.json").mkdir(parents=True)
    fail = ["--trainer.callbacks+", f"{CALLBACKS}.FailIfReached"]
    rows = ["--data.predict_file", str(own_files["predict"])]
    cases = {
        "--predictions an existing folder": (
            predict_args(last, *rows, "--predictions", str(folder_named_csv), *fail), "is a folder"),
        "--predictions under a file": (
            predict_args(last, *rows, "--predictions", str(a_file / "p.csv"), *fail), "is a file, so nothing"),
        "predict: --trainer.default_root_dir a file": (
            predict_args(last, *rows, "--trainer.default_root_dir", str(a_file), *fail), "is a file, not a folder"),
        "fit: --trainer.default_root_dir a file": (
            ["fit", *run_args(tiny_model, glue_dir, a_file, cache_dir), *fail], "is a file, not a folder"),
        "fit: --trainer.default_root_dir under a file": (
            ["fit", *run_args(tiny_model, glue_dir, a_file / "run", cache_dir), *fail], "is a file, so nothing"),
        "fit: export/ is a file": (
            ["fit", *run_args(tiny_model, glue_dir, root_with_file_export, cache_dir), *fail], "export"),
        "fit: summary.json is a folder": (
            ["fit", *run_args(tiny_model, glue_dir, root_with_dir_summary, cache_dir), *fail], "is a folder"),
        "fit: --data.cache_dir a file": (
            ["fit", *run_args(tiny_model, glue_dir, tmp_path / "run", a_file), *fail], "--data.cache_dir"),
    }
    tried(*cases)
    before = tree(tmp_path)
    for args, expect in cases.values():
        refused(server, args, expect)
    assert tree(tmp_path) == before


@pytest.fixture
def small_filesystem(tmp_path):
    """A folder on its own small tmpfs (root only: mount needs it); skipped where it cannot be mounted."""
    mounted: list[Path] = []

    def mount(size: str, read_only: bool = False) -> Path:
        folder = tmp_path / f"fs{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                               capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_read_only_destination_is_refused_before_any_work(server, own_run, own_files, small_filesystem):
    read_only = small_filesystem("1m", read_only=True)
    tried("--predictions on a read-only filesystem")
    refused(server, predict_args(own_run / "checkpoints" / "last.ckpt", "--data.predict_file",
                                 str(own_files["predict"]), "--predictions", str(read_only / "p.csv"),
                                 "--trainer.callbacks+", f"{CALLBACKS}.FailIfReached"),
            [str(read_only), "is not writable"])


class DiskFull:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, real, room: int) -> None:
        self.real, self.room = real, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.real.close()


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_what_was_there(tmp_path, monkeypatch, make_tiny):
    import unipelt
    from lightning_modules.checkpointing import AtomicCheckpointIO
    from unipelt.atomic import write_json
    from unipelt.errors import OutputError

    summary, ckpt = tmp_path / "summary.json", tmp_path / "last.ckpt"
    write_json(summary, {"old": True})
    AtomicCheckpointIO().save_checkpoint({"unipelt": {"i": 0}, "w": torch.zeros(4)}, ckpt)
    model = unipelt.apply_pelt(make_tiny("bert"), unipelt.PELTConfig.preset("lora"))
    folder = unipelt.save_pretrained(model, tmp_path / "export", base_model_name_or_path="tiny")
    before = tree(tmp_path)
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: DiskFull(real_fdopen(fd, *a, **k), room=64))
    writes = {
        "summary.json": (summary, lambda: write_json(summary, {"new": "x" * 1000})),
        "a checkpoint (torch.save)": (ckpt, lambda: AtomicCheckpointIO().save_checkpoint(
            {"unipelt": {"i": 1}, "w": torch.ones(10_000)}, ckpt)),
        "an export": (folder, lambda: unipelt.save_pretrained(model, folder, base_model_name_or_path="tiny")),
    }
    tried(*(f"disk full writing {w}" for w in writes))
    for name, (target, write) in writes.items():
        with pytest.raises(OutputError) as caught:
            write()
        message = str(caught.value)
        assert "\n" not in message and "No space left on device" in message and "unchanged" in message, name
        assert str(target.name) in message, (name, message)
    monkeypatch.undo()
    assert tree(tmp_path) == before  # what was there is intact, no temporary file left
    assert json.loads(summary.read_text()) == {"old": True}
    assert torch.load(ckpt)["unipelt"] == {"i": 0}


def test_a_full_disk_during_fit_and_predict(server, own_run, own_files, tiny_model, glue_dir, cache_dir,
                                            small_filesystem):
    """On a real small filesystem: `fit` runs out of room while saving a checkpoint, `predict` while writing
    its file; each ends with one `error:` line naming the file and exit 2, the older files intact."""
    room = small_filesystem("1600k")
    tried("disk full during fit", "disk full during predict")
    rc, err = server.run(["fit", *run_args(tiny_model, glue_dir, room / "run", cache_dir)])
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and "No space left on device" in last and "Traceback" not in err, err
    assert ".ckpt" in last or "run" in last, last
    for kept in (room / "run" / "checkpoints").glob("*.ckpt"):
        torch.load(kept, weights_only=True)  # whole
    shutil.rmtree(room / "run")
    old = room / "preds.csv"
    old.write_text("old\n")
    fd = os.open(room / "filler", os.O_WRONLY | os.O_CREAT)  # no room left for the predictions
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as full:
        assert full.errno == errno.ENOSPC
    finally:
        os.close(fd)
    refused_rc, err = server.run(predict_args(own_run / "checkpoints" / "last.ckpt", "--data.predict_file",
                                              str(own_files["predict"]), "--predictions", str(old)))
    assert refused_rc == 2 and err.strip().splitlines()[-1].startswith(f"error: {str(old)!r} could not be written")
    assert old.read_text() == "old\n"


# ============================================================================= 6. malformed records: one PELTError
def test_every_malformed_export_record_is_one_pelt_error_line(export, tmp_path):
    import unipelt
    from unipelt import PELTError
    from unipelt.io import CONFIG_NAME

    pristine = json.loads((export / CONFIG_NAME).read_text())
    pickled_backbone = tmp_path / "pickled-backbone"
    pickled_backbone.mkdir()
    (pickled_backbone / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32,
                                                              "num_hidden_layers": 2, "num_attention_heads": 4,
                                                              "intermediate_size": 37, "vocab_size": 99}))
    pwned = tmp_path / "pwned"
    from tests.test_safety import write_malicious_checkpoint

    write_malicious_checkpoint(pickled_backbone / "pytorch_model.bin", pwned)

    def at(path: str, value, record: dict) -> dict:
        *parents, last = path.split(".")
        node = record
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
        return record

    DELETE = object()
    edits = {
        "format_version a string": ("format_version", "1"),
        "format_version null": ("format_version", None),
        "no backbone": ("backbone", DELETE),
        "backbone a list": ("backbone", ["tiny"]),
        "no method": ("method", DELETE),
        "method a number": ("method", 7),
        "pelt_config a string": ("pelt_config", "lora"),
        "pelt_config.lora a number": ("pelt_config.lora", 5),
        "pelt_config.lora.r a string": ("pelt_config.lora.r", "8"),
        "pelt_config.lora.targets a number": ("pelt_config.lora.targets", 5),
        "pelt_config.adapter.bottleneck negative": ("pelt_config.adapter.bottleneck", -4),
        "pelt_config unknown submodule": ("pelt_config.magic", {}),
        "id2label a list": ("backbone.id2label", ["a", "b", "c"]),
        "id2label keys not numbers": ("backbone.id2label", {"a": "x", "b": "y", "c": "z"}),
        "id2label fewer than num_labels": ("backbone.id2label", {"0": "x"}),
        "num_labels a string": ("backbone.num_labels", "3"),
        "num_labels zero": ("backbone.num_labels", 0),
        "hidden_size a string": ("backbone.hidden_size", "big"),
        "problem_type unknown": ("backbone.problem_type", "poetry"),
        "no model_name_or_path": ("backbone.model_name_or_path", DELETE),
        "backbone pkg:os/..": ("backbone.model_name_or_path", "pkg:os/.."),
        "backbone pkg:json/../..": ("backbone.model_name_or_path", "pkg:json/../.."),
        "backbone a pickled pytorch_model.bin": ("backbone.model_name_or_path", str(pickled_backbone)),
        "card a list": ("card", []),
        "weights_sha256 a number": ("weights_sha256", 12),
    }
    tried(*(f"export record: {name}" for name in edits), "export record: not an object", "export record: bad JSON")
    failures = []
    for name, (path, value) in edits.items():
        (export / CONFIG_NAME).write_text(json.dumps(at(path, value, json.loads(json.dumps(pristine)))))
        try:
            unipelt.from_pretrained(export)
            failures.append(f"{name}: loaded")
        except PELTError as err:
            if "\n" in str(err) or not str(err):
                failures.append(f"{name}: {err!r}")
        except Exception as err:  # noqa: BLE001 - the point: nothing but PELTError
            failures.append(f"{name}: {type(err).__name__}: {err}")
    for text in ("[1, 2]", "{not json"):
        (export / CONFIG_NAME).write_text(text)
        with pytest.raises(PELTError):
            unipelt.from_pretrained(export)
    assert not failures, "\n".join(failures)
    assert not pwned.exists()


def test_a_malformed_checkpoint_record_is_one_line(server, own_run, own_files, tmp_path):
    last = own_run / "checkpoints" / "last.ckpt"

    def edit(key: str, value):
        def apply(ckpt: dict) -> None:
            node = ckpt
            *parents, final = key.split(".")
            for part in parents:
                node = node[part]
            node[final] = value
        return apply

    edits = {
        "unipelt.method a list": ("unipelt.method", ["lora"]),
        "unipelt.backbone a string": ("unipelt.backbone", "bert"),
        "unipelt.backbone.id2label a list": ("unipelt.backbone.id2label", ["neg", "pos"]),
        "unipelt.pelt_config a number": ("unipelt.pelt_config", 3),
        "hyper_parameters a list": ("hyper_parameters", [1, 2]),
        "state_dict a string": ("state_dict", "weights"),
    }
    tried(*(f"checkpoint record: {name}" for name in edits))
    for name, (key, value) in edits.items():
        ckpt = tampered(last, tmp_path / f"{len(name)}-{key}.ckpt", edit(key, value))
        refused(server, predict_args(ckpt, "--data.predict_file", str(own_files["predict"]),
                                     "--predictions", str(tmp_path / "p.csv")), str(ckpt))


# ============================================================================= 4 and 6: slimmed exports, new tuners
@pytest.fixture
def slim_export(make_tiny, tmp_path) -> tuple[Path, torch.Tensor]:
    """An export of a slimmed UniPELT (all) (about half of its gated parts removed) and its logits on `BATCH`."""
    import unipelt

    model = unipelt.apply_pelt(make_tiny("bert"), unipelt.PELTConfig.preset("unipelt_all"))
    gates = unipelt.calibrate_gates(model, [BATCH])
    slim = unipelt.slim(model, [BATCH], min_gate=sorted(gates.values())[len(gates) // 2])
    assert 0 < len(slim.pelt_config.slim) < len(gates)
    with torch.no_grad():
        logits = slim(**BATCH).logits
    return unipelt.save_pretrained(slim, tmp_path / "slim", base_model_name_or_path="tiny"), logits


BATCH = {"input_ids": torch.arange(5, 26).reshape(3, 7), "attention_mask": torch.ones(3, 7, dtype=torch.long)}


def test_a_tampered_slimmed_export_is_one_line_naming_the_file(slim_export, make_tiny):
    """`from_pretrained` of a slimmed export goes through every check: the record (its `slim` gates, the new
    tuners' fields: finite, positive, sizes against the backbone) and the tensors; each refusal is one PELTError
    line naming the file. The untouched export loads to the slimmed model's logits."""
    import unipelt
    from unipelt import PELTError
    from unipelt.io import CONFIG_NAME, WEIGHTS_NAME

    folder, logits = slim_export
    loaded = unipelt.from_pretrained(folder, model=make_tiny("bert"))
    with torch.no_grad():
        assert torch.equal(loaded(**BATCH).logits, logits)
    pristine, weights = (folder / CONFIG_NAME).read_text(), (folder / WEIGHTS_NAME).read_bytes()
    kept = next(iter(json.loads(pristine)["pelt_config"]["slim"]))

    def config(**fields):
        def edit(record: dict) -> None:
            for path, value in fields.items():
                *parents, last = path.split("__")
                node = record["pelt_config"]
                for key in parents:
                    node = node[key]
                node[last] = value
        return edit

    edits = {
        "slim a list": config(slim=[kept]),
        "slim gate 2": config(**{f"slim__{kept}": 2}),
        "slim gate NaN": config(**{f"slim__{kept}": float("nan")}),
        "slim gate a string": config(**{f"slim__{kept}": "0.5"}),
        "slim names a gate the model lacks": config(**{"slim__layer9.adapter": 0.5}),
        "parallel_adapter.bottleneck a string": config(parallel_adapter__bottleneck="8"),
        "parallel_adapter.bottleneck 10**9": config(parallel_adapter__bottleneck=10**9),
        "parallel_adapter.scale Infinity": config(parallel_adapter__scale=float("inf")),
        "parallel_adapter.activation unknown": config(parallel_adapter__activation="evil"),
        "ia3 an unknown field": config(ia3__scale=2.0),
        "ia3 a list": config(ia3=["key"]),
        "lora.alpha NaN": config(lora__alpha=float("nan")),
        "lora.dora a string": config(lora__dora="yes"),
        "init_std NaN": config(init_std=float("nan")),
    }
    tried(*(f"slimmed export record: {name}" for name in edits), "slimmed export: a NaN tensor")
    failures = []
    for name, edit in edits.items():
        record = json.loads(pristine)
        edit(record)
        (folder / CONFIG_NAME).write_text(json.dumps(record))  # NaN and Infinity: what Python's json reads back
        try:
            unipelt.from_pretrained(folder, model=make_tiny("bert"))
            failures.append(f"{name}: loaded")
        except PELTError as err:
            if "\n" in str(err) or not str(err).startswith(repr(str(folder / CONFIG_NAME))):
                failures.append(f"{name}: {err}")
        except Exception as err:  # noqa: BLE001 - the point: nothing but PELTError
            failures.append(f"{name}: {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)
    (folder / CONFIG_NAME).write_text(pristine)
    (folder / WEIGHTS_NAME).write_bytes(weights)
    rewrite_weights(folder, lambda w: next(t for t in w.values() if t.is_floating_point()).fill_(float("nan")))
    with pytest.raises(PELTError, match="holds NaN") as caught:
        unipelt.from_pretrained(folder, model=make_tiny("bert"))
    assert str(caught.value).startswith(repr(str(folder / WEIGHTS_NAME)))


def test_slim_checks_its_inputs_and_destination_before_any_work(server, own_run, tiny_model, tmp_path):
    """`cli.py slim`: a destination that cannot be written or that is an input, and a damaged checkpoint, are one
    `error:` line alone on stderr and exit 2, with nothing written; a good one writes the export, quietly."""
    last = own_run / "checkpoints" / "last.ckpt"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    card_is_a_folder = tmp_path / "card-folder"
    (card_is_a_folder / "README.md").mkdir(parents=True)
    flipped = tmp_path / "flipped.ckpt"
    flip_byte_in_largest_record(last, flipped)

    def nan_weight(ckpt: dict) -> None:
        name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
        ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))

    cases = {
        "slim --out a file": ([last, a_file], "is a file, not a folder"),
        "slim --out under a file": ([last, a_file / "slim"], "is a file, so nothing"),
        "slim --out the backbone's folder": ([last, tiny_model], "the input --model.model_name_or_path"),
        "slim --out whose README.md is a folder": ([last, card_is_a_folder], "is a folder"),
        "slim of a checkpoint with a flipped byte": ([flipped, tmp_path / "s1"], "CRC"),
        "slim of a checkpoint with NaN weights": ([tampered(last, tmp_path / "nan.ckpt", nan_weight),
                                                  tmp_path / "s2"], "NaN"),
    }
    tried(*cases)
    before = {**tree(tmp_path), **tree(tiny_model)}
    for (ckpt, out), expect in cases.values():
        refused(server, ["slim", "--ckpt_path", str(ckpt), "--out", str(out), "--min_gate", "0.3"], expect)
    assert {**tree(tmp_path), **tree(tiny_model)} == before
    rc, err = server.run(["slim", "--ckpt_path", str(last), "--out", str(tmp_path / "slim"), "--min_gate", "0.3"])
    assert rc == 0, err[-3000:]
    assert (tmp_path / "slim" / "slim.md").exists() and not [n for n in NOISE if n in err], err


# ============================================================================= 7. labels
def test_numerically_equal_labels_are_one_class_and_no_number_is_nan(tmp_path):
    from datamodules.errors import DataConfigError
    from datamodules.files import infer_labels, label_ids, read_table

    texts = sentences(8)
    values = ["1", "1.0", "01", " 1 ", "0", "0.0", "1e0", "0"]
    csv_file = write_csv(tmp_path / "mixed.csv", ["text", "label"], list(map(list, zip(texts, values, strict=True))))
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": v}) + "\n"
                             for t, v in zip(texts, [1, 1.0, "1", "1.0", 0, 0.0, "0", 1], strict=True)))
    for path in (csv_file, jsonl):
        table = read_table(str(path), "--data.train_file")
        names, regression = infer_labels(table, "label", None)
        assert (names, regression) == (("0", "1"), False), path
        ids = label_ids(table, "label", names, False, "x")
        assert ids == [1 if float(str(v).strip()) == 1 else 0 for v in table.columns["label"]]
    bad = {"NaN": "not a finite number", "nan": "not a finite number", "inf": "not a finite number",
           "-Infinity": "not a finite number", "": "empty label", "   ": "empty label"}
    tried(*(f"label {b!r}" for b in bad), "regression label 1e39", "regression label -1e39", "labels [1, 1.0] given")
    for value, expect in bad.items():
        path = write_csv(tmp_path / "bad.csv", ["text", "label"], [[t, "1" if i != 4 else value]
                                                                   for i, t in enumerate(texts)])
        table = read_table(str(path), "x")
        with pytest.raises(DataConfigError, match=f"bad.csv:6: .*{expect}"):
            infer_labels(table, "label", None)
        with pytest.raises(DataConfigError, match="bad.csv:6"):
            label_ids(table, "label", ("0", "1"), False, "x")
    for value in ("1e39", "-1e39"):
        path = write_csv(tmp_path / "reg.csv", ["text", "label"], [[t, "0.5" if i != 2 else value]
                                                                   for i, t in enumerate(texts)])
        with pytest.raises(DataConfigError, match="reg.csv:4: label .* is not a number a float32 holds"):
            infer_labels(read_table(str(path), "x"), "label", None)
        with pytest.raises(DataConfigError, match="reg.csv:4"):
            label_ids(read_table(str(path), "x"), "label", (), True, "x")
    from datamodules import TextDataModule

    with pytest.raises(DataConfigError, match="given twice"):
        TextDataModule(train_file=str(csv_file), labels=["1", "1.0"], model_name_or_path="unused")


def test_a_regression_label_over_float32_is_refused_before_anything_is_written(server, tiny_model, cache_dir, tmp_path):
    train = write_csv(tmp_path / "scores.csv", ["text", "label"],
                      [[t, "0.5" if i != 3 else "1e39"] for i, t in enumerate(sentences(40))])
    out = tmp_path / "run"
    refused(server, ["fit", *own_args(tiny_model, {"train": train}, out, cache_dir)], "scores.csv:5: label '1e39'")
    assert not out.exists()


# ============================================================================= 8. the umask
UMASK_RUN = """
import os, sys, cli
os.umask({mask})
for argv in {commands!r}:
    sys.argv = ["cli.py", *argv]
    try:
        cli.main()
    except SystemExit as done:
        assert done.code in (0, None), done.code
"""


@pytest.mark.parametrize("mask", [0o002, 0o027])
def test_everything_a_run_writes_follows_the_umask(server, tiny_model, own_files, tmp_path, mask):
    out = tmp_path / "run"
    commands = [["fit", *own_args(tiny_model, own_files, out, tmp_path / "cache")],
                predict_args(out / "checkpoints" / "last.ckpt", "--data.predict_file", str(own_files["predict"]))]
    rc, err = server.run([], code=UMASK_RUN.format(mask=oct(mask), commands=commands))
    assert rc == 0, err[-3000:]
    written = [p for folder in (out, tmp_path / "cache") for p in [folder, *folder.rglob("*")]]
    assert {"summary.json", "export", "last.ckpt", "metrics.csv", "new.csv", "unipelt_model.safetensors"} <= {
        p.name for p in written}
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in written
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~mask}
    assert not wrong


def test_a_grid_lock_follows_the_umask(tmp_path):
    from lightning_modules import locks

    old = os.umask(0o002)
    try:
        assert locks.claim(tmp_path / "run.lock")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "run.lock").stat().st_mode) == 0o664


# ============================================================================= 9 and issue 27: what stderr shows
NOISE = ("tensorboardX", "Tip:", "litlogger", "litmodels", "LitLogger", "_pytree", "LeafSpec", "log_every_n_steps",
         "Trainable params", "LOAD REPORT", "Restoring states", "configure_callbacks", "args parameter is intended")


def test_a_run_prints_no_library_noise(server, tiny_model, glue_dir, cache_dir, tmp_path, capfd):
    """An encoder and a decoder `fit`, and `from_pretrained` in Python: none of the libraries' adverts,
    notices, deprecations or tables; the summary's figures rounded."""
    from tests.decoder_fixtures import prompt_rows, write_jsonl
    from tests.test_instruct_cli import write_tiny_llama

    llama = write_tiny_llama(tmp_path / "llama")
    train = write_jsonl(tmp_path / "train.jsonl", prompt_rows(40))
    runs = {
        "encoder": ["fit", *run_args(tiny_model, glue_dir, tmp_path / "enc", cache_dir, **{"trainer.max_epochs": 1})],
        "decoder": ["fit", "--config", str(ROOT / "configs" / "instruct_example.yaml"), "--model.model_name_or_path",
                    str(llama), "--data.train_file", str(train), "--data.k_shot", "24", "--data.dev_size", "8",
                    "--data.batch_size", "4", "--trainer.max_epochs", "1", "--data.max_seq_length", "64",
                    "--data.cache_dir", str(cache_dir), "--trainer.accelerator", "cpu",
                    "--trainer.default_root_dir", str(tmp_path / "dec")],
    }
    for name, args in runs.items():
        rc, err = server.run(args)
        assert rc == 0, err[-3000:]
        assert not [n for n in NOISE if n in err], (name, err)
    best = next(line for line in (server.tmp / f"{server.count}.out").read_text().splitlines()
                if line.startswith("best dev"))
    assert re.fullmatch(r"best dev   : val/loss = \d+\.\d{1,4} \(perplexity [\d.]{1,6}\)", best), best
    import unipelt

    capfd.readouterr()
    unipelt.from_pretrained(tmp_path / "enc" / "export")
    assert "LOAD REPORT" not in capfd.readouterr().err
