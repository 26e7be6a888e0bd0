"""Where each rank's time goes: totals per activity for `--metrics`, spans for `--trace`.

Activities: load, read, bcast, predict, combine, write, and wait (the part of bcast,
combine and receiving spent waiting for a peer; it is also inside those spans).
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

ACTIVITIES = ("load", "read", "bcast", "predict", "combine", "write", "wait")


class Recorder:
    """One rank's clock: seconds per activity, and (when tracing) every span."""

    def __init__(self, trace: bool = False):
        self.totals: dict[str, float] = defaultdict(float)
        self.spans: list[tuple[str, float, float]] | None = [] if trace else None
        self._loop_cpu: float | None = None
        # Seconds per start-up phase, from "launch" (the process's start to this recorder:
        # interpreter, imports, MPI_Init) to "assemble" (the loop's communicators, shared memory).
        self.startup: dict[str, float] = {"launch": since_process_start()}

    @contextmanager
    def phase(self, name: str):
        """One start-up phase (spmdinfer.startup), timed for `startup_seconds`."""
        began = time.monotonic()
        try:
            yield
        finally:
            self.startup[name] = self.startup.get(name, 0.0) + time.monotonic() - began

    def start_loop(self) -> None:
        """The loop starts: from here on this process's CPU time is the loop's."""
        self._loop_cpu = _cpu_seconds()

    @contextmanager
    def span(self, activity: str):
        began = time.time()
        try:
            yield
        finally:
            self.add(activity, began, time.time() - began)

    def add(self, activity: str, began: float, seconds: float) -> None:
        self.totals[activity] += seconds
        if self.spans is not None:
            self.spans.append((activity, began, seconds))

    def report(self, rank: int, host: str) -> dict:
        """This rank's totals, peak RSS and spans, to be gathered on rank 0."""
        return {
            "rank": rank, "host": host,
            "seconds": {a: round(self.totals.get(a, 0.0), 6) for a in ACTIVITIES},
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            # CPU seconds (all threads) from the first batch to this report: over the loop's
            # wall time, the cores this rank used while scoring.
            "loop_cpu_seconds": None if self._loop_cpu is None else
            round(_cpu_seconds() - self._loop_cpu, 6),
            "startup_seconds": {k: round(v, 6) for k, v in self.startup.items()},
            "spans": self.spans,
        }


def since_process_start() -> float:
    """Seconds since this process started (Linux: its start time in /proc, on the boot
    clock; 0.0 elsewhere)."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_metrics(path: Path, summary, reports: list[dict]) -> None:
    """The --metrics JSON: the run's totals and, per rank, seconds per activity, peak RSS,
    the loop's CPU seconds and the seconds of each start-up phase."""
    data = {
        "rows": summary.rows, "batches": summary.batches, "outcome": summary.outcome,
        "wall_seconds": round(summary.seconds, 6),
        "load_seconds": round(summary.load_seconds, 6),
        "rows_per_second": round(summary.rows_per_second, 3),
        "ranks": [{k: v for k, v in r.items() if k != "spans"} for r in reports],
    }
    _write_json(path, data)


def write_trace(path: Path, reports: list[dict]) -> None:
    """Chrome trace-event JSON (opens in Perfetto or chrome://tracing): one track per rank."""
    origin = min((s[1] for r in reports for s in r["spans"] or ()), default=0.0)
    events = []
    for r in reports:
        events.append({"name": "process_name", "ph": "M", "pid": r["rank"],
                       "args": {"name": f"rank {r['rank']} ({r['host']})"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": r["rank"],
                       "args": {"sort_index": r["rank"]}})
        for activity, began, seconds in r["spans"] or ():
            events.append({"name": activity, "cat": activity, "ph": "X", "pid": r["rank"],
                           "tid": 0, "ts": round((began - origin) * 1e6, 1),
                           "dur": round(seconds * 1e6, 1)})
    _write_json(path, {"traceEvents": events, "displayTimeUnit": "ms"})


def _write_json(path: Path, data: dict) -> None:
    path = Path(path)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(data, indent=1))
    temp.replace(path)
