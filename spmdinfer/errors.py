"""The exception tree: every error a user can act on derives from SpmdinferError."""

from __future__ import annotations


class SpmdinferError(Exception):
    """An error in the user's job, files or launch: one line to the user, exit code 2."""

    exit_code = 2


class SpecError(SpmdinferError):
    """The job file is not valid TOML or does not follow the job-file contract."""


class DataError(SpmdinferError):
    """An input or output HDF5 file, dataset or path is missing or does not fit."""


class BackendError(SpmdinferError):
    """A model slice cannot be loaded or does not fit the job."""


class HookError(SpmdinferError):
    """A job's preprocess or postprocess function raised, or returned what does not fit."""


class WorldSizeError(SpmdinferError):
    """The MPI world size does not fit the job's layout."""


class OutputExistsError(DataError):
    """The output file exists and neither --overwrite nor --resume was given."""


class JobFailed(SpmdinferError):
    """Raised on every rank once the ranks agree that some rank failed.

    The failing rank's message has already been printed by rank 0; this carries
    the exit code every rank leaves with.
    """

    def __init__(self, message: str, exit_code: int, batch: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.batch = batch  # the first row of the batch that failed, where one did


class PeerFailed(JobFailed):
    """Raised on a rank that learns of a failure every rank already knows about
    (an agreed start-up check, or another rank's failure notice)."""
