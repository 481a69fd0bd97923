"""One CLI for every run: `fit`, `validate`, `test`, `predict` of a classifier or of an instruction-tuned decoder.

`kinds.choose_kind` says which classes a command line runs; everything else is this one pipeline,
`PELTCLI`: the run folder and overwrite rules, the checkpoint's settings as defaults, `--ckpt_path
last` and the checkpoint checks, atomic checkpoints, loggers, the checks made before anything is
written, the summary (`summary.RunSummary`) and predictions gathered from every rank
(`predictions.PredictionWriter`).

A refusal is one `error:` line on stderr and exit status 2, whatever refused: the input, a destination,
the network, the disk. Until the checks pass, stderr is held back (`HeldStderr`), so the line is the
only one a refusal prints; a run that passed them prints what was held, then goes on.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins import TorchCheckpointIO

from datamodules import DataConfigError, HubUnreachableError
from datamodules.multitask import predict_tasks
from lightning_modules import locks
from lightning_modules.checkpointing import CHECKPOINT_KEY, AtomicCheckpointIO, RunRecord, load_checkpoint_file
from lightning_modules.compat import CLIWithCheckpointCheck
from lightning_modules.errors import (
    CheckpointFileError,
    CheckpointMismatchError,
    ModelConfigError,
    TrainingDiverged,
    UsageError,
)
from lightning_modules.help import (
    DESCRIPTION,
    HELP_SUBCOMMANDS,
    help_cache_file,
    store_help,
    subcommand_parser_kwargs,
)
from lightning_modules.kinds import CLASSIFICATION, MULTITASK, SPECIAL_CKPT, RunKind, choose_kind, option_value
from lightning_modules.predictions import PredictionWriter
from lightning_modules.summary import NO_TEST_FILE_NOTE, SUMMARY_FILE, RunSummary, shown_path
from unipelt import PELTError
from unipelt.atomic import DISK_ERRORS, check_output, os_error_in
from unipelt.errors import OutputError, one_line
from unipelt.io import resolve_local

# Refusals: the input, a destination, the network or the disk, not our bug: one line on stderr, exit code 2.
REFUSALS: tuple[type[BaseException], ...] = (
    UsageError, PELTError, DataConfigError, ModelConfigError, CheckpointFileError, CheckpointMismatchError,
    OutputError, HubUnreachableError,
)
REFUSAL_EXIT_CODE = 2
DIVERGED_EXIT_CODE = 1  # training ran and stopped: not a refusal
LOCK_FILE = ".unipelt.lock"  # in the run folder while a `fit` writes it
# What a `fit` writes into its run folder, each a folder (True) or a file: checked before the work.
RUN_OUTPUTS = {"checkpoints": True, "export": True, "lightning_logs": True, SUMMARY_FILE: False, "gates.png": False,
               "config.yaml": False}

__all__ = ["PELTCLI", "SUMMARY_FILE", "build_cli", "refusal", "run_or_refuse"]


# ----------------------------------------------------------------------------- run folders and checkpoints
def default_run_dir(config: Any, kind: RunKind) -> Path:
    """One folder per distinct run, so that a method or seed switched on the command line never lands in
    another run's folder: runs/<task>_<k>/<method>/split<data seed>_seed<training seed>, every part a plain
    name (`folder_part`): nothing read from a file chooses where we write."""
    size = "full" if config.data.k_shot is None else f"k{config.data.k_shot}"
    task = folder_part(kind.folder_task(config), "the task's name (--data.name, the training file's or a checkpoint's)")
    method = folder_part(str(config.model.method).lower(), "--model.method")
    seeds = folder_part(f"split{config.data.seed}_seed{config.seed_everything}", "--data.seed or --seed_everything")
    return Path("runs") / f"{task}_{size}" / method / seeds


def folder_part(value: str, source: str) -> str:
    """``value`` if it can be one folder's name (no separator, no leading dot, no control character, at most
    100 characters), else UsageError naming ``source``: a run folder is built from such parts only."""
    if (not value or len(value) > 100 or value.startswith(".") or any(c in value for c in "/\\")
            or not value.isprintable()):
        raise UsageError(f"{value!r} ({source}) cannot name a run folder (one plain name: no '/', '\\' or leading "
                         "'.'); choose another name or give --trainer.default_root_dir")
    return value


def run_folder_of(ckpt_path: str) -> Path:
    """`<run>/checkpoints/best.ckpt` -> `<run>`; a checkpoint elsewhere -> its own folder."""
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def checkpoint_defaults(subcommand: str, checkpoint: dict[str, Any], kind: RunKind) -> dict[str, Any]:
    """The run a checkpoint records, as parser defaults for validate/test/predict (so a config file and
    flags still win): backbone, method and its settings, the task or label set, data settings."""
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
    if subcommand == "predict":  # never the files of training, nor of an earlier predict
        defaults.update({f"data.{key}": None for key in ("train_file", "validation_file", "test_file", "predict_file")})
        if isinstance(model.get("tasks"), list):  # a multi-task run's tasks as trained, without their files
            defaults["data.tasks"] = predict_tasks(model["tasks"])
    # Where we write is never the checkpoint's to say (a file a user was sent): the command line's, or ours.
    return {k: v for k, v in defaults.items() if k not in kind.link_targets and k not in kind.writes}


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


# ----------------------------------------------------------------------------- the CLI
class PELTCLI(CLIWithCheckpointCheck):
    """LightningCLI for one kind of run (see the module doc)."""

    def __init__(self, kind: RunKind, args: list[str] | None = None, run: bool = True,
                 ckpt_defaults: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.ckpt_defaults = ckpt_defaults or {}
        self._unlock: Any = lambda: None  # `fit`: releases the run folder's lock
        self.subcommand_parsers: dict[str, LightningArgumentParser] = {}
        super().__init__(
            kind.module, kind.datamodule, args=args, run=run, save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            # Each subcommand's parser is told its name (init_parser), for --predictions and the help texts.
            parser_kwargs={"description": DESCRIPTION,
                           **{name: subcommand_parser_kwargs(name) for name in HELP_SUBCOMMANDS}},
        )

    def init_parser(self, subcommand_name: str | None = None, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        if subcommand_name is not None:
            self.subcommand_parsers[subcommand_name] = parser
        if subcommand_name == "predict":
            parser.add_argument(
                "--predictions", type=str | None, default=None,
                help="Where predictions go: with --data.predict_file a .csv, .tsv or .jsonl file (input columns, "
                "prediction, prob_<label>; a decoder: JSON Lines with each row's generation); for a GLUE task a "
                "folder of leaderboard files (RTE.tsv, ...). Default: <run folder>/predictions/ "
                "(a decoder: <run folder>/generations.jsonl).",
            )
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """``args`` given (build_cli from Python: tests, a notebook) is the whole command line; the process's
        own `sys.argv` (pytest's, a kernel's) is not a second one, so Lightning's warning about both is moot."""
        self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Ours (model, data) before the Trainer's: `fit --help` lists them first."""
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # State each thing once: the backbone also gives the tokenizer; a classifier's data gives the
        # task, its labels and metrics (a GLUE task's name, or the task read from your files).
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        for link in self.kind.links:
            parser.link_arguments(**link)
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="Allow `fit` into a default_root_dir that already holds a finished run's summary.json.",
        )
        # One train-loss point per optimizer step: few-shot runs have a handful of steps per epoch.
        # Lightning's model table counts parameters its own way; the summary gives the one figure we use.
        parser.set_defaults({"trainer.log_every_n_steps": 1, "trainer.enable_model_summary": False})
        for key, value in self.ckpt_defaults.items():
            try:
                parser.set_defaults({key: value})
            except (KeyError, TypeError, ValueError):  # a setting this version no longer has: its default stays
                pass

    def check_ckpt_file(self) -> None:
        """Here the configuration states the run (the checkpoint's settings are only defaults): the file is
        checked (readable, written by unipelt); `before_<subcommand>` says what differs, if anything."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and str(ckpt_path) not in SPECIAL_CKPT:
            load_checkpoint_file(ckpt_path, mmap=True)

    def _keep_help_texts(self) -> None:
        """Keep each subcommand's help (lightning_modules.help) from this run's parsers, which are the ones
        a bare `SUBCOMMAND --help` builds: not when a checkpoint's settings became their defaults, nor for
        instruction runs (whose options `fit --help` does not show)."""
        if self.kind is not CLASSIFICATION or self.ckpt_defaults or os.environ.get("LOCAL_RANK", "0") != "0":
            return
        for name, parser in self.subcommand_parsers.items():
            path = help_cache_file([name, "--help"])
            if path is not None and not path.exists() and not store_help(path, parser.format_help()):
                return

    def before_instantiate_classes(self) -> None:
        self._keep_help_texts()
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        if self.subcommand == "predict":
            config.trainer.logger = False  # predicting leaves no version_N folder in the run folder
            if config.trainer.default_root_dir is None and config.ckpt_path:
                config.trainer.default_root_dir = str(run_folder_of(config.ckpt_path))
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(default_run_dir(config, self.kind))
        if self.kind is MULTITASK and config.trainer.strategy == "ddp":
            # Each step trains one task's head and gates: the other tasks' take no gradient in it.
            config.trainer.strategy = "ddp_find_unused_parameters_true"
        root = check_output(config.trainer.default_root_dir, folder=True, option="--trainer.default_root_dir")
        if self.subcommand == "fit":
            for name, is_folder in RUN_OUTPUTS.items():
                check_output(root / name, folder=is_folder, option="--trainer.default_root_dir: its")
            summary = root / SUMMARY_FILE
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
        bar = trainer.progress_bar_callback
        if type(bar) is RichProgressBar and "RichProgressBar" not in str(config.trainer.get("callbacks")):
            # Lightning draws Rich bars when rich is installed (transformers pulls it in), while transformers,
            # datasets and gguf draw tqdm bars: one kind per run, unless the user asked for Rich.
            trainer.callbacks[trainer.callbacks.index(bar)] = TQDMProgressBar()
        trainer.callbacks += [RunSummary(seed=config.seed_everything), RunRecord(seed=config.seed_everything)]
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
                f"--model.model_name_or_path {str(path)!r}: no usable tokenizer ({one_line(err)})"
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
        check_output(dm.cache_dir, folder=True, option="--data.cache_dir")
        self._check_ckpt_path()
        if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP: the other ranks wait for it inside the trainer
            dm.stage = self.subcommand
            dm.prepare_data()
        release_held_stderr()  # checked: what the libraries said so far may be shown

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
        elif ckpt_path in SPECIAL_CKPT:
            return
        checkpoint = load_checkpoint_file(ckpt_path, mmap=True)
        try:
            self.model.check_checkpoint(checkpoint)
            if self.subcommand == "fit":
                self._check_same_run(checkpoint)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(f"--ckpt_path {str(ckpt_path)!r}: {err}") from None

    def _check_same_run(self, checkpoint: dict[str, Any]) -> None:
        """A resumed `fit` goes on with the checkpoint's own run: the same training seed and every setting
        of the model and data (the method's, the data's: which rows, split seed, batch size...) but those
        `RunKind.free_on_resume` names. CheckpointMismatchError lists what differs."""
        saved = {"seed_everything": checkpoint[CHECKPOINT_KEY].get("seed", "unrecorded")}
        here = {"seed_everything": self.config[self.subcommand].seed_everything}
        for section, stored, current in (
            ("model", checkpoint.get("hyper_parameters"), self.model.hparams),
            ("data", checkpoint.get("datamodule_hyper_parameters"), self.datamodule.hparams),
        ):
            saved.update({f"{section}.{k}": v for k, v in (stored or {}).items() if not k.startswith("_")})
            here.update({f"{section}.{k}": v for k, v in dict(current).items() if not k.startswith("_")})
        saved.pop("model.task", None)  # the data's, compared as data.* (and by check_checkpoint)
        if saved["seed_everything"] == "unrecorded":  # written before checkpoints recorded the seed
            del saved["seed_everything"]

        def same(a: Any, b: Any) -> bool:
            return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

        differ = [f"--{key} {saved[key]!r} there, {here[key]!r} here" for key in here
                  if key in saved and key not in self.kind.free_on_resume and not same(saved[key], here[key])]
        if differ:
            raise CheckpointMismatchError(
                f"another run's checkpoint ({'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}): resume "
                "with that run's settings, or fit into another --trainer.default_root_dir"
            )

    # ------------------------------------------------------------------ the subcommands
    def before_fit(self) -> None:
        self._unlock = self._lock_run_folder()
        try:
            self._check_inputs()
        except BaseException:
            self._unlock()
            raise

    def _lock_run_folder(self) -> Any:
        """Claim the run folder for this `fit` (`locks`: a lock of a dead process is taken over): a second run
        into it is refused, naming the process that writes it. Returns the release, called when the run ends
        (and at exit, whatever ended it); a refusal leaves neither the lock nor a folder it created."""
        if os.environ.get("LOCAL_RANK", "0") != "0":  # DDP: rank 0 holds it for every rank
            return lambda: None
        folder = Path(self.trainer.default_root_dir)
        lock, created = folder / LOCK_FILE, not folder.exists()
        if not locks.claim(lock):
            raise UsageError(f"--trainer.default_root_dir {str(folder)!r} is being written by {locks.holder(lock)}; "
                             "wait for that run to end, or fit into another folder")

        def release() -> None:
            locks.release(lock)
            if created and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

        atexit.register(release)
        return release

    def fit(self, **kwargs: Any) -> None:
        try:
            self.trainer.fit(**kwargs)
        except BaseException as err:
            self._unlock()
            if not isinstance(err, FloatingPointError):
                raise
            kept = [
                shown_path(p)
                for c in self.trainer.checkpoint_callbacks
                for p in (getattr(c, "last_model_path", ""), c.best_model_path)
                if p and Path(p).exists()
            ]
            where = f"; the last good checkpoints are kept: {', '.join(dict.fromkeys(kept))}" if kept else ""
            raise TrainingDiverged(f"training stopped: {err}{where}") from None

    def after_fit(self) -> None:
        """Test the best checkpoint (every rank); RunSummary writes the summary when that test ends."""
        trainer = self.trainer
        try:
            if trainer.interrupted or not self.model.tests_after_fit(self.datamodule):
                return
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
        finally:
            self._unlock()

    def before_validate(self) -> None:
        self._check_inputs()

    def before_test(self) -> None:
        self._check_inputs()

    def after_test(self) -> None:
        """As `fit`'s summary does: without test data the scores printed under "test" are the validation rows'."""
        if getattr(self.datamodule, "test_is_validation", False) and self.trainer.is_global_zero:
            print(NO_TEST_FILE_NOTE, flush=True)

    def before_predict(self) -> None:
        target = self.model.predictions_path(self.datamodule, self.config.predict.get("predictions"),
                                             Path(self.trainer.default_root_dir))
        files = self.model.check_predictions(self.datamodule, target)
        inputs = self.inputs()
        for path in {target, *files}:
            check_output(path, folder=path not in files, option="--predictions", inputs=inputs)
        self._check_inputs()
        self.trainer.callbacks.append(PredictionWriter(target))

    def inputs(self) -> dict[str, Any]:
        """What this run reads, by the option naming it (a file, or a folder such as the backbone's): never an
        output."""
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        found: dict[str, Any] = {"--ckpt_path": config.get("ckpt_path")}
        found.update({f"--config {i}": str(path) for i, path in enumerate(config.get("config") or [])})
        for section in ("model", "data"):
            for key, value in (config.get(section) or {}).items():
                if isinstance(value, str) and value and f"{section}.{key}" not in self.kind.writes:
                    try:
                        found[f"--{section}.{key}"] = resolve_local(value)
                    except PELTError:
                        continue
        return found

    def predict(self, **kwargs: Any) -> None:
        self.trainer.predict(**{**kwargs, "return_predictions": False})  # PredictionWriter writes them


# ----------------------------------------------------------------------------- building and answering
def build_cli(args: list[str] | None, run: bool = True, kind: RunKind | None = None) -> PELTCLI:
    """The CLI object (tests and the grid runner reach trainer, model and datamodule through it).

    ``args`` None: the process's command line. ``kind`` None: `choose_kind`'s."""
    argv = sys.argv[1:] if args is None else list(args)
    kind = kind or choose_kind(argv)
    subcommand = next((a for a in argv if a in HELP_SUBCOMMANDS), None)
    ckpt_path = option_value(argv, "--ckpt_path")
    defaults = {}
    if subcommand in ("validate", "test", "predict") and ckpt_path and ckpt_path not in SPECIAL_CKPT:
        defaults = checkpoint_defaults(subcommand, load_checkpoint_file(ckpt_path, mmap=True), kind)
    _quiet_libraries()
    cli = PELTCLI(kind, args=args, run=run, ckpt_defaults=defaults)
    if run:
        leave_process_group()
    return cli


def leave_process_group() -> None:
    """Under DDP, every rank ends the command together and closes its process group: a rank that exits while
    the other's gloo threads still hold their connection can abort at exit ("terminate called without an
    active exception", exit -6 after a finished `predict`). Lightning leaves the group open."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_or_refuse(argv: list[str], work: Callable[[RunKind], int | None]) -> int:
    """The exit status of ``work(kind)`` (the kind of run ``argv`` asks for), run with the libraries quieted and
    stderr held until its checks pass (`held_stderr`): a refusal prints one `error:` line, alone, and returns 2
    (`refusal`); any other exception is raised (a traceback then helps). Every CLI command goes through it."""
    kind = CLASSIFICATION
    _quiet_libraries()
    with held_stderr() as held:
        try:
            kind = choose_kind(argv)
            return work(kind) or 0
        except Exception as err:
            answer = refusal(err, kind)
            if answer is None:
                raise
            held.discard()
            status, line = answer
            print(f"error: {line}", file=sys.stderr)
            return status


def refusal(err: BaseException, kind: RunKind = CLASSIFICATION) -> tuple[int, str] | None:
    """(exit status, one line) for an error that is the input's, a destination's, the network's, the disk's or a
    diverged run's rather than our bug; None for anything else (a traceback then helps)."""
    if isinstance(err, REFUSALS):
        return REFUSAL_EXIT_CODE, user_message(err, kind)
    if isinstance(err, TrainingDiverged):
        return DIVERGED_EXIT_CODE, user_message(err, kind)
    failure = os_error_in(err)
    if failure is not None and failure.errno in DISK_ERRORS:  # written by a library, not through atomic_write
        where = f"{failure.filename!r} " if failure.filename else ""
        return REFUSAL_EXIT_CODE, f"{where}could not be written: {failure.strerror or failure}"
    return None


def user_message(err: BaseException, kind: RunKind = CLASSIFICATION) -> str:
    """One line; the data module says `k_shot=0: ...`, which the command line knows as `--data.k_shot`."""
    text = " ".join(str(err).split()) or type(err).__name__
    match = re.match(r"(\w+)=", text)
    if isinstance(err, DataConfigError) and match and f"--data.{match.group(1)}" in kind.options:
        text = "--data." + text
    return text


class HeldStderr:
    """Holds what is written to stderr (file descriptor 2: Python's warnings and logging, progress bars,
    C libraries) in a temporary file until `release` shows it, or `discard` drops it (a refusal, whose
    `error:` line is then the only line on stderr). `held_stderr` opens one for a CLI run."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._held = tempfile.TemporaryFile()
        os.dup2(self._held.fileno(), 2)

    def _restore(self, show: bool) -> None:
        if self._held.closed:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        if show:
            self._held.seek(0)
            while chunk := self._held.read(1 << 16):
                os.write(2, chunk)
        self._held.close()

    def release(self) -> None:
        self._restore(show=True)

    def discard(self) -> None:
        self._restore(show=False)


_HELD: list[HeldStderr] = []


@contextmanager
def held_stderr() -> Iterator[HeldStderr]:
    """Hold stderr for a CLI run until its checks pass (`release_held_stderr`); whatever is still held when
    the run ends is shown (a parser's usage message, a traceback), unless it was discarded."""
    held = HeldStderr()
    _HELD.append(held)
    try:
        yield held
    finally:
        _HELD.remove(held)
        held.release()


def release_held_stderr() -> None:
    """The checks passed: show what was held and write to stderr directly from now on."""
    for held in _HELD:
        held.release()


def _quiet_libraries() -> None:
    """No advertising and no bars for work that takes milliseconds; warnings a user can act on stay."""
    import logging

    os.environ.setdefault("LITMODELS_DISABLE_TIPS", "1")
    for message in (
        ".*tensorboardX.*",  # we attach our own loggers (CSV, TensorBoard when installed)
        ".*isinstance\\(treespec, LeafSpec\\).*",  # Lightning internals vs torch's pytree
        ".*_pytree.*",  # the same, as torch words its deprecation
        ".*callbacks used to create the checkpoint need to be provided.*",  # only fit uses them
        ".*will save all targets and predictions in the buffer.*",  # Spearman on dev/test-sized sets: by design
        ".*is smaller than the logging interval.*",  # few-shot epochs: the epoch's mean loss is logged anyway
        ".*LightningCLI's args parameter is intended.*",  # `slim` hands the run's parser its own options on purpose
        ".*Checkpoint directory .* exists and is not empty.*",  # resuming: the lock and the resume check own the folder
    ):
        warnings.filterwarnings("ignore", message=message)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" for a few dozen tensors


# Lightning's notes on what we set up on purpose (our callbacks replace the trainer's, the schedule counts
# the loader's batches, checkpoints restore the trained tensors): nothing a user can act on.
_CHATTER = ("The following callbacks returned in `LightningModule.configure_callbacks`",
            "Loading `train_dataloader` to estimate number of stepping batches",
            "Restoring states from the checkpoint path", "Loaded model weights from the checkpoint")


class _NoTips:
    def filter(self, record: Any) -> bool:
        text = str(record.getMessage())
        return not (text.startswith("💡 Tip") or "litmodels" in text.lower() or "litlogger" in text.lower()
                    or text.startswith(_CHATTER))
