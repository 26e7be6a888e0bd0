"""spmdinfer: score big offline HDF5 datasets with sharded models, one slice per MPI rank.

Importing this package is cheap: it starts no MPI and imports no deep-learning
framework; `run_job` does that when called.
"""

__version__ = "0.1.0"

from .errors import SpmdinferError  # noqa: E402
from .spec import JobSpec, load_spec  # noqa: E402


def run_job(spec, comm=None, **options):
    """Run a parsed job on the ranks of `comm` (see spmdinfer.runner.run_job)."""
    from .runner import run_job as _run_job

    return _run_job(spec, comm, **options)


__all__ = ["JobSpec", "SpmdinferError", "__version__", "load_spec", "run_job"]
