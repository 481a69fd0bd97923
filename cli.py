"""`python cli.py fit|validate|test|predict`: UniPELT on a GLUE task or your own data, through LightningCLI.

`fit` trains, keeps the best checkpoint by the task's main dev metric, then tests that checkpoint,
prints a summary and writes it to `<trainer.default_root_dir>/summary.json`. `validate`, `test` and
`predict` take their settings from `--ckpt_path` (flags given on the command line win); `predict`
writes `--predictions`. The console script `unipelt` is this file; `unipelt reproduce`, `unipelt
select` and `unipelt report` run the paper's grid (reproduce/).
"""

from __future__ import annotations

import sys

TOP_HELP = """usage: unipelt [-h] {fit,validate,test,predict,reproduce,select,report} ...

UniPELT (Mao et al., ACL 2022): gated adapter, prefix-tuning and LoRA on a frozen encoder.

commands:
  fit        train on a GLUE task (--data.task) or your files (--data.train_file), then test the best checkpoint
  validate   score a checkpoint on the validation split (--ckpt_path; its settings are read from it)
  test       score a checkpoint on the test split(s) (--ckpt_path)
  predict    predict --data.predict_file, or GLUE's unlabeled test set, into --predictions (--ckpt_path)
  reproduce  run the paper's grid of tasks x K x methods x seeds
  select     pick each method's learning rate from a sweep's dev scores
  report     compare a grid with the paper's tables

`unipelt COMMAND --help` lists a command's options; start with: unipelt fit --config configs/quickstart.yaml
"""


def _top_level_help(argv: list[str]) -> bool:
    """`cli.py`, `cli.py -h`: answered without importing torch or Lightning (seconds saved on every look)."""
    return not argv or argv[0] in ("-h", "--help")


HELP_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# What shapes a subcommand's help besides the code: the libraries whose signatures and options it lists.
_HELP_LIBRARIES = ("torch", "pytorch-lightning", "lightning-utilities", "jsonargparse", "transformers",
                   "datasets", "torchmetrics", "peft")


def help_cache_file(argv: list[str]) -> Path | None:
    """Where `cli.py fit --help` (exactly that) keeps its text, keyed by everything the text depends on.

    LightningCLI builds that help from the classes' signatures, so it needs torch and Lightning imported:
    about 7 s on 2 CPU cores, most of it `import pytorch_lightning` (it pulls torch._dynamo). The text only
    changes when our code, a library or the terminal width does, so the first call renders it and keeps
    it (`$XDG_CACHE_HOME/unipelt/help`, default `~/.cache`); later calls print it in a fraction of a second.
    Any run of the CLI keeps the texts of all four subcommands too (0.2 s, once), so help is fast after
    the first command a user runs, whatever it was.
    `UNIPELT_HELP_CACHE=0` turns this off. Anything else on the command line (a --config, a --ckpt_path
    whose settings become defaults) renders afresh.
    """
    import hashlib
    import os
    import shutil
    from importlib import metadata
    from pathlib import Path

    if len(argv) != 2 or argv[0] not in HELP_SUBCOMMANDS or argv[1] not in ("-h", "--help"):
        return None
    if os.environ.get("UNIPELT_HELP_CACHE", "1") == "0":
        return None
    root = Path(__file__).resolve().parent
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""  # the usage line names it
    key = hashlib.sha256(f"{sys.version}|{shutil.get_terminal_size().columns}|{prog}|{argv[0]}".encode())
    sources = [Path(__file__).resolve()]
    for package in ("unipelt", "datamodules", "lightning_modules"):
        sources += sorted((root / package).rglob("*.py"))
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


def _store_help(path: Path, text: str) -> bool:
    """Keep ``text`` at ``path`` (a reader never sees half of it); False where it cannot be written
    (a read-only home: help still works, only slower)."""
    import os

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        os.replace(partial, path)
    except OSError:
        return False
    return True


def _print_cached_help(argv: list[str]) -> None:
    """Print a kept help text and exit; return when there is none."""
    path = help_cache_file(argv)
    try:
        text = path.read_text() if path else None
    except OSError:
        return
    if text:
        print(text, end="")
        sys.exit(0)


