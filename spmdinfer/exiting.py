"""How a rank of the `spmdinfer` command leaves once its run is over: its atexit hooks run,
MPI is finalized (and MPICH's launcher told so), and the process exits with its code,
without the interpreter's teardown.

The teardown frees what the process's exit frees anyway, and with MindSpore loaded it is
slow: about 0.45 s of CPU a process on this 2-core machine (a script that loads a MindIR
slice and predicts once exits 0.45 s later with `sys.exit` than with `os._exit`), which
for 8 ranks on 2 cores was 2 of an 8-rank start's 15 s (docs/performance.md, "Start-up").
Nothing of the run is left to it: the output is closed and renamed, the journal and the
lock are closed, and every thread left is a daemon.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import select
import stat
import sys
import time
from typing import NoReturn

from .topology import under_hydra


def mpi_started() -> bool:
    """Whether this process initialized MPI (`run` does; `validate`, `plan` and `inspect`
    never do)."""
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and mpi.Is_initialized()


def leave(code: int) -> NoReturn:
    """Flush, run the atexit hooks, finalize MPI, tell MPICH's launcher, exit with `code`.

    What the teardown would still have done is not done: a file a job's preprocess or
    postprocess module keeps open at module level is not closed by it (close it in the
    function, or with an atexit hook, which does run)."""
    flush()
    atexit._run_exitfuncs()  # logging's flush among them; comm's may finalize MPI itself
    flush()  # what the hooks printed
    from mpi4py import MPI

    if MPI.Is_initialized():
        if not MPI.Is_finalized():
            MPI.Finalize()
        tell_hydra_finalized(MPI.Get_library_version())
    os._exit(code)


def flush() -> None:
    """Python's streams, then C's stdio buffers (what native code printed)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def tell_hydra_finalized(library: str) -> None:
    """Do what MPICH's C atexit handler would: tell MPICH's launcher (hydra) over PMI-1 that
    this process has finalized.

    MPICH 5 sends its PMI finalize from a C atexit handler, not from MPI_Finalize, and
    os._exit runs no such handler. hydra takes a process that exits without it for one that
    failed, and kills every other rank of the job still running: a finished job ended "Killed
    (signal 9)", exit 9 (docs/collectives.md). libc's exit() would run the handler, but also
    MindSpore's C++ static destructors, which crashed every time (SIGSEGV). Only under hydra
    (`topology.under_hydra`, with its PMI_FD), which speaks PMI-1 there, however its proxy was
    started. Other launchers are not told: Open MPI finalizes PMIx inside MPI_Finalize, and
    srun's PMI-2 took MPICH ranks that exit this way for finished ones in every Slurm test
    (tests/test_slurm.py). (The test was once hydra's
    HYDI_CONTROL_FD, set only where mpiexec forks the proxy itself: under `-launcher slurm` or
    ssh every rank exited untold, and a rank slower to exit than the first was killed now and
    then, "exit 9" for a finished job.)
    """
    fd = os.environ.get("PMI_FD", "")
    if not (library.startswith("MPICH") and fd.isdigit() and under_hydra()):
        return
    try:
        if not stat.S_ISSOCK(os.fstat(int(fd)).st_mode):
            return  # closed, and the number taken by a file since (an MPICH that told hydra)
        os.write(int(fd), b"cmd=finalize\n")
        deadline = time.monotonic() + 10.0
        reply = b""
        while b"\n" not in reply and time.monotonic() < deadline:
            ready, _, _ = select.select([int(fd)], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(int(fd), 1024)
            if not chunk:
                break
            reply += chunk
    except OSError:
        pass  # the launcher is gone: nobody is left to kill the other ranks
