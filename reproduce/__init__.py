"""Reproducing the paper's tables: ``unipelt reproduce`` (the grid) and ``unipelt report``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = "usage: unipelt {reproduce,report} ... (see `unipelt reproduce --help`, `unipelt report --help`)"


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``reproduce`` / ``report``; ``argv`` starts at the subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("reproduce", "report"):
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "reproduce":
        from .grid import main as run
    else:
        from .report import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
