"""What a failing rank reports (its error and the exit code, with a crash's traceback logged),
and how a rank that cannot wait for the others ends the job."""

from __future__ import annotations

import math
import os
import signal
import sys
from typing import NoReturn

from .errors import SpmdinferError
from .log import log
from .topology import RankInfo, under_hydra


def reported(exc: BaseException, info: RankInfo | None) -> tuple[BaseException, int]:
    """The error to report for `exc` and its exit code; crashes get their traceback logged."""
    if isinstance(exc, SpmdinferError):
        return exc, exc.exit_code
    log.error("unexpected error%s", f" on {info}" if info else "", exc_info=exc)
    return RuntimeError(f"{type(exc).__name__}: {exc}"), 1


def abort(comm, code: int = 1) -> NoReturn:
    """End every rank of the job, on every host, now: MPI_Abort, but under MPICH's launcher
    (hydra) this rank kills itself instead (SIGKILL).

    hydra's mpiexec, told of an MPI_Abort, tells the other hosts' proxies nothing: it waits
    for their launchers to end (HYD_pmiserv_abort), and the SIGKILL it sends them after 1 s
    picks each launcher by the index of its output pipe, two pipes a host against one pid
    (bscu_wait.c, MPICH 4.1 to 5.0). So with a rank frozen on a third host the frozen rank,
    its proxy and mpiexec stayed for good (tests/test_multihost.py). A rank that dies of a
    signal takes hydra's other path, the one kill -9 takes: mpiexec closes every proxy's
    connection and each proxy kills its ranks, frozen ones included (every process gone in
    2.4 s over three emulated hosts). mpiexec then exits 9 or 255, its "BAD TERMINATION"
    banner under this rank's own message. Open MPI's mpirun and srun end every host's ranks
    on MPI_Abort."""
    if under_hydra():
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    comm.Abort(code)
    raise AssertionError("MPI_Abort returned")  # it does not


def bound_exit(seconds: float) -> None:
    """End this process with SIGALRM if it has not exited `seconds` from now: for a rank of
    the `spmdinfer` command whose run is over, never for a caller of the library.

    Past the run's last barrier (runner, under the watchdog) only the exit is left, and
    with it MPI_Finalize, which waits for every rank while it holds the GIL: no thread of
    this process runs meanwhile, so the watchdog could not end a job whose rank froze just
    there. The kernel can: a rank dead of a signal is a failed rank to every launcher,
    which ends the job on every host (hydra's mpiexec reports "EXIT CODE: 14"). The
    output is complete by then; `seconds <= 0` (the watchdog off) leaves the exit unbounded."""
    if seconds > 0:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(max(1, math.ceil(seconds)))
