"""The run pipeline's errors: input a user can fix (one line, exit code 2) and a run that diverged.

Light on purpose (no torch): `cli.py` answers `--help` from here without loading the libraries.
"""


class UsageError(ValueError):
    """A bad command-line value, reported in one line with exit code 2."""


class ModelConfigError(ValueError):
    """A bad `--model.*` value (a path that is not a model, a bad option), told in one line."""


class CheckpointFileError(ValueError):
    """A --ckpt_path that is missing, truncated, not a torch checkpoint, or not written by unipelt."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to the configured run (method, backbone or task differ)."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf: one line on stderr, exit code 1; the last good checkpoint stays."""
