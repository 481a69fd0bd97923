"""The one exception unipelt raises for input it cannot work with."""


class PELTError(ValueError):
    """A configuration, model or checkpoint that unipelt cannot work with; the message says why."""
