"""The one exception unipelt raises for input it cannot work with, and how an error becomes one line."""


class PELTError(ValueError):
    """A configuration, model or checkpoint that unipelt cannot work with; the message says why."""


def one_line(err: BaseException | str, limit: int = 200) -> str:
    """The first line of an error's message (its type's name when it has none), at most ``limit`` characters:
    what a one-line refusal quotes of an error raised by a library."""
    text = str(err).strip()
    if not text:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    first = text.splitlines()[0].strip()
    return first if len(first) <= limit else first[: limit - 3] + "..."
