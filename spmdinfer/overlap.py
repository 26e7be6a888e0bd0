"""Input and output in the background, so a stage-0 leader predicts batch b while batch b+1
is read and rank 0 predicts while finished batches are committed.

h5py reads and file writes release the GIL for the I/O itself, and the frameworks
release it inside predict, so one thread of each kind is enough. Errors in the
background threads are raised in the main thread at its next call.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Sequence

import numpy as np

from .input import InputField, InputReader
from .errors import DataError, HookError
from .hooks import Hook, preprocess_into
from .topology import pin_thread

# Buffer sets of a root that sends its batches by message: one being predicted (and sent),
# one being sent ahead, one being read; as many as a shared-memory group has slots. With two,
# the read of batch b+1 often had not finished when the root had predicted b (both cores busy
# predicting on emulated hosts), and b+1 then travelled while both ranks waited.
PREFETCH_DEPTH = 3
COMMIT_DEPTH = 4     # finished batches that may wait for their commit


class Prefetcher:
    """Reads the batches at `starts`, in order, ahead of their use, into reused buffer sets
    (PREFETCH_DEPTH of them, or the `buffer_sets` given: a group's shared-memory slots)."""

    def __init__(self, reader: InputReader, fields: Sequence[InputField], starts: Sequence[int],
                 batch_size: int, rows: int, timed: Callable | None = None,
                 buffer_sets: Sequence[list[np.ndarray]] | None = None, pre: Hook | None = None,
                 cores: frozenset[int] = frozenset()):
        """`fields`: what the model gets. With `pre` (the job's preprocess) each batch is read
        into buffers of the input's own fields first, and what `pre` returns fills the set.
        `cores`: where the reading thread runs (RankInfo.helper_cores)."""
        self._reader = reader
        self._fields = list(fields)
        self._pre = pre
        self._raw = None if pre is None else [f.buffer(max(1, min(batch_size, rows)))
                                               for f in reader.fields]
        for buffer in self._raw or ():
            buffer[:1] = 0
        self._starts = list(starts)
        self._batch_size = batch_size
        self._rows = rows
        self._timed = timed  # wraps each read (metrics)
        capacity = max(1, min(batch_size, rows))
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        if buffer_sets is None:
            buffer_sets = [[f.buffer(capacity) for f in fields] for _ in range(PREFETCH_DEPTH)]
        for slot, buffers in enumerate(buffer_sets):
            for buffer in buffers:
                buffer[:1] = 0  # a job with no rows predicts one zero row, to learn output shapes
            self._free.put((slot, buffers))
        self._sets = dict(enumerate(buffer_sets))
        self._closed = False
        self._cores = cores
        self._thread = threading.Thread(target=self._run, name="spmdinfer-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pin_thread(self._cores)
        for start in self._starts:
            item = self._free.get()
            if item is None or self._closed:
                return
            slot, buffers = item
            stop = min(start + self._batch_size, self._rows)
            try:
                if self._timed is None:
                    self._fill(start, stop, buffers)
                else:
                    with self._timed():  # a preprocess counts as reading: the batch is not ready yet
                        self._fill(start, stop, buffers)
            except (DataError, HookError) as exc:
                self._ready.put(exc)
                return
            self._ready.put((start, stop - start, buffers, slot))
        self._ready.put(None)

    def _fill(self, start: int, stop: int, buffers: list[np.ndarray]) -> None:
        """Rows [start, stop) into `buffers`: read, then preprocessed where the job says."""
        read = buffers if self._pre is None else self._raw
        try:
            self._reader.read(start, stop, read)
        except Exception as exc:
            raise DataError(f"reading rows {start}..{stop - 1} of {self._reader.file_path}: "
                            f"{exc}") from None
        if self._pre is not None:
            preprocess_into(self._pre, self._fields, self._reader.fields, start, stop - start,
                            read, buffers)

    def next(self) -> tuple[int, int, list[np.ndarray], int] | None:
        """The next batch (start, rows, buffers, slot: which buffer set), or None when there
        are no more. Give the slot back with `release` once its arrays are no longer in use."""
        item = self._ready.get()
        if isinstance(item, Exception):
            raise item
        return item

    def ready(self) -> bool:
        """Whether `next` would return without waiting for a read."""
        return not self._ready.empty()

    def release(self, slot: int) -> None:
        """The buffer set `slot` may be read into again."""
        self._free.put((slot, self._sets[slot]))

    def close(self) -> None:
        """Stop reading ahead and wait for a read in progress: the file may be closed next."""
        self._closed = True
        self._free.put(None)
        self._thread.join()


class Committer:
    """Runs `commit(start, arrays)` for finished batches in a background thread, in order,
    after `first()` if given."""

    def __init__(self, commit: Callable[[int, Sequence[np.ndarray]], None],
                 first: Callable[[], None] | None = None, cores: frozenset[int] = frozenset()):
        self._commit = commit
        self._cores = cores
        self._first = first
        self._queue: queue.Queue = queue.Queue(COMMIT_DEPTH)
        self._error: BaseException | None = None
        self._done: list[int] = []  # rows of each committed batch, collected by `committed`
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="spmdinfer-commit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pin_thread(self._cores)
        if self._first is not None:
            try:
                self._first()
            except BaseException as exc:
                self._error = exc
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            start, arrays = item
            try:
                self._commit(start, arrays)
            except BaseException as exc:
                self._error = exc
                continue
            with self._lock:
                self._done.append(len(arrays[0]) if arrays else 0)

    def put(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        """Queue one finished batch (waits while COMMIT_DEPTH batches are queued)."""
        self._raise()
        self._queue.put((start, arrays))

    def committed(self) -> list[int]:
        """The row counts of the batches committed since the last call."""
        self._raise()
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self) -> list[int]:
        """Wait for every queued commit; the row counts of those not yet reported."""
        self._queue.put(None)
        self._thread.join()
        return self.committed()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
