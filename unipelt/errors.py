"""The exceptions unipelt raises for input it cannot work with or output it cannot write, and how an error
becomes one line."""


class PELTError(ValueError):
    """A configuration, model or checkpoint that unipelt cannot work with; the message says why."""


class OutputError(OSError):
    """An output that cannot be written where it was asked for (a folder where a file goes, a parent that is a
    file, a folder we may not write in, an input of the run, a full disk); the message names the file, and
    whatever was there before is unchanged. An OSError, so code catching those still does."""


def one_line(err: BaseException | str, limit: int = 200) -> str:
    """The first line of an error's message (its type's name when it has none), at most ``limit`` characters:
    what a one-line refusal quotes of an error raised by a library."""
    text = str(err).strip()
    if not text:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    first = text.splitlines()[0].strip()
    return first if len(first) <= limit else first[: limit - 3] + "..."
