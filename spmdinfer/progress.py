"""Rank 0's progress display: a tqdm bar on a terminal, a plain line now and then in a log."""

from __future__ import annotations

import os
import sys
import time

PLAIN_INTERVAL = float(os.environ.get("SPMDINFER_PROGRESS_INTERVAL", "10"))


class Progress:
    """Counts rows done; draws only where `enabled` (rank 0)."""

    def __init__(self, total_rows: int, enabled: bool, stream=None):
        self._stream = stream or sys.stderr
        self._total = total_rows
        self._done = 0
        self._bar = None
        self._enabled = enabled
        self._start = self._last = time.monotonic()
        if enabled and self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_rows, unit="rows", unit_scale=True, file=self._stream,
                             dynamic_ncols=True, desc="spmdinfer")

    def update(self, rows: int) -> None:
        self._done += rows
        if self._bar is not None:
            self._bar.update(rows)
            return
        now = time.monotonic()
        if self._enabled and now - self._last >= PLAIN_INTERVAL:
            self._last = now
            rate = self._done / max(now - self._start, 1e-9)
            percent = 100.0 * self._done / self._total if self._total else 100.0
            print(f"spmdinfer: {self._done}/{self._total} rows ({percent:.1f}%), {rate:.1f} rows/s",
                  file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
