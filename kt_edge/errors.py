"""Errors a user can fix: the CLI prints them as one line and exits non-zero, without a traceback."""


class KtEdgeError(Exception):
    """Base of every error caused by input, not by a bug; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class RecipeError(KtEdgeError):
    """A recipe key or value is wrong: refused before any compute."""

    exit_code = 2


class DataError(KtEdgeError):
    """Images or a split cannot be used as asked."""

    exit_code = 2


class CheckpointError(KtEdgeError):
    """A checkpoint is missing, unsafe or does not fit the model."""

    exit_code = 2


class TrainingError(KtEdgeError):
    """Training cannot go on (a NaN loss, say); the last good checkpoint is kept."""


class RunDirBusy(KtEdgeError):
    """Another command holds the run directory: nothing was read or written."""


class Interrupted(KtEdgeError):
    """SIGINT or SIGTERM: finished work (a resume point, finished shards, whole artifacts) is kept."""

    exit_code = 130
