"""Writing a file so that a reader never sees half of it and a failure leaves the old one intact.

The one place that writes beside a target and renames it into place: exports, checkpoints,
summaries, predictions and the grid's records all go through `atomic_write`. `tempfile.mkstemp`
creates its file with mode 0600 whatever the umask; the written file gets the mode `open()` would
have given it (0666 less the umask), so a run folder meant for sharing is readable by the team.
A write that fails for the disk's reason (full, read-only, no permission) is an `OutputError` naming
the file, and `check_output` refuses a destination that cannot be written before any work is done.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import OutputError

# What the disk (not the code) says when a write fails: full, over quota, read-only, not permitted, broken.
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG,
                         errno.ENOTDIR, errno.EISDIR})


def umask() -> int:
    """This process's umask (read without changing it where /proc tells it; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, fsync: bool = False,
                 **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    ``mode``: ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``. ``fsync``: flush the
    data to disk before the rename (checkpoints: a crash right after must not leave an empty file).
    On any error the temporary file is removed and ``path`` is as it was; an error of the disk (full,
    read-only, ...) becomes an `OutputError` naming ``path``.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~umask())
            if "b" not in mode:
                open_kwargs.setdefault("encoding", "utf-8")
            f = os.fdopen(fd, mode, **open_kwargs)
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        failure = os_error_in(err)
        if failure is None or failure.errno not in DISK_ERRORS or isinstance(err, OutputError):
            raise
        raise write_failed(path, failure) from None


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself, or the one it was raised during or from (torch's zip writer reports
    a full disk as a RuntimeError raised while handling the OSError)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def write_failed(path: str | os.PathLike, failure: OSError) -> OutputError:
    """The one line for a write the disk refused: which file, and why."""
    reason = failure.strerror or str(failure) or type(failure).__name__
    error = OutputError(f"{str(path)!r} could not be written: {reason} (what was there before is unchanged)")
    error.errno = failure.errno
    return error


def check_output(path: str | os.PathLike, *, folder: bool = False, option: str | None = None,
                 inputs: Mapping[str, Any] | None = None) -> Path:
    """``path`` if it can be written, else `OutputError` in one line naming it: checked before the work that
    produces it, so a bad destination costs nothing.

    Refused: a folder where a file goes (``folder`` False) or a file where a folder goes; a parent that
    is a file; a folder this process may not write in; an existing file or folder that is one of ``inputs``
    (what the run reads, by the option naming it: ``{"--data.predict_file": "rows.csv"}``) or lies inside
    an input folder (an input is never an output). An existing file that is not an input is replaced (atomically).
    """
    path = Path(path)
    name = f"{option} {str(path)!r}" if option else repr(str(path))
    if path.is_dir() and not folder:
        raise OutputError(f"{name} is a folder; give a file name")
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"{name} is a file, not a folder")
    if path.exists():  # a file, or a folder files go into
        for what, source in (inputs or {}).items():
            if source is not None and _is_or_holds(Path(str(source)).expanduser(), path):
                inside = Path(str(source)).expanduser().is_dir() and not os.path.samefile(source, path)
                raise OutputError(f"{name} is {'inside the input folder' if inside else 'the input'} {what} "
                                  f"{str(source)!r}; an input is never overwritten: write elsewhere")
    folder_of_path = path if folder else path.parent
    existing = folder_of_path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{name}: {str(existing)!r} is a file, so nothing can be created under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{name}: the folder {str(existing)!r} is not writable")
    return path


def _is_or_holds(source: Path, path: Path) -> bool:
    """Whether ``path`` (an existing file or folder) is ``source`` or lies inside the folder ``source``."""
    try:
        if source.is_dir():
            return path.resolve().is_relative_to(source.resolve())
        return source.is_file() and os.path.samefile(source, path)
    except OSError:
        return False


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented, key-sorted JSON, written atomically."""
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> str:
    """``tensors`` (name -> torch tensor) as a safetensors file, written atomically (CPU, contiguous copies).
    Returns the file's SHA-256 (safetensors has no checksum of its own: a record keeps it)."""
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()
