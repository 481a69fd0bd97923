"""Claiming a folder with a lock file, so that two processes never write one run: `fit` locks its run folder,
the grid (reproduce/) each run it hands to a worker.

A claim is an ``O_CREAT | O_EXCL`` create, which the filesystem makes atomic. The file holds
``host pid``; a lock whose process is gone (same host) is stale and may be reclaimed. Reclaiming
goes through a second short-lived O_EXCL file so that two reclaimers cannot both remove the
stale lock and each believe they hold the new one. The file follows the umask, as every file we write.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

_HOST = socket.gethostname()
EMPTY_GRACE_S = 30.0  # a lock still empty after this long was left by a process killed mid-claim


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{_HOST} {os.getpid()}\n")
    return True


def is_stale(path: Path) -> bool:
    """True when the lock's owner is known to be dead (or it is an old empty file)."""
    try:
        text = path.read_text().split()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return False
    if len(text) != 2:
        return time.time() - mtime > EMPTY_GRACE_S
    host, pid = text
    return host == _HOST and pid.isdigit() and not _pid_alive(int(pid))


def claim(path: Path) -> bool:
    """Try to take ``path``; reclaims a stale lock. Returns whether this process now holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if _create(path):
        return True
    if not is_stale(path):
        return False
    guard = path.with_name(path.name + ".reclaim")
    if not _create(guard):
        if is_stale(guard):  # a reclaimer died inside the guard; clear it, retry on a later pass
            guard.unlink(missing_ok=True)
        return False
    try:
        if is_stale(path):
            path.unlink(missing_ok=True)
        return _create(path)
    finally:
        guard.unlink(missing_ok=True)


def holder(path: Path) -> str:
    """Who holds ``path``: "process 123 on host x" (or what the file says, when it is not ours)."""
    try:
        text = path.read_text().split()
    except OSError:
        return "another process"
    if len(text) == 2 and text[1].isdigit():
        return f"process {text[1]} on {'this host' if text[0] == _HOST else 'host ' + repr(text[0])}"
    return "a process that is still writing its lock"


def release(path: Path) -> None:
    """Drop a lock this process holds (one another process took over is left alone)."""
    try:
        if path.read_text().split() != [_HOST, str(os.getpid())]:
            return
    except OSError:
        return
    path.unlink(missing_ok=True)
