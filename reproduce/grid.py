"""The reproduction grid: one subprocess of the real ``cli.py fit`` per (task, K, method, seed).

Every run goes through the same CLI a user would call, so there is no second training path.
A run's folder ``<out>/<task>/<k100|full>/<method>/seed<s>/`` holds the CLI's outputs, the log
``run.log`` and, written atomically when the run ends, ``metrics.json`` with ``status`` "done"
(the CLI's summary plus the exact command) or "failed" (return code and the log's tail).
``metrics.json`` is the only marker of completion: a re-run skips "done", restarts anything else
from an empty folder, and retries "failed" only with ``--retry-failed``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from lightning_modules import locks
from unipelt.atomic import write_json

from .results import portable
from .tasks import METHODS, TASKS, k_tag

REPO_ROOT = Path(__file__).resolve().parent.parent  # a checkout, or site-packages when installed
LOG_TAIL_LINES = 40


def shipped_configs() -> Path:
    """The ``<task>_<k>.yaml`` configs: package data of the installed ``configs`` package, found
    with importlib.resources (an editable install made before they shipped: the checkout's folder)."""
    try:
        return Path(str(resources.files("configs")))
    except ModuleNotFoundError:
        return REPO_ROOT / "configs"


def default_cli() -> list[str]:
    """How each run starts. From a checkout: its ``cli.py`` (so a run uses the code beside this one);
    from an installed package: the ``unipelt`` entry point installed beside this Python, else the
    installed ``cli`` module's file. Nothing depends on a checkout being there."""
    if (REPO_ROOT / "setup.cfg").is_file() and (REPO_ROOT / "cli.py").is_file():
        return [sys.executable, str(REPO_ROOT / "cli.py")]
    script = Path(sys.executable).parent / ("unipelt.exe" if os.name == "nt" else "unipelt")
    if script.is_file():
        return [str(script)]
    from importlib.util import find_spec

    spec = find_spec("cli")  # its file, without importing it
    if spec is None or spec.origin is None:
        raise RuntimeError("no cli.py beside this package and no `unipelt` script beside this Python")
    return [sys.executable, str(Path(spec.origin).resolve())]


@dataclass(frozen=True)
class Run:
    """One cell of the grid for one seed; ``k`` is a number as a string, or "full"."""

    task: str
    k: str
    method: str
    seed: int

    @property
    def rel_dir(self) -> Path:
        return Path(self.task, k_tag(self.k), self.method, f"seed{self.seed}")

    @property
    def name(self) -> str:
        return f"{self.task}/{k_tag(self.k)}/{self.method}/seed{self.seed}"

    def as_dict(self) -> dict:
        return {"task": self.task, "k": self.k, "method": self.method, "seed": self.seed}


@dataclass
class GridOptions:
    """Everything that shapes a run's command and the grid's scheduling."""

    out: Path
    cli: list[str] = field(default_factory=default_cli)
    configs_dir: Path = field(default_factory=shipped_configs)
    data_dir: str | None = None
    model: str | None = None
    extra_args: list[str] = field(default_factory=list)
    method_args: dict[str, list[str]] = field(default_factory=dict)  # "lora" or "rte:lora" -> args
    workers: int = 1
    devices: list[str] = field(default_factory=list)
    retry_failed: bool = False
    prune_checkpoints: bool = False  # delete *.ckpt of finished runs (metrics.json keeps the results)
    cwd: Path | None = None  # None: the caller's folder, so relative paths in args mean what they say
    threads_per_run: int | None = None  # OMP_NUM_THREADS of each run; None: see cpu_threads_per_run()
    rerun_changed: bool = False  # run again finished runs whose recorded arguments differ from these


# ---------------------------------------------------------------- planning


def parse_ints(spec: str) -> list[int]:
    """``"0-4"``, ``"0,2,5"`` or ``"0-2,7"`` -> sorted unique ints."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return sorted(out)


MULTITASK = "+"  # a task `sst2+cola+rte` is one multi-task run of those tasks (configs/multitask_<k>.yaml)


def parse_names(spec: str, known: Iterable[str], what: str) -> list[str]:
    """Comma list or ``all``; unknown names are an error rather than a silently empty grid. A task may be a
    multi-task run, its tasks joined by ``+``."""
    known = list(known)
    names = known if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if any(part not in known for part in (n.split(MULTITASK) if what == "task" else [n]))]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (known: {', '.join(known)})")
    return names


def parse_ks(spec: str) -> list[str]:
    return ["full" if k.strip() == "full" else str(int(k)) for k in spec.split(",") if k.strip()]


def plan(tasks: Sequence[str], ks: Sequence[str], methods: Sequence[str], seeds: Sequence[int]) -> list[Run]:
    """All runs, seed-major so that a partial grid has every cell at some seeds first."""
    return [Run(t, k, m, s) for s in seeds for k in ks for t in tasks for m in methods]


def command(run: Run, opts: GridOptions, run_dir: Path) -> list[str]:
    """The exact CLI invocation of one run."""
    tasks = run.task.split(MULTITASK)
    config = f"multitask_{k_tag(run.k)}" if len(tasks) > 1 else f"{run.task}_{k_tag(run.k)}"
    cmd = [*opts.cli, "fit", "--config", str(opts.configs_dir / f"{config}.yaml")]
    if len(tasks) > 1:
        cmd += ["--data.tasks", f"[{', '.join(tasks)}]"]
    cmd += ["--model.method", run.method, "--data.seed", str(run.seed), "--seed_everything", str(run.seed)]
    cmd += ["--trainer.default_root_dir", str(run_dir)]
    if opts.data_dir:
        cmd += ["--data.data_dir", opts.data_dir]
    if opts.model:
        cmd += ["--model.model_name_or_path", opts.model]
    cmd += opts.extra_args
    cmd += opts.method_args.get(run.method, []) + opts.method_args.get(f"{run.task}:{run.method}", [])
    return cmd


# ---------------------------------------------------------------- one run


def read_metrics(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def status(run_dir: Path) -> str | None:
    """Return "done", "failed" or None (never finished)."""
    m = read_metrics(run_dir)
    return m.get("status") if m else None


def _tail(path: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except FileNotFoundError:
        return []


def _host() -> dict:
    return {
        "node": platform.node(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


class Stopped(Exception):
    """The grid was interrupted while this run was going; it stays unfinished."""


def execute(
    run: Run, opts: GridOptions, device: str | None = None, on_start=None, stop: threading.Event | None = None
) -> dict:
    """Run one grid cell from an empty folder and record its outcome in metrics.json."""
    run_dir = opts.out / run.rel_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = command(run, opts, run_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    if opts.threads_per_run:
        env["OMP_NUM_THREADS"] = str(opts.threads_per_run)
    record = {
        "run": run.as_dict(),
        "command": cmd,
        "command_str": shlex.join(cmd),
        "device": device,
        "host": _host(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    t0 = time.monotonic()
    log_path = run_dir / "run.log"
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=opts.cwd, env=env, start_new_session=True
        )
        if on_start:
            on_start(proc)
        if stop is not None and stop.is_set():  # stopped while this run was starting
            _kill_group(proc)
        rc = proc.wait()
    record["wall_time_s"] = round(time.monotonic() - t0, 3)
    record["returncode"] = rc
    if stop is not None and stop.is_set():
        raise Stopped(run.name)
    summary = None
    if rc == 0:
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            record["error"] = f"CLI exited 0 but summary.json is unusable: {e}"
    else:
        record["error"] = f"CLI exited with code {rc}"
    if summary is not None:
        record = {**summary, **record, "status": "done"}
        cfg = next(iter(sorted(run_dir.rglob("config.yaml"))), None)
        if cfg is not None:
            record["config"] = cfg.read_text()
        if opts.prune_checkpoints:
            for ckpt in run_dir.rglob("*.ckpt"):
                ckpt.unlink()
    else:
        record.update(
            status="failed",
            log_tail=_tail(log_path),
            task=run.task,
            method=run.method,
            k_shot=None if run.k == "full" else int(run.k),
            seed=run.seed,
        )
    record = portable(record, opts.cwd or Path.cwd())  # paths from the grid's folder, not this machine's root
    write_json(run_dir / "metrics.json", record)
    return record


# ---------------------------------------------------------------- the grid


class Progress:
    """Plain progress lines (they survive log files and nohup): done/total, failures, ETA."""

    def __init__(self, total: int, done: int, failed: int, workers: int) -> None:
        self.total, self.done, self.failed, self.workers = total, done, failed, workers
        self.durations: list[float] = []
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        print(f"[grid] {total} runs: {done} done, {failed} failed before this start", flush=True)

    def skip(self, done: bool) -> None:
        """A run another process finished after this one listed the grid."""
        with self.lock:
            self.done += done
            self.failed += not done

    def update(self, run: Run, rec: dict) -> None:
        with self.lock:
            ok = rec.get("status") == "done"
            self.done += ok
            self.failed += not ok
            if "wall_time_s" in rec:
                self.durations.append(rec["wall_time_s"])
            left = self.total - self.done - self.failed
            eta = ""
            if self.durations and left:
                secs = sum(self.durations) / len(self.durations) * left / self.workers
                eta = f", ETA {_hms(secs)}"
            what = "done" if ok else f"FAILED ({rec.get('error', '')})"
            print(
                f"[{self.done}/{self.total} done, {self.failed} failed{eta}] {run.name} {what} "
                f"in {rec.get('wall_time_s', 0):.0f}s",
                flush=True,
            )


def _hms(secs: float) -> str:
    s = int(secs)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class GridResult:
    done: int = 0
    failed: int = 0
    held_elsewhere: list[str] = field(default_factory=list)
    interrupted: bool = False


def _write_plan(runs: Sequence[Run], out: Path) -> None:
    """Record what this invocation meant to run, so the report can tell complete cells."""
    plans = out / ".plans"
    plans.mkdir(parents=True, exist_ok=True)
    write_json(
        plans / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json", {"runs": [r.as_dict() for r in runs]}
    )


def cpu_threads_per_run(workers: int, devices: Sequence[str]) -> int | None:
    """Parallel CPU runs share the cores instead of each starting one thread per core (torch's
    default), which oversubscribes the machine; an explicit OMP_NUM_THREADS is left alone."""
    if devices or workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // workers)


# Options whose values say where things live, not what is run: a grid copied to another machine resumes.
_PATH_OPTIONS = ("--config", "--trainer.default_root_dir", "--data.data_dir", "--model.model_name_or_path")


def run_arguments(cmd: Sequence[str]) -> list[str]:
    """What a run's command asks for (everything after ``fit``), without the values of path options."""
    args = list(cmd[list(cmd).index("fit") + 1 :]) if "fit" in cmd else list(cmd)
    return [a for i, a in enumerate(args) if not (i > 0 and args[i - 1] in _PATH_OPTIONS)]


def changed_runs(runs: Sequence[Run], opts: GridOptions) -> list[tuple[Run, list[str], list[str]]]:
    """Finished runs whose recorded command asks for something else than this invocation would
    (other learning rate, epochs, ...): (run, recorded arguments, planned arguments)."""
    out = []
    for run in runs:
        record = read_metrics(opts.out / run.rel_dir)
        if not record or record.get("status") != "done" or not record.get("command"):
            continue
        then = run_arguments(record["command"])
        now = run_arguments(command(run, opts, opts.out / run.rel_dir))
        if then != now:
            out.append((run, then, now))
    return out


def group_options(tokens: Sequence[str]) -> list[str]:
    """``["--a", "1", "--b", "x", "y"]`` -> ``["--a 1", "--b x y"]``: one string per option."""
    out: list[str] = []
    for token in tokens:
        if token.startswith("--") or not out:
            out.append(token)
        else:
            out[-1] += f" {token}"
    return out


class ArgumentsChanged(RuntimeError):
    """Finished runs of this grid were made with other arguments; resuming would mix two settings."""


def run_grid(runs: Sequence[Run], opts: GridOptions) -> GridResult:
    """Run every unfinished run, ``opts.workers`` at a time; safe to start several times at once.

    A finished run made with other arguments than this invocation's is never silently kept:
    ``ArgumentsChanged`` unless ``opts.rerun_changed``, which runs it again.
    """
    opts.out = opts.out.resolve()
    changed = changed_runs(runs, opts)
    if changed and not opts.rerun_changed:
        run, then, now = changed[0]
        was, wants = group_options(then), group_options(now)
        old = " ".join(o for o in was if o not in wants) or "-"
        new = " ".join(o for o in wants if o not in was) or "-"
        raise ArgumentsChanged(
            f"{len(changed)} finished run(s) in {opts.out} were made with other arguments, e.g. {run.name} "
            f"had `{old}` where this asks for `{new}`; pass --rerun-changed to run them again, or use another --out"
        )
    _write_plan(runs, opts.out)
    states = {r: status(opts.out / r.rel_dir) for r in runs}
    rerun = {run for run, _, _ in changed}
    for run in rerun:
        states[run] = None  # run again (its folder is emptied when it starts)
    n_failed = sum(s == "failed" for s in states.values()) if not opts.retry_failed else 0
    todo = [r for r in runs if states[r] != "done" and (opts.retry_failed or states[r] != "failed")]
    n_workers = max(1, opts.workers or len(opts.devices) or 1)
    if opts.threads_per_run is None:
        opts.threads_per_run = cpu_threads_per_run(n_workers, opts.devices)
    progress = Progress(len(runs), sum(s == "done" for s in states.values()), n_failed, n_workers)
    result = GridResult()
    queue = iter(todo)
    qlock = threading.Lock()
    stop = threading.Event()
    active: dict[int, subprocess.Popen] = {}
    ended = [threading.Event() for _ in range(n_workers)]  # set by each worker as it returns

    def worker(i: int) -> None:
        try:
            work(i)
        finally:
            ended[i].set()

    def work(i: int) -> None:
        device = opts.devices[i % len(opts.devices)] if opts.devices else None
        while not stop.is_set():
            with qlock:
                run = next(queue, None)
            if run is None:
                return
            lock = opts.out / ".locks" / (run.name.replace("/", "__") + ".lock")
            if not locks.claim(lock):
                result.held_elsewhere.append(run.name)
                continue
            try:
                now = status(opts.out / run.rel_dir)  # another process may have finished it
                if now == "done" and run in rerun and changed_runs([run], opts):
                    now = None  # still the old arguments' result
                if now == "done" or (now == "failed" and not opts.retry_failed):
                    progress.skip(now == "done")
                    continue
                rec = execute(run, opts, device, on_start=lambda p: active.__setitem__(i, p), stop=stop)
            except Stopped:
                return
            except Exception as e:  # the grid goes on; the run is recorded as failed
                rec = {"run": run.as_dict(), "status": "failed", "error": repr(e)}
                (opts.out / run.rel_dir).mkdir(parents=True, exist_ok=True)
                write_json(opts.out / run.rel_dir / "metrics.json", rec)
            finally:
                active.pop(i, None)
                locks.release(lock)
            progress.update(run, rec)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_workers)]
    for t in threads:
        t.start()
    # The main thread polls a flag with sleep() and never waits in Thread.join() while a signal can
    # arrive: on Python 3.11 a Ctrl-C/SIGTERM that interrupts join() marks the still-running thread
    # as finished (bpo-45274's fix), so the grid exited while a worker was still stopping its run
    # and left that run's process behind.
    try:
        while not all(e.is_set() for e in ended):
            time.sleep(0.1)
    except KeyboardInterrupt:
        result.interrupted = True
        stop.set()
        print("[grid] interrupted: stopping running runs; they restart on the next start", flush=True)
        for p in list(active.values()):
            _kill_group(p)
        for e in ended:  # a worker whose run was starting kills it itself (see execute)
            e.wait()
    result.done, result.failed = progress.done, progress.failed
    return result


