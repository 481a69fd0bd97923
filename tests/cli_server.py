"""The CLI server of the end-to-end tests: `cli.main()` in real processes, forked from one that imported it once.

Importing torch + transformers + Lightning takes ~5 CPU-s here, so a module-scoped server imports them once
and forks one child per command; a child is a real process like `python cli.py`: it can be SIGKILLed, its
exit status is the one a shell sees, and an uncaught exception prints a traceback on its stderr. The
fixtures (registered in tests/conftest.py) give each test module its own server, tiny model and data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import write_rte, write_tiny_model

ROOT = Path(__file__).resolve().parents[1]


SERVER = r"""
import json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
import cli
# The slow imports, once: cli.py itself imports nothing until a command runs (its --help stays fast), so
# what every command needs (torch, transformers' BERT, Lightning, jsonargparse, matplotlib) is loaded here.
from lightning_modules import kinds, run, slim  # noqa
import reproduce, transformers.models.bert.modeling_bert, transformers.models.bert.tokenization_bert  # noqa
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot  # noqa (the plot extra: may be absent)
except ImportError:
    pass
for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(case["cwd"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.environ.update(case["env"])
            sys.argv = ["cli.py", *case["args"]]
            try:
                if case.get("code"):  # a snippet instead of the CLI (with everything already imported)
                    exec(compile(case["code"], "<case>", "exec"), {})
                else:
                    cli.main()
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class CliServer:
    def __init__(self, tmp: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.tmp = tmp
        self.count = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(ROOT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def run(self, args: list[str], env: dict[str, str] | None = None, code: str = "") -> tuple[int, str]:
        """(exit status, stderr) of `python cli.py *args`; a negative status is the signal that ended it."""
        self.count += 1
        out, err = self.tmp / f"{self.count}.out", self.tmp / f"{self.count}.err"
        case = {"args": args, "cwd": str(self.tmp), "stdout": str(out), "stderr": str(err), "env": env or {}}
        case["code"] = code
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the CLI server died"
        return json.loads(line)["rc"], err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = CliServer(tmp_path_factory.mktemp("cli"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-bert")


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    return write_rte(tmp_path_factory.mktemp("glue"), n_train=60, n_dev=21)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")
