"""User-facing errors.

Every error a user can cause (a bad recipe key, an impossible shape, a missing or corrupt file, an
attempt to overwrite a run) raises :class:`WeightsmithError` with a one-line message that names the
field or file and says what is allowed. The CLI prints that line and exits with status 2; Python callers
can catch the exception.
"""


class WeightsmithError(Exception):
    """A problem with the user's input, reported as one line (no traceback) by the CLI."""


class ConfigError(WeightsmithError, ValueError):
    """A config field is unknown, has the wrong type, or holds an impossible value."""


class DataError(WeightsmithError):
    """A corpus, shard or manifest is missing, corrupt or inconsistent."""


class CheckpointError(WeightsmithError):
    """A checkpoint or run directory is missing, corrupt, or would be overwritten."""


class TrainingInterrupted(WeightsmithError):
    """Training stopped on SIGINT or SIGTERM after checkpointing its last finished step."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingDiverged(WeightsmithError):
    """Training kept becoming unstable (non-finite or spiking losses) after the allowed rewinds, or had no
    checkpoint to rewind to (weightsmith.train.stability)."""


class DistributedError(WeightsmithError):
    """A rank of a distributed run died or stopped answering within ``train.dist_timeout``, so the
    others stop too (weightsmith.train.distributed)."""
