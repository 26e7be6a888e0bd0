"""The per-batch watchdog: a rank that makes no progress is ended, with its stacks dumped."""

from __future__ import annotations

import faulthandler
import time

REARM_SHARE = 8  # the timer is re-armed after 1/REARM_SHARE of the timeout has passed


class Watchdog:
    """Ends a rank that makes no progress for `seconds`: every thread's stack goes to stderr,
    then the process exits, and the MPI launcher ends the others (whose own watchdogs fire too
    if they were waiting on it). faulthandler's timer thread needs no GIL, so a rank stuck
    inside a framework call is caught as well.

    Arming faulthandler's timer starts a thread, too costly for every batch: `kick` re-arms
    it only once 1/REARM_SHARE of the timeout has passed since it was last armed, for the
    timeout plus that share. So a rank is ended between `seconds` and `seconds` × (1 +
    1/REARM_SHARE) after its last progress.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._slack = seconds / REARM_SHARE
        self._armed = float("-inf")
        self.kick()

    def kick(self) -> None:
        if self.seconds > 0 and time.monotonic() - self._armed >= self._slack:
            faulthandler.dump_traceback_later(self.seconds + self._slack, exit=True)
            self._armed = time.monotonic()

    def stop(self) -> None:
        faulthandler.cancel_dump_traceback_later()
