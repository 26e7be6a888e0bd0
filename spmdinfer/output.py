"""Rank 0's output: its path checked before any model loads, and the HDF5 file written
under a temporary name (FILE.partial) and renamed only when complete."""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import numpy as np

from .direct_io import DirectRows, direct_rows, pwrite_from
from .errors import DataError, OutputExistsError
from .spec import OutputSpec

MAX_CHUNK_BYTES = 4 * 1024 * 1024      # output chunks: one batch of rows, capped at this size
SLAB_BYTES = 4 * 1024 * 1024           # output rows held back to be written in one call
PARTIAL_SUFFIX = ".partial"


def check_output_path(spec: OutputSpec, overwrite: bool) -> None:
    """Refuse an output that exists (unless `overwrite`) or that cannot be created.

    Creating is tried, not guessed: a probe file (or folder, when folders must be made)
    is made and removed in the nearest existing folder, since permission bits say
    nothing to root and nothing about /proc or read-only mounts.
    """
    path = spec.file
    try:
        if path.is_dir():
            raise DataError(f"[output] file {path} is a directory, expected a file path")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"[output] file {path} exists; pass --overwrite to replace it")
        parent = next((p for p in path.parents if p.exists()), None)
    except OSError as exc:
        raise DataError(f"[output] file {path}: cannot look at it ({exc.strerror})") from None
    if parent is None or not parent.is_dir():
        raise DataError(f"[output] file {path}: cannot create it, {parent} is not a folder")
    try:
        if parent == path.parent:
            handle, probe = tempfile.mkstemp(prefix=".spmdinfer-probe-", dir=parent)
            os.close(handle)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".spmdinfer-probe-", dir=parent))
    except OSError as exc:
        raise DataError(f"[output] file {path}: cannot create it in {parent} "
                        f"({exc.strerror or exc})") from None


class OutputWriter:
    """Rank 0's output: written to FILE.partial, renamed to FILE by `finish`.

    Uncompressed datasets (the default) get all their chunks allocated when they are
    created (HDF5's early allocation, never filled), so every row has a known place in
    the file; each batch is written there with os.pwritev, which releases the GIL, and
    HDF5 itself only writes the file's metadata. Compressed datasets go through h5py,
    which holds the GIL for the whole of each call: consecutive batches are gathered into
    slabs of up to SLAB_BYTES and written with one call per dataset.
    """

    def __init__(self, spec: OutputSpec, rows: int, batch_size: int, attrs: dict | None = None):
        """`spec.compression`: "" (none), "lzf", "gzip" or "gzip:LEVEL". `attrs`: the file's
        attributes known from the start, written now: h5py holds the GIL while it writes
        them (about 0.25 ms each), which in the writer's thread, at the first batch, held up
        every rank's loop for as long."""
        import h5py

        self.path = spec.file
        self.temp_path = spec.file.with_name(spec.file.name + PARTIAL_SUFFIX)
        self._spec = spec
        self.paths = [path for _, path in spec.datasets]  # the datasets, in the order of each batch's arrays
        self._rows = rows
        self._batch_size = batch_size
        try:
            self._file = h5py.File(self.temp_path, "w")  # the runner made the folder with the lock
        except OSError as exc:  # a folder of that name in the way, no room, no permission
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise DataError(f"[output] file {self.path}: cannot create {self.temp_path} "
                            f"({reason})") from None
        self._fd: int | None = None
        self._datasets = None
        self._places: list[DirectRows | None] = []   # per dataset: where its rows lie, if known
        self._slab: list[Sequence[np.ndarray]] = []   # consecutive batches not yet written
        self._slab_start = self._slab_stop = 0
        self._slab_bytes = 0
        try:
            self._file.attrs.update(attrs or {})
        except BaseException:
            self.discard()  # nobody holds this writer yet to discard it
            raise

    @property
    def direct(self) -> list[bool]:
        """Per dataset: True where batches are written with os.pwritev, False through h5py."""
        return [p is not None for p in self._places]

    def write(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        """Write one batch's combined outputs at rows [start, start + len) (h5py datasets
        perhaps later, with the batches that follow; `flush` or `finish` writes those)."""
        if self._datasets is None:
            self._datasets = [self._create(path, a) for path, a in zip(self.paths, arrays)]
            self._places = [direct_rows(d, self._file) for d in self._datasets]
            if any(self._places):
                self._fd = os.open(self.temp_path, os.O_WRONLY)
        for dataset, places, array in zip(self._datasets, self._places, arrays):
            if places is None or not len(array):
                continue
            pieces = places.pieces(start, start + len(array))
            if pieces is None:  # a chunk HDF5 did not report allocated: let it place the rows
                dataset[start:start + len(array)] = array
                continue
            data = np.ascontiguousarray(array, dtype=places.dtype).reshape(-1).view(np.uint8)
            for offset, size, at in pieces:
                pwrite_from(self._fd, memoryview(data[at:at + size]), offset)
        if all(self._places):
            return
        if self._slab and start != self._slab_stop:
            self.flush()
        if not self._slab:
            self._slab_start = self._slab_stop = start
        self._slab.append(arrays)
        self._slab_stop += len(arrays[0]) if arrays else 0
        self._slab_bytes += sum(a.nbytes for a, p in zip(arrays, self._places) if p is None)
        if self._slab_bytes >= SLAB_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the batches held back for h5py."""
        slab, self._slab, self._slab_bytes = self._slab, [], 0
        if not slab or self._slab_stop == self._slab_start:
            return
        for k, (dataset, places) in enumerate(zip(self._datasets, self._places)):
            if places is not None:
                continue
            parts = [batch[k] for batch in slab]
            rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
            dataset[self._slab_start:self._slab_stop] = rows

    def _create(self, path: str, sample: np.ndarray):
        import h5py

        row_shape = sample.shape[1:]
        row_bytes = max(1, int(np.prod(row_shape)) * sample.itemsize)
        chunk_rows = max(1, min(self._batch_size, self._rows, MAX_CHUNK_BYTES // row_bytes))
        options = {}
        if self._spec.compression and self._rows:
            name, _, level = self._spec.compression.partition(":")
            options = {"compression": name, "compression_opts": int(level) if level else None}
        elif self._rows:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # every chunk has its place now
            options = {"dcpl": dcpl, "fill_time": "never"}  # ... and is written only by us
        return self._file.create_dataset(path, shape=(self._rows,) + row_shape, dtype=sample.dtype,
                                         chunks=(chunk_rows,) + row_shape if self._rows else None,
                                         **options)

    def finish(self, attrs: dict) -> None:
        """Record provenance, close, and move the file to its final name."""
        self.flush()
        self._close_fd()
        self._file.attrs.update(attrs)
        self._file.close()
        os.replace(self.temp_path, self.path)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Close and remove the unfinished file (best effort: this runs after a failure, on a
        disk that may be full)."""
        self._slab = []
        try:
            self._close_fd()
            self._file.close()
        except (OSError, RuntimeError, ValueError):
            pass
        self.temp_path.unlink(missing_ok=True)
