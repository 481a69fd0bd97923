"""`python cli.py fit|validate|test|predict`: UniPELT on a GLUE task, your own data or instruction data.

The entry point only: it answers `--help` without loading torch, sends `reproduce`, `select` and
`report` to reproduce/ and `slim` to lightning_modules/slim.py, chooses the kind of run
(lightning_modules.kinds.choose_kind) and runs it through the one CLI of lightning_modules/. `fit`
trains, keeps the best checkpoint by the task's main dev metric, tests it and writes
`<trainer.default_root_dir>/summary.json` and `export/`; `validate`, `test` and `predict` take their
settings from `--ckpt_path` (a config and flags win). The console script `unipelt` is this file.
"""

from __future__ import annotations

import sys

from lightning_modules.help import TOP_HELP, keep_help, print_kept_help

REPRODUCE_COMMANDS = ("reproduce", "select", "report")
SLIM_COMMAND = "slim"  # lightning_modules/slim.py: a trained run slimmed (unipelt.slim) and exported


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(TOP_HELP, end="")
        sys.exit(0)
    if argv[0] in REPRODUCE_COMMANDS:
        from reproduce import main as reproduce_main

        sys.exit(reproduce_main(argv))
    if argv[0] == SLIM_COMMAND:
        from lightning_modules import slim

        sys.exit(slim.main(argv[1:]))
    print_kept_help(argv)  # `SUBCOMMAND --help` seen before: printed without importing torch
    from lightning_modules import kinds, run

    def work(kind: kinds.RunKind) -> None:
        with keep_help(argv):
            run.build_cli(None if args is None else argv, kind=kind)

    status = run.run_or_refuse(argv, work)  # a refusal: its one `error:` line alone on stderr, exit 2
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
