"""One logger for the whole tool, its lines prefixed with the rank."""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "spmdinfer"
log = logging.getLogger(LOGGER_NAME)


def setup_logging(rank: int) -> None:
    """Send the tool's log to stderr as `[rank N] LEVEL message`; SPMDINFER_LOG_LEVEL sets the level."""
    level = os.environ.get("SPMDINFER_LOG_LEVEL", "WARNING").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level if isinstance(logging.getLevelName(level), int) else "WARNING")
    log.propagate = False
