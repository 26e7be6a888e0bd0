"""Communication between the ranks of a job.

Arrays travel as raw buffers, never pickled. Every wait for a peer goes through
`Channel.wait`, which tests a nonblocking request and sleeps with a growing
backoff between tests, so ranks that wait for rank 0 do not burn a core when
ranks outnumber cores. Once a polite rendezvous shows every rank is present,
bulk transfers use the blocking calls, which then run at full speed.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from .errors import JobFailed

ROOT = 0
MIN_DELAY = 20e-6   # first sleep between two tests of a pending request
MAX_DELAY = 1e-3    # longest sleep: bounds the latency a waiting rank adds
MAX_NDIM = 32       # dims carried per output in a batch report


class Channel:
    """A private duplicate of a communicator with the few operations the runner uses."""

    def __init__(self, comm):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm.Dup()
        self.rank = self.comm.rank
        self.size = self.comm.size

    @property
    def is_root(self) -> bool:
        return self.rank == ROOT

    def close(self) -> None:
        self.comm.Free()

    def wait(self, request) -> None:
        """Complete `request`, sleeping between tests instead of spinning."""
        delay = MIN_DELAY
        while not request.Test():
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)

    def barrier(self) -> None:
        self.wait(self.comm.Ibarrier())

    def bcast_array(self, array: np.ndarray) -> None:
        """Broadcast `array` in place from the root (blocking: use after a polite rendezvous)."""
        if array.nbytes:
            self.comm.Bcast(_bytes(array), root=ROOT)

    def bcast_ints(self, values: np.ndarray) -> None:
        """Broadcast a small int64 array in place from the root, waiting politely."""
        self.wait(self.comm.Ibcast(values, root=ROOT))

    def allgather_ints(self, values: np.ndarray) -> np.ndarray:
        """Every rank's int64 vector, one row per rank, waiting politely."""
        table = np.empty((self.size, values.size), dtype=np.int64)
        self.wait(self.comm.Iallgather(values, table))
        return table

    def bcast_object(self, obj: Any) -> Any:
        """Broadcast a small picklable object (metadata only) from the root."""
        self.barrier()
        return self.comm.bcast(obj, root=ROOT)

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Gather small picklable objects (metadata only) on the root, in rank order."""
        self.barrier()
        return self.comm.gather(obj, root=ROOT)

    def gather_concat(self, array: np.ndarray, shapes: Sequence[tuple[int, ...]],
                      axis: int) -> np.ndarray | None:
        """Concatenate every rank's `array` (shapes known from the batch report) on the root."""
        counts = [int(np.prod(s)) * array.itemsize for s in shapes]
        if not self.is_root:
            self.comm.Gatherv(_bytes(array), None, root=ROOT)
            return None
        received = np.empty(sum(counts), dtype=np.uint8)
        displacements = np.cumsum([0] + counts[:-1])
        self.comm.Gatherv(_bytes(array), [received, counts, displacements, self._mpi.BYTE],
                          root=ROOT)
        parts = [received[d:d + c].view(array.dtype).reshape(s)
                 for d, c, s in zip(displacements, counts, shapes)]
        return np.concatenate(parts, axis=axis)

    def reduce_sum(self, array: np.ndarray) -> np.ndarray | None:
        """Elementwise sum of every rank's `array` on the root."""
        array = np.ascontiguousarray(array)
        result = np.empty_like(array) if self.is_root else None
        self.comm.Reduce(array, result, op=self._mpi.SUM, root=ROOT)
        return result

    def agree(self, error: BaseException | None, code: int = 0) -> None:
        """Raise JobFailed on every rank if `error` is set on any rank.

        Every rank must call this at the same point. The root learns each rank's
        message and host, so it can print the first failure once.
        """
        import socket

        report = None if error is None else (code or 2, str(error), socket.gethostname())
        reports = self.gather_objects(report)
        failed = None
        if self.is_root:
            failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
        failed = self.bcast_object(failed)
        if failed:
            raise job_failed(failed, self.size)


def job_failed(failed: list[tuple[int, tuple[int, str, str]]], size: int) -> JobFailed:
    """One JobFailed that names the first failing rank (and how many others failed)."""
    rank, (code, message, host) = failed[0]
    where = f"rank {rank} ({host}): " if size > 1 else ""
    others = f" [and {len(failed) - 1} more rank(s) failed]" if len(failed) > 1 else ""
    return JobFailed(f"{where}{message}{others}", max(c for _, (c, _, _) in failed))


def _bytes(array: np.ndarray) -> np.ndarray:
    """A flat byte view of a contiguous array, so any dtype travels as MPI.BYTE."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)
