"""The one error type the data modules raise for bad settings or bad data files, and its helpers."""

from __future__ import annotations


class DataConfigError(ValueError):
    """A bad option or data file, told in one line that names the option (or file:line) and the bad value.

    A ValueError so that argument parsers and CLIs report it like any other bad argument.
    """


def first_line(err: BaseException, limit: int = 200) -> str:
    """What a one-line refusal quotes of a library's error: its message's first line, else its type's name.

    (`unipelt.errors.one_line` does the same for the layers above; datamodules does not import unipelt.)"""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def check_integers(**settings: tuple[int | None, int]) -> None:
    """`name=(value, lowest)`: each value set is a whole number (not a bool) >= its lowest; None is unset."""
    for name, (value, low) in settings.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise DataConfigError(f"{name}={value!r}: must be an integer >= {low}")
