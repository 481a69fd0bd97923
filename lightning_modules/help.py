"""Help: `cli.py --help` (TOP_HELP), and `cli.py fit --help` in a fraction of a second, kept once rendered.

LightningCLI builds that help from the classes' signatures, so it needs torch and Lightning imported:
about 7 s on 2 CPU cores, most of it `import pytorch_lightning` (it pulls torch._dynamo). The text only
changes when our code, a library or the terminal width does, so the first call renders it and keeps
it (`$XDG_CACHE_HOME/unipelt/help`, default `~/.cache`); later calls print it without importing torch.
Any run of the CLI keeps the texts of all four subcommands too (0.2 s, once), so help is fast after
the first command a user runs, whatever it was. `UNIPELT_HELP_CACHE=0` turns this off. Anything else
on the command line (a --config, a --ckpt_path whose settings become defaults) renders afresh.

Light on purpose: nothing here imports torch (the kept text is printed before anything heavy loads).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

TOP_HELP = """usage: unipelt [-h] {fit,validate,test,predict,slim,reproduce,select,report} ...

UniPELT (Mao et al., ACL 2022): gated adapter, prefix-tuning and LoRA on a frozen encoder.

commands:
  fit        train on a GLUE task (--data.task) or your files (--data.train_file), then test the best checkpoint
  validate   score a checkpoint on the validation split (--ckpt_path; its settings are read from it)
  test       score a checkpoint on the test split(s) (--ckpt_path)
  predict    predict --data.predict_file, or GLUE's unlabeled test set, into --predictions (--ckpt_path)
  slim       drop the parts whose gates are low, fold the rest, export (--ckpt_path, --min_gate, --out)
  reproduce  run the paper's grid of tasks x K x methods x seeds
  select     pick each method's learning rate from a sweep's dev scores
  report     compare a grid with the paper's tables

`unipelt COMMAND --help` lists a command's options; start with: unipelt fit --config configs/quickstart.yaml
"""
DESCRIPTION = TOP_HELP.split("\n\n")[1]  # what `SUBCOMMAND --help` says the program is
HELP_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# What shapes a subcommand's help besides the code: the libraries whose signatures and options it lists.
_HELP_LIBRARIES = ("torch", "pytorch-lightning", "lightning-utilities", "jsonargparse", "transformers",
                   "datasets", "torchmetrics", "peft")
_ROOT = Path(__file__).resolve().parent.parent  # the checkout, or site-packages when installed


def help_cache_file(argv: list[str]) -> Path | None:
    """Where `SUBCOMMAND --help` (exactly that) keeps its text, keyed by everything the text depends on."""
    if len(argv) != 2 or argv[0] not in HELP_SUBCOMMANDS or argv[1] not in ("-h", "--help"):
        return None
    if os.environ.get("UNIPELT_HELP_CACHE", "1") == "0":
        return None
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""  # the usage line names it
    key = hashlib.sha256(f"{sys.version}|{shutil.get_terminal_size().columns}|{prog}|{argv[0]}".encode())
    sources = [path for path in [_ROOT / "cli.py"] if path.is_file()]
    for package in ("unipelt", "datamodules", "lightning_modules"):
        sources += sorted((_ROOT / package).rglob("*.py"))
    for path in sources:
        stat = path.stat()
        key.update(f"{path}|{stat.st_mtime_ns}|{stat.st_size}".encode())
    for dist in _HELP_LIBRARIES:
        try:
            key.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            key.update(f"{dist}=none".encode())
    key.update(repr(sorted((k, v) for k, v in os.environ.items() if k.startswith(("JSONARGPARSE", "PL_")))).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unipelt" / "help"
    return cache / f"{argv[0]}-{key.hexdigest()[:20]}.txt"


def store_help(path: Path, text: str) -> bool:
    """Keep ``text`` at ``path`` (a reader never sees half of it); False where it cannot be written
    (a read-only home: help still works, only slower)."""
    from unipelt.atomic import atomic_write  # only after a CLI run: torch is loaded by then

    try:
        with atomic_write(path) as f:
            f.write(text)
    except OSError:
        return False
    return True


def print_kept_help(argv: list[str]) -> None:
    """Print a kept help text and exit; return when there is none."""
    path = help_cache_file(argv)
    try:
        text = path.read_text() if path else None
    except OSError:
        return
    if text:
        print(text, end="")
        sys.exit(0)


@contextlib.contextmanager
def keep_help(argv: list[str]) -> Iterator[None]:
    """Around a `SUBCOMMAND --help` call: print as usual and keep the text for the next call."""
    path = help_cache_file(argv)
    if path is None:
        yield
        return
    shown = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            shown.write(text)
            return real.write(text)

        def flush(self) -> None:
            real.flush()

    real = sys.stdout
    try:
        with contextlib.redirect_stdout(Tee()):
            yield
    except SystemExit as done:
        if done.code in (0, None) and shown.getvalue():
            store_help(path, shown.getvalue())
        raise
