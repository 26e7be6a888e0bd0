"""The per-batch watchdog: a rank that makes no progress ends the job, its stacks dumped."""

from __future__ import annotations

import ctypes
import faulthandler
import threading
import time
from typing import Callable

from .log import log
from .topology import node_name

REARM_SHARE = 8  # faulthandler's timer is re-armed after 1/REARM_SHARE of the timeout has passed
GRACE_SECONDS = 5.0  # faulthandler's timer fires this long after the watchdog thread should have
THREAD_NAME = "spmdinfer-watch"  # also the OS thread's name (top -H, gdb, /proc/PID/task/*/comm)


class Watchdog:
    """Ends the job when this rank makes no progress for `seconds`.

    A thread (asleep but for once a timeout) compares the time of the last progress with
    `seconds`. Past it, the rank logs one line, dumps every thread's stack and calls
    `abort` (failure.abort: MPI_Abort, or under MPICH's launcher a SIGKILL of this rank),
    so that the launcher ends every rank on every host.
    So a rank waiting on a frozen peer ends that peer too, wherever it runs: MPICH's
    launcher ends only the failed rank's own host when a rank merely exits with an error,
    and srun without --kill-on-bad-exit ends nothing.

    A rank stuck in native code that holds the GIL gives the thread no chance: there
    faulthandler's timer, which needs no GIL, dumps the stacks and exits the process
    GRACE_SECONDS later. Arming it starts a thread, too costly for every batch: `kick`
    re-arms it only once 1/REARM_SHARE of the timeout has passed since it was last armed.
    """

    def __init__(self, seconds: float, abort: Callable[[], None]):
        self.seconds = seconds
        self.abort = abort
        self._slack = seconds / REARM_SHARE
        self._last = time.monotonic()
        self._armed = float("-inf")
        self._stopped = threading.Event()
        if seconds > 0:
            threading.Thread(target=self._watch, name=THREAD_NAME, daemon=True).start()
        self.kick()

    def kick(self) -> None:
        """This rank made progress."""
        self._last = now = time.monotonic()
        if self.seconds > 0 and now - self._armed >= self._slack:
            faulthandler.dump_traceback_later(self.seconds + self._slack + GRACE_SECONDS,
                                              exit=True)
            self._armed = now

    def stop(self) -> None:
        self._stopped.set()
        faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        _name_os_thread(THREAD_NAME)
        while not self._stopped.wait(max(0.05, self._last + self.seconds - time.monotonic())):
            idle = time.monotonic() - self._last
            if idle < self.seconds or self._stopped.is_set():
                continue
            log.error("no progress on %s for %.1f s ([run] batch_timeout = %g): this rank's "
                      "stacks follow, then the job is aborted on every rank", node_name(), idle,
                      self.seconds)
            faulthandler.dump_traceback(all_threads=True)
            self.abort()
            return


def _name_os_thread(name: str) -> None:
    """Give the calling thread `name` where the OS shows it (Linux: 15 bytes at most)."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