if sys.argv and sys.argv[0].rsplit("/", 1)[-1] in ("cli.py", "unipelt"):
    if _top_level_help(sys.argv[1:]):
        print(TOP_HELP, end="")
        sys.exit(0)
    _print_cached_help(sys.argv[1:])

import contextlib  # noqa: E402 - after the fast help path
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from pytorch_lightning.utilities import rank_zero_only  # noqa: E402

from datamodules import DataConfigError, HubUnreachableError, TextDataModule  # noqa: E402
from lightning_modules import (  # noqa: E402
    AtomicCheckpointIO,
    CheckpointFileError,
    CheckpointMismatchError,
    EpochTimer,
    ModelConfigError,
    UniPELTLightningModule,
    load_checkpoint_file,
)
from lightning_modules.predictions import write_predictions  # noqa: E402
from unipelt import PRESETS, PELTError, save_pretrained  # noqa: E402

SUMMARY_FILE = "summary.json"


class UsageError(ValueError):
    """A bad command-line value, reported in one line with exit code 2."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf: one line on stderr, exit code 1; the last good checkpoint stays."""


# Errors that are the user's input, not our bug: one line on stderr, exit code 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    PELTError,
    DataConfigError,
    ModelConfigError,
    CheckpointFileError,
    CheckpointMismatchError,
)
DIVERGED_EXIT_CODE = 1
# `ckpt_path` values Lightning resolves itself; anything else is a file.
_SPECIAL_CKPT = ("last", "best", "hpc", "registry")
_DATA_OPTIONS = frozenset(inspect.signature(TextDataModule.__init__).parameters) - {"self"}
HUB_EXIT_CODE = 1  # the network, not the input: exit code 2 stays for bad input
# Settings a checkpoint's own record gives validate/test/predict (flags win): not links, not run-time state.
_LINK_TARGETS = {"model.task", "data.model_name_or_path"}


def user_message(err: BaseException) -> str:
    """One line; the datamodule says `k_shot=0: ...`, which the command line knows as `--data.k_shot`."""
    text = " ".join(str(err).split()) or type(err).__name__
    match = re.match(r"(\w+)=", text)
    if isinstance(err, DataConfigError) and match and match.group(1) in _DATA_OPTIONS:
        text = "--data." + text
    return text


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _loggers(root: str) -> list[Any]:
    """CSV always (plain files, easy to aggregate); TensorBoard beside it when it is installed."""
    csv = CSVLogger(root, name="lightning_logs")
    loggers: list[Any] = [csv]
    try:
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(root, name="lightning_logs", version=csv.version, sub_dir="tensorboard"))
    except ImportError:
        pass
    return loggers


def default_run_dir(config: Any) -> Path:
    """One folder per distinct run, so that a method or seed switched on the command line never
    lands in another run's folder: runs/<task>_<k>/<method>/split<data seed>_seed<training seed>."""
    size = "full" if config.data.k_shot is None else f"k{config.data.k_shot}"
    if config.data.task is not None:
        task = str(config.data.task).lower().replace("-", "")
    else:  # your own files: --data.name, else the training file's name
        from datamodules.text import _task_name

        task = config.data.name or (_task_name(config.data.train_file) if config.data.train_file else "custom")
    return (
        Path("runs")
        / f"{task}_{size}"
        / str(config.model.method).lower()
        / f"split{config.data.seed}_seed{config.seed_everything}"
    )


def _task_for_model(dm: Any) -> str | dict[str, Any]:
    """What the data module tells the model: a GLUE task's name, or your task's full description."""
    return dm.task_info.name if dm.task_info.is_glue else dm.task_info.to_dict()


def checkpoint_defaults(subcommand: str, ckpt_path: str) -> dict[str, Any]:
    """The run a checkpoint records, as parser defaults for validate/test/predict (so flags still win):
    backbone, method and its settings, the task or label set, text fields and data settings."""
    checkpoint = load_checkpoint_file(ckpt_path, mmap=True)
    model = dict(checkpoint.get("hyper_parameters") or {})
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    defaults = {f"model.{k}": v for k, v in model.items() if not k.startswith("_")}
    defaults.update({f"data.{k}": v for k, v in data.items() if not k.startswith("_")})
    task = model.get("task")
    if isinstance(task, dict) and not task.get("is_glue", False):
        # The label set and fields as trained: predicting needs no training file, testing keeps its order.
        defaults.update({
            "data.name": task["name"],
            "data.labels": list(task["label_names"]) or None,
            "data.regression": bool(task["is_regression"]),
            "data.text_fields": list(task["text_fields"]),
        })
        if subcommand == "predict":
            for key in ("train_file", "validation_file", "test_file"):
                defaults[f"data.{key}"] = None
    if subcommand == "predict":
        defaults["data.predict_file"] = None  # never the file of an earlier predict
    return {k: v for k, v in defaults.items() if k not in _LINK_TARGETS}


