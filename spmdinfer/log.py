"""One logger for the whole tool, its lines prefixed with the rank."""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "spmdinfer"
log = logging.getLogger(LOGGER_NAME)


class RankFormatter(logging.Formatter):
    """Every line of a record, tracebacks included, starts with `[rank N]`."""

    def __init__(self, rank: int):
        super().__init__("%(levelname)s %(message)s")
        self.prefix = f"[rank {rank}] "

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(self.prefix + line for line in super().format(record).splitlines())


def setup_logging(rank: int) -> None:
    """Send the tool's log to stderr as `[rank N] LEVEL message`; SPMDINFER_LOG_LEVEL sets the level."""
    level = os.environ.get("SPMDINFER_LOG_LEVEL", "WARNING").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RankFormatter(rank))
    log.handlers[:] = [handler]
    log.setLevel(level if isinstance(logging.getLevelName(level), int) else "WARNING")
    log.propagate = False
