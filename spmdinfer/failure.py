"""What a failing rank reports: its error and the exit code, with a crash's traceback logged."""

from __future__ import annotations

from .errors import SpmdinferError
from .log import log
from .topology import RankInfo


def reported(exc: BaseException, info: RankInfo | None) -> tuple[BaseException, int]:
    """The error to report for `exc` and its exit code; crashes get their traceback logged."""
    if isinstance(exc, SpmdinferError):
        return exc, exc.exit_code
    log.error("unexpected error%s", f" on {info}" if info else "", exc_info=exc)
    return RuntimeError(f"{type(exc).__name__}: {exc}"), 1