def _kill_group(p: subprocess.Popen, grace_s: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unipelt reproduce",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` go to every run's `cli.py fit`.",
    )
    p.add_argument("--tasks", default="rte,mrpc,stsb", help="comma list or 'all'")
    p.add_argument("--k", default="100", help="comma list of K, or 'full' (e.g. 100,500,full)")
    p.add_argument("--methods", default="all", help=f"comma list or 'all' ({', '.join(METHODS)})")
    p.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,1,2")
    p.add_argument("--out", required=True, type=Path, help="grid folder (resumable)")
    p.add_argument("--data-dir", help="passed as --data.data_dir")
    p.add_argument("--model", help="passed as --model.model_name_or_path")
    p.add_argument("--workers", type=int, default=0, help="parallel runs (default: one per device, else 1)")
    p.add_argument("--devices", default="", help="GPU ids, one per worker (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--retry-failed", action="store_true", help="restart runs recorded as failed")
    p.add_argument("--prune-checkpoints", action="store_true", help="delete finished runs' *.ckpt files")
    p.add_argument(
        "--rerun-changed",
        action="store_true",
        help="run again finished runs whose recorded arguments differ from this invocation's (default: refuse)",
    )
    p.add_argument(
        "--method-args",
        type=Path,
        help="JSON file {'lora': [args...], 'rte:lora': [args...]} of per-method CLI args",
    )
    p.add_argument("--cli", help="command that runs the CLI (default: the checkout's cli.py, else `unipelt`)")
    p.add_argument("--configs", type=Path, help="folder of <task>_<k>.yaml (default: the configs shipped with unipelt)")
    p.add_argument("--dry-run", action="store_true", help="print the commands of unfinished runs and exit")
    return p


