"""`cli.py slim --ckpt_path C --min_gate G --out DIR [--data.* ...]`: a trained run, slimmed and exported.

The run is rebuilt from the checkpoint's settings (as `validate` rebuilds it: backbone, method, task, data
split; `--data.*` and `--config` win), its trained tensors loaded, and `unipelt.slim` calibrates every gate
on the dev split (the validation loader), removes the parts whose mean gate is below G, fixes the rest and
folds what folds. Writes ``DIR/`` (`unipelt.save_pretrained`: loads back with `unipelt.from_pretrained`),
``DIR/slim.md`` (layers by gates: each part's mean gate and whether it was removed, folded or kept as a
module; the largest logit and probability differences on the calibration examples) and ``DIR/slim.csv``
(one row per gate).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_modules.errors import UsageError

if TYPE_CHECKING:
    from lightning_modules.kinds import RunKind

TABLES = ("slim.md", "slim.csv")  # written in --out beside the export's files: what each layer kept
USAGE = "cli.py slim --ckpt_path CKPT --out DIR [--min_gate G] [--data.* / --config options of validate]"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as every other refusal of the CLI
        raise UsageError(f"slim: {message} (usage: {USAGE})")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our three options; the rest goes to the run's own parser (`--data.*`, `--config`, `--trainer.*`)."""
    parser = _Parser(prog="cli.py slim", usage=USAGE, description=(
        "Remove the parts of a trained run whose mean gate on its dev split is below --min_gate, fix the other "
        "gates, fold what folds, and write an export (unipelt.from_pretrained loads it) with slim.md and slim.csv: "
        "what each layer kept. Other options are validate's (--data.*, --config): they choose the calibration "
        "data, by default the checkpoint's dev split."))
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of a `cli.py fit` run (best.ckpt)")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write the slimmed export into")
    parser.add_argument("--min_gate", type=float, default=0.1,
                        help="remove every part whose mean gate on the dev split is below this (default 0.1)")
    options, rest = parser.parse_known_args(argv)
    if not 0 <= options.min_gate <= 1:
        raise UsageError(f"--min_gate {options.min_gate}: a gate is a number in [0, 1]")
    return options, rest


def main(argv: list[str]) -> int:
    """The subcommand: parsed before torch loads (``--help`` is instant); a refusal is one line, exit 2."""
    try:
        options, rest = parse(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from lightning_modules.run import run_or_refuse

    return run_or_refuse(["--ckpt_path", str(options.ckpt_path), *rest], lambda kind: slim_run(options, rest, kind))


def slim_run(options: argparse.Namespace, rest: list[str], kind: RunKind) -> int:
    """The work, once the options parsed: every input and destination checked before the calibration."""
    import unipelt
    from lightning_modules.checkpointing import load_checkpoint_file
    from lightning_modules.kinds import MULTITASK
    from lightning_modules.run import PELTCLI, checkpoint_defaults, release_held_stderr
    from unipelt.atomic import atomic_write, check_output
    from unipelt.io import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME

    if kind is MULTITASK:  # its gates differ per task: slim one task's model (unipelt.slim of an export's task)
        raise UsageError(f"--ckpt_path {options.ckpt_path!r}: a multi-task run; slim takes a single-task run "
                         "(unipelt.slim takes one task of its export: unipelt.from_pretrained(folder, task=...))")
    checkpoint = load_checkpoint_file(options.ckpt_path)
    cli = PELTCLI(kind, args=[*rest, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"],
                  run=False, ckpt_defaults=checkpoint_defaults("validate", checkpoint, kind))
    module, data = cli.model, cli.datamodule
    module.load_trainable(checkpoint)
    if module.hparams.method == "finetune":
        raise UsageError(f"--ckpt_path {options.ckpt_path!r}: a fine-tuned run has no submodules to slim")
    inputs = {**cli.inputs(), "--ckpt_path": options.ckpt_path}  # the export never replaces what the run reads
    check_output(options.out, folder=True, option="--out", inputs=inputs)
    for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, *TABLES):
        check_output(options.out / name, option="--out: its", inputs=inputs)
    release_held_stderr()
    data.setup("validate")
    slimmed = unipelt.slim(module.model, data.val_dataloader(), min_gate=options.min_gate)
    report = slimmed.pelt_slim_report
    unipelt.save_pretrained(slimmed, options.out, base_model_name_or_path=str(module.hparams.model_name_or_path),
                            task=module.task_name, k_shot=data.hparams.k_shot, min_gate=options.min_gate,
                            max_abs_logit_difference=report.max_logit_diff, gates=report.kept)
    markdown, table = TABLES
    with atomic_write(options.out / markdown) as f:
        f.write(f"# `{module.hparams.method}` slimmed at min_gate {options.min_gate}\n\n"
                f"Checkpoint: `{options.ckpt_path}`; gates calibrated on the dev split.\n\n{report.markdown()}")
    with atomic_write(options.out / table) as f:
        f.write(table_csv(report.rows()))
    print(report.markdown(), end="")
    print(f"wrote {options.out}/ (unipelt.from_pretrained loads it), {markdown} and {table}")
    return 0


def table_csv(rows: list[dict[str, object]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["layer", "gate"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
