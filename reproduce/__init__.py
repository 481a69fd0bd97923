"""Reproducing the paper's tables: ``unipelt reproduce`` (the grid), ``unipelt select`` (learning
rates chosen on dev) and ``unipelt report``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = ("reproduce", "select", "report")
USAGE = "usage: unipelt {reproduce,select,report} ... (see `unipelt <command> --help`)"


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``reproduce`` / ``select`` / ``report``; ``argv`` starts at the subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "reproduce":
        from .grid import main as run
    elif argv[0] == "select":
        from .selection import main as run
    else:
        from .report import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
