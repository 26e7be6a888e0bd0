"""The per-batch watchdog: a rank that makes no progress is ended, with its stacks dumped."""

from __future__ import annotations

import faulthandler


class Watchdog:
    """Ends a rank that makes no progress for `seconds`: every thread's stack goes to stderr,
    then the process exits, and the MPI launcher ends the others (whose own watchdogs fire too
    if they were waiting on it). faulthandler's timer thread needs no GIL, so a rank stuck
    inside a framework call is caught as well."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.kick()

    def kick(self) -> None:
        if self.seconds > 0:
            faulthandler.dump_traceback_later(self.seconds, exit=True)

    def stop(self) -> None:
        faulthandler.cancel_dump_traceback_later()
