"""The one error type the data module raises for bad settings or bad data files."""


class DataConfigError(ValueError):
    """A bad option or data file, told in one line that names the option (or file:line) and the bad value.

    A ValueError so that argument parsers and CLIs report it like any other bad argument.
    """