def _load_method_args(path: Path | None) -> dict[str, list[str]]:
    if path is None:
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--method-args {path}: cannot read it as JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SystemExit(f"--method-args {path}: expected an object like {{'lora': [args...]}}")
    bad = [k for k in raw if k.rpartition(":")[2] not in METHODS
           or (":" in k and any(t not in TASKS for t in k.partition(":")[0].split(MULTITASK)))]
    if bad:
        raise SystemExit(
            f"--method-args {path}: unknown key(s) {', '.join(bad)}; keys are <method> or <task>:<method> "
            f"(methods: {', '.join(METHODS)}; tasks: {', '.join(TASKS)})"
        )
    return {k: shlex.split(v) if isinstance(v, str) else [str(a) for a in v] for k, v in raw.items()}


def methods_without_args(runs: Sequence[Run], method_args: dict[str, list[str]]) -> list[str]:
    """Methods of the grid that --method-args gives nothing to: they run with the config's defaults."""
    if not method_args:
        return []
    missing = {r.method for r in runs if r.method not in method_args and f"{r.task}:{r.method}" not in method_args}
    return [m for m in METHODS if m in missing]


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    runs = plan(
        parse_names(args.tasks, TASKS, "task"),
        parse_ks(args.k),
        parse_names(args.methods, METHODS, "method"),
        parse_ints(args.seeds),
    )
    opts = GridOptions(
        out=args.out.resolve(),
        configs_dir=(args.configs or shipped_configs()).resolve(),
        data_dir=args.data_dir,
        model=args.model,
        extra_args=extra,
        method_args=_load_method_args(args.method_args),
        workers=args.workers,
        devices=[d for d in args.devices.split(",") if d],
        retry_failed=args.retry_failed,
        prune_checkpoints=args.prune_checkpoints,
        rerun_changed=args.rerun_changed,
    )
    if args.cli:
        opts.cli = shlex.split(args.cli)
    if missing := methods_without_args(runs, opts.method_args):
        print(
            f"[grid] warning: {args.method_args} gives no arguments for {', '.join(missing)}: "
            "those runs use the config's defaults",
            file=sys.stderr,
            flush=True,
        )
    if args.dry_run:
        changed = {run for run, _, _ in changed_runs(runs, opts)}
        for r in runs:
            if status(opts.out / r.rel_dir) != "done" or r in changed:
                note = "  # finished with other arguments" if r in changed else ""
                print(shlex.join(command(r, opts, opts.out / r.rel_dir)) + note)
        return 0
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops runs cleanly too
    try:
        res = run_grid(runs, opts)
    except ArgumentsChanged as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    msg = f"[grid] finished: {res.done}/{len(runs)} done, {res.failed} failed"
    if res.held_elsewhere:
        msg += f", {len(res.held_elsewhere)} held by another worker"
    print(msg + (" (interrupted)" if res.interrupted else ""), flush=True)
    return 130 if res.interrupted else (1 if res.failed else 0)