def _find_ckpt_path(argv: list[str]) -> tuple[str | None, str | None]:
    """(subcommand, --ckpt_path) from the raw arguments, before the parser exists."""
    subcommand = next((a for a in argv if a in ("fit", "validate", "test", "predict")), None)
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return subcommand, argv[i + 1]
        if arg.startswith("--ckpt_path="):
            return subcommand, arg.split("=", 1)[1]
    return subcommand, None


def run_folder_of(ckpt_path: str) -> Path:
    """`<run>/checkpoints/best.ckpt` -> `<run>`; a checkpoint elsewhere -> its own folder."""
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


class UniPELTCLI(LightningCLI):
    def __init__(self, *args: Any, ckpt_defaults: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.ckpt_defaults = ckpt_defaults or {}
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # State each thing once: the backbone also gives the tokenizer; the data gives the task, its
        # labels and metrics (a GLUE task's name, or the task read from your files).
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.link_arguments("data", "model.task", compute_fn=_task_for_model, apply_on="instantiate")
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Allow `fit` into a default_root_dir that already holds a finished run's summary.json.",
        )
        method = next(a for a in parser._actions if a.dest == "model.method")
        method.help = f"the method, a preset (case-insensitive): {', '.join(PRESETS)}. (default: unipelt_apl)"
        method.metavar = "{" + ",".join(PRESETS) + "}"
        # One train-loss point per optimizer step: few-shot runs have a handful of steps per epoch.
        # Lightning's model table counts parameters its own way; the summary gives the one figure we use.
        parser.set_defaults({"trainer.log_every_n_steps": 1, "trainer.enable_model_summary": False})
        for key, value in self.ckpt_defaults.items():
            try:
                parser.set_defaults({key: value})
            except (KeyError, TypeError, ValueError):  # a setting this version no longer has: its default stays
                pass

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_argument(
                "--predictions",
                type=str | None,
                default=None,
                help="Where predictions go: with --data.predict_file a .csv, .tsv or .jsonl file (input columns, "
                "prediction, prob_<label>); for a GLUE task a folder of leaderboard files (RTE.tsv, ...). "
                "Default: <run folder>/predictions/.",
            )
        return parser

    def _parse_ckpt_path(self) -> None:
        """Lightning would load the checkpoint's hyperparameters over the command line here (a pickle
        traceback for a bad file; a checkpoint of another method or backbone silently taking over).
        Here the configuration states the run: the file is only checked (readable, written by unipelt),
        and `before_<subcommand>` says which of method, backbone and task differs, if any."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and str(ckpt_path) not in _SPECIAL_CKPT:
            load_checkpoint_file(ckpt_path, mmap=True)

    def _keep_help_texts(self) -> None:
        """Keep each subcommand's help (help_cache_file) from this run's parser, which is the one a bare
        `SUBCOMMAND --help` builds: not when a checkpoint's settings became its defaults, nor for the
        instruction CLI (whose options `fit --help` does not show)."""
        if type(self) is not UniPELTCLI or self.ckpt_defaults or os.environ.get("LOCAL_RANK", "0") != "0":
            return
        action = getattr(self.parser, "_subcommands_action", None)
        for name, parser in (action._name_parser_map.items() if action is not None else ()):
            path = help_cache_file([name, "--help"])
            if path is None or path.exists():
                continue
            if not _store_help(path, parser.format_help()):
                return

    def before_instantiate_classes(self) -> None:
        self._keep_help_texts()
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        if self.subcommand == "predict":
            if config.trainer.devices not in ("auto", 1, "1", None) or config.trainer.num_nodes != 1:
                raise UsageError("predict runs on one device: pass --trainer.devices 1")
            config.trainer.logger = False  # predicting leaves no version_N folder in the run folder
            config.trainer.devices = 1
            if config.trainer.default_root_dir is None and config.ckpt_path:
                config.trainer.default_root_dir = str(run_folder_of(config.ckpt_path))
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(default_run_dir(config))
        if self.subcommand == "fit":
            summary = Path(config.trainer.default_root_dir) / SUMMARY_FILE
            if summary.exists() and not config.overwrite:
                raise UsageError(
                    f"--trainer.default_root_dir {str(summary.parent)!r} already holds a finished run "
                    f"({SUMMARY_FILE}); pass --overwrite true or choose another folder"
                )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.logger in (None, True):
            trainer.loggers = _loggers(trainer.default_root_dir)
        trainer.callbacks.append(EpochTimer())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    # ------------------------------------------------------------------ checks before anything is written
    def _check_inputs(self) -> None:
        """Everything that can be wrong with the input, checked before Lightning writes a log folder or a
        checkpoint: the tokenizer, max_seq_length against the backbone, the data files (parsed by
        prepare_data on the first process of a node) and a --ckpt_path (readable, ours, the same run)."""
        model, dm = self.model, self.datamodule
        path = model.hparams.model_name_or_path
        try:
            tokenizer = dm.tokenizer
        except Exception as err:  # transformers raises OSError, ValueError, TypeError... for a bad folder
            raise ModelConfigError(
                f"--model.model_name_or_path {str(path)!r}: no usable tokenizer ({_first_line(err)})"
            ) from None
        # transformers 5 makes an empty tokenizer (special tokens only) for a folder without tokenizer files.
        probe = tokenizer("the of and a to in is", add_special_tokens=False)["input_ids"]
        if tokenizer.unk_token_id is not None and all(i == tokenizer.unk_token_id for i in probe):
            raise ModelConfigError(
                f"--model.model_name_or_path {str(path)!r}: no usable tokenizer (its vocabulary is empty: "
                "tokenizer files missing?)"
            )
        embeddings = model.model.get_input_embeddings().num_embeddings
        if len(tokenizer) > embeddings:
            raise ModelConfigError(
                f"--model.model_name_or_path {str(path)!r}: the tokenizer has {len(tokenizer)} tokens but the "
                f"model embeds only {embeddings} (tokenizer files of another model?)"
            )
        if dm.hparams.max_seq_length > model.max_input_length:
            raise UsageError(
                f"--data.max_seq_length {dm.hparams.max_seq_length} is over the {model.max_input_length} "
                f"positions of --model.model_name_or_path {str(path)!r}"
            )
        if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP: the other ranks wait for it inside the trainer
            dm.stage = self.subcommand
            dm.prepare_data()
        self._check_ckpt_path()

    def _check_ckpt_path(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path is None:
            return
        if ckpt_path == "last":
            # Resolved here: Lightning looks in the trainer's own checkpoint folders before the model's
            # callbacks (which write to <default_root_dir>/checkpoints) are attached, and finds nothing.
            folder = Path(self.trainer.default_root_dir) / "checkpoints"
            found = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
            if not found:
                if self.subcommand != "fit":
                    raise UsageError(f"--ckpt_path last: no last*.ckpt in {str(folder)!r}")
                print(f"--ckpt_path last: no checkpoint in {str(folder)!r} yet; training from the start", flush=True)
                self.config_init[self.subcommand]["ckpt_path"] = None
                return
            ckpt_path = str(found[-1])
            self.config_init[self.subcommand]["ckpt_path"] = ckpt_path
        elif ckpt_path in _SPECIAL_CKPT:
            return
        checkpoint = load_checkpoint_file(ckpt_path, mmap=True)
        try:
            self.model.check_checkpoint(checkpoint)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(f"--ckpt_path {str(ckpt_path)!r}: {err}") from None

    def before_validate(self) -> None:
        self._check_inputs()

    def before_test(self) -> None:
        self._check_inputs()

    def before_predict(self) -> None:
        self._check_inputs()
        target = self.config.predict.get("predictions")
        if self.datamodule.predict_file is not None and target is not None and Path(target).suffix.lower() not in (
            ".csv",
            ".tsv",
            ".jsonl",
            ".json",
        ):
            raise UsageError(f"--predictions {target!r}: give a .csv, .tsv or .jsonl file for --data.predict_file")

    def predict(self, **kwargs: Any) -> None:
        outputs = self.trainer.predict(**kwargs)
        dm = self.datamodule
        target = self.config.predict.get("predictions")
        if target is None:
            folder = Path(self.trainer.default_root_dir) / "predictions"
            target = str(folder / f"{Path(dm.predict_file).stem}.csv") if dm.predict_file else str(folder)
        written = write_predictions(outputs, dm, self.model.task_info, Path(target))
        for path in written:
            print(f"predictions: {path}", flush=True)

    def fit(self, **kwargs: Any) -> None:
        try:
            self.trainer.fit(**kwargs)
        except FloatingPointError as err:
            kept = [
                str(p)
                for c in self.trainer.checkpoint_callbacks
                for p in (getattr(c, "last_model_path", ""), c.best_model_path)
                if p and Path(p).exists()
            ]
            where = f"; the last good checkpoints are kept: {', '.join(dict.fromkeys(kept))}" if kept else ""
            raise TrainingDiverged(f"training stopped: {err}{where}") from None

    def after_fit(self) -> None:
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        fit_time = time.perf_counter() - self._fit_start
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt else ""
        # Read before `test`: it attaches fresh callbacks from configure_callbacks, without fit's scores.
        best_score = float(ckpt.best_model_score) if ckpt and ckpt.best_model_score is not None else None
        if trainer.interrupted:
            return
        test_start = time.perf_counter()
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        test_time = time.perf_counter() - test_start
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call: every rank
        self._write_summary(results, best, best_score, fit_time, test_time, log_dir)

    def before_fit(self) -> None:
        self._check_inputs()
        self._fit_start = time.perf_counter()

    @rank_zero_only
    def _write_summary(
        self,
        results: list[dict[str, float]],
        best: str,
        best_score: float | None,
        fit_time: float,
        test_time: float,
        log_dir: Path,
    ) -> None:
        trainer, model, dm = self.trainer, self.model, self.datamodule
        timer = next(c for c in trainer.callbacks if isinstance(c, EpochTimer))
        test = {k: float(v) for r in results for k, v in r.items() if not k.endswith("/loss")}
        export = None
        if model.hparams.method != "finetune":  # fine-tuning: the checkpoint is the model
            export = save_pretrained(
                model.model,
                Path(trainer.default_root_dir) / "export",
                base_model_name_or_path=str(model.hparams.model_name_or_path),
                task=model.task_info.name,
                k_shot=dm.hparams.k_shot,
                metrics=test,
                gates=model.last_test_gates,
            )
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        groups = optimizer.param_groups if optimizer is not None else [{}]
        learning_rate = groups[0].get("initial_lr", groups[0].get("lr", model.learning_rate))
        summary = {
            "task": model.task_info.name,
            "k_shot": dm.hparams.k_shot,
            "method": model.hparams.method,
            "head": model.pelt_config.head,
            "data_seed": dm.hparams.seed,
            "seed": self.config.fit.seed_everything,
            "model_name_or_path": str(model.hparams.model_name_or_path),
            "learning_rate": float(learning_rate),
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "labels": list(model.task_info.label_names),
            "test_split": "validation" if getattr(dm, "test_is_validation", False) else "test",
            "best_val": {"name": model.main_metric, "value": best_score},
            "test": test,
            "best_checkpoint": best,
            "exported_weights": str(export) if export else None,
            **model.parameter_counts(),
            "epochs": trainer.current_epoch,
            "global_steps": trainer.global_step,
            "fit_time_s": fit_time,
            "train_time_per_epoch_s": sum(timer.epoch_times) / max(1, len(timer.epoch_times)),
            "test_time_s": test_time,
            "test_examples": model.last_test_examples,
            "gates": model.last_test_gates,
        }
        write_json_atomic(Path(trainer.default_root_dir) / SUMMARY_FILE, summary)
        print_summary(summary)
        if summary["gates"]:
            from lightning_modules.gate_plot import plot_gate_heatmap

            title = f"{summary['task']} K={summary['k_shot'] or 'full'} {summary['method']}: mean gate on the test set"
            png = plot_gate_heatmap(summary["gates"], Path(trainer.default_root_dir) / "gates.png", title)
            print(f"gates      : {png}" if png else "gates      : (no heatmap: pip install matplotlib)", flush=True)


def print_summary(summary: dict[str, Any]) -> None:
    best = summary["best_val"]
    lines = [
        "",
        f"== UniPELT run: {summary['task']} K={summary['k_shot'] or 'full'} method={summary['method']} "
        f"(split seed {summary['data_seed']}, training seed {summary['seed']}) ==",
        f"best dev   : {best['name']} = {best['value'] if best['value'] is None else round(best['value'], 4)}",
        *(f"test       : {k} = {v:.4f}" for k, v in sorted(summary["test"].items())),
        *(["(no test file: the test scores are the validation split's)"] if summary["test_split"] != "test" else []),
        f"checkpoint : {summary['best_checkpoint'] or '(none)'}",
        f"weights    : {summary['exported_weights'] or '(fine-tuning: the checkpoint is the model)'}",
        f"trainable  : {summary['trainable_params']:,} parameters, {summary['trainable_pct']:.2f}% of the "
        f"backbone's {summary['backbone_params']:,}",
        f"optimizer  : {summary['optimizer']}, learning rate {summary['learning_rate']:g}",
        f"time       : fit {summary['fit_time_s']:.1f}s over {summary['epochs']} epochs, "
        f"test {summary['test_time_s']:.1f}s",
    ]
    print("\n".join(lines), flush=True)


def build_cli(args: list[str] | None, run: bool = True) -> UniPELTCLI:
    """The CLI object (tests and the grid runner reach trainer, model and datamodule through it)."""
    argv = sys.argv[1:] if args is None else list(args)
    subcommand, ckpt_path = _find_ckpt_path(argv)
    defaults = {}
    if subcommand in ("validate", "test", "predict") and ckpt_path and ckpt_path not in _SPECIAL_CKPT:
        defaults = checkpoint_defaults(subcommand, ckpt_path)
    _quiet_libraries()
    return UniPELTCLI(
        UniPELTLightningModule,
        TextDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        parser_kwargs={"description": TOP_HELP.split("\n\n")[1]},
        ckpt_defaults=defaults,
    )


def _quiet_libraries() -> None:
    """No advertising and no bars for work that takes milliseconds; warnings a user can act on stay."""
    import logging
    import warnings

    os.environ.setdefault("LITMODELS_DISABLE_TIPS", "1")
    for message in (
        ".*tensorboardX.*",  # we attach our own loggers (CSV, TensorBoard when installed)
        ".*isinstance\\(treespec, LeafSpec\\).*",  # Lightning internals vs torch's pytree
        ".*callbacks used to create the checkpoint need to be provided.*",  # only fit uses them
        ".*will save all targets and predictions in the buffer.*",  # Spearman on dev/test-sized sets: by design
    ):
        warnings.filterwarnings("ignore", message=message)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" for a few dozen tensors


class _NoTips:
    def filter(self, record: Any) -> bool:
        text = str(record.getMessage())
        return not (text.startswith("💡 Tip") or "litmodels" in text or "LitLogger" in text)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if _top_level_help(argv):
        print(TOP_HELP, end="")
        sys.exit(0)
    if argv and argv[0] in ("reproduce", "select", "report"):
        from reproduce import main as reproduce_main

        sys.exit(reproduce_main(argv))
    from lightning_modules.instruct_cli import build_instruct_cli, is_instruct_run  # decoders, instruction data

    build = build_instruct_cli if is_instruct_run(argv) else build_cli
    try:
        with _keep_help(argv):
            build(None if args is None else argv)
    except USER_ERRORS as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)
    except HubUnreachableError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(HUB_EXIT_CODE)
    except TrainingDiverged as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT_CODE)


@contextlib.contextmanager
def _keep_help(argv: list[str]) -> Iterator[None]:
    """Around a `SUBCOMMAND --help` call: print as usual and keep the text for the next call (help_cache_file)."""
    path = help_cache_file(argv)
    if path is None:
        yield
        return
    _print_cached_help(argv)  # main() called in-process (tests): the module-level fast path did not run
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
            _store_help(path, shown.getvalue())
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


if __name__ == "__main__":
    # Run the `cli` module, not `__main__`: lightning_modules.instruct_cli subclasses this file's CLI and
    # raises its errors, which must be the classes main() catches.
    from cli import main as cli_main

    cli_main()
