"""The byte-offset fast path the input and the output share: where a dataset's rows lie
in its file, so that they are read with os.preadv and written with os.pwritev (both release
the GIL), where the stored bytes are exactly the values h5py would give."""

from __future__ import annotations

import os

import numpy as np

DIRECT_SCAN_CHUNKS = 4096      # chunk addresses learned by the first scan of a chunked dataset
DIRECT_MAX_CHUNKS = 2 ** 22    # more chunks than this (32 MiB of addresses): h5py reads them
UNALLOCATED = -1               # a chunk never written: HDF5 returns its fill value
# H5Dchunk_iter and H5Dget_chunk_info* report chunk addresses without the user block before
# HDF5 1.14.4 (HDFGroup/hdf5#3003); H5Dget_offset always included it.
CHUNK_ADDRESSES_INCLUDE_USERBLOCK = (1, 14, 4)


def direct_rows(dataset, file) -> DirectRows | None:
    """Where `dataset`'s rows lie in `file`, if the stored bytes are exactly the values h5py
    would return, rows contiguous; None where h5py must read (or write) it. The input's
    datasets are read there, and the output's early-allocated chunks written there.

    Direct: contiguous storage that is allocated, and chunked storage with no filters whose
    chunks span whole rows (chunk shape (k,) + row shape). Not direct: compact storage,
    unallocated contiguous storage (all fill value), any filter (compression, shuffle,
    fletcher32, ...), chunks splitting a row, a file type h5py converts to reach its dtype
    (byte order, bit precision or padding, enum and compound layouts: compared with
    H5Tequal), rows of 0 bytes, a file driver other than sec2 (its addresses may not be
    offsets in the one file), and HDF5 without H5Dchunk_iter.
    """
    import h5py

    if not hasattr(os, "preadv") or file.driver != "sec2":
        return None
    rows, row_shape = dataset.shape[0], tuple(dataset.shape[1:])
    row_bytes = int(np.prod(row_shape, dtype=object)) * dataset.dtype.itemsize
    if rows == 0 or row_bytes == 0:
        return None
    try:
        if dataset.id.get_type() != h5py.h5t.py_create(dataset.dtype):
            return None
    except (TypeError, ValueError, RuntimeError):
        return None
    plist = dataset.id.get_create_plist()
    if plist.get_nfilters() or dataset.external is not None or dataset.is_virtual:
        return None
    layout = plist.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        # Checked first: with a user block, H5Dget_offset of unallocated storage is not None
        # but HADDR_UNDEF plus the user block's size, wrapped around.
        if dataset.id.get_space_status() != h5py.h5d.SPACE_STATUS_ALLOCATED:
            return None
        offset = dataset.id.get_offset()
        return None if offset is None else DirectRows(dataset, row_bytes, offset=offset)
    if layout != h5py.h5d.CHUNKED or tuple(dataset.chunks[1:]) != row_shape:
        return None
    if not hasattr(dataset.id, "chunk_iter"):
        return None
    if (file.id.get_create_plist().get_userblock()
            and h5py.version.hdf5_version_tuple < CHUNK_ADDRESSES_INCLUDE_USERBLOCK):
        return None
    if -(-rows // dataset.chunks[0]) > DIRECT_MAX_CHUNKS:
        return None
    return DirectRows(dataset, row_bytes, chunk_rows=dataset.chunks[0])


class DirectRows:
    """The file offsets of one dataset's rows: one offset for contiguous storage; per chunk
    for chunked storage, learned lazily.

    Chunk addresses come from H5Dchunk_iter, scanning the chunk index from its start up to
    the chunk needed, DIRECT_SCAN_CHUNKS at first and twice as far each time after: one
    index scan costs about 1 us per chunk, so reading the whole dataset costs at most about
    two scans, and a job that reads only its first batches never scans the rest. (The
    lookup of a single chunk, H5Dget_chunk_info_by_coord, also scans the index from its
    start: up to milliseconds per call with tens of thousands of chunks.)
    """

    def __init__(self, dataset, row_bytes: int, offset: int | None = None,
                 chunk_rows: int | None = None):
        self._dataset = dataset
        self.dtype = dataset.dtype
        self.row_shape = tuple(dataset.shape[1:])
        self.row_bytes = row_bytes
        self.rows = dataset.shape[0]
        self.offset = offset                 # contiguous: the first row's offset
        self.chunk_rows = chunk_rows         # chunked: rows per chunk
        self.chunk_count = -(-dataset.shape[0] // chunk_rows) if chunk_rows else 0
        self._chunks = np.empty(0, dtype=np.int64)  # offsets of chunks 0..len-1, or UNALLOCATED

    def fits(self, buffer: np.ndarray, rows: int) -> bool:
        """Whether `rows` rows can be copied into the front of `buffer` byte for byte (then,
        for a buffer of the other byte order, swapped in place: `swapped`)."""
        return (buffer.dtype in (self.dtype, self.dtype.newbyteorder("="))
                and tuple(buffer.shape[1:]) == self.row_shape and len(buffer) >= rows
                and buffer.flags.c_contiguous and buffer.flags.writeable)

    def swapped(self, buffer: np.ndarray) -> bool:
        """Whether the bytes copied into `buffer` are in the other byte order."""
        return buffer.dtype != self.dtype

    def pieces(self, start: int, stop: int) -> list[tuple[int, int, int]] | None:
        """(file offset, bytes, offset in the buffer) of rows [start, stop), merged where
        adjacent in both the file and the buffer (usually one piece); None where a chunk was
        never written (its rows are the fill value: h5py reads them) or rows out of range (h5py
        says what is wrong)."""
        if not 0 <= start < stop <= self.rows:
            return None
        size = self.row_bytes
        if self.chunk_rows is None:
            return [(self.offset + start * size, (stop - start) * size, 0)]
        rows = self.chunk_rows
        first, last = start // rows, (stop - 1) // rows
        if last >= len(self._chunks):
            self._scan(max(last + 1, 2 * len(self._chunks), DIRECT_SCAN_CHUNKS))
        pieces: list[tuple[int, int, int]] = []
        for index, base in enumerate(self._chunks[first:last + 1].tolist(), first):
            if base == UNALLOCATED:
                return None
            low, high = max(start, index * rows), min(stop, (index + 1) * rows)
            offset = base + (low - index * rows) * size
            into, count = (low - start) * size, (high - low) * size
            if pieces and pieces[-1][0] + pieces[-1][1] == offset and \
                    pieces[-1][2] + pieces[-1][1] == into:
                offset, count, into = pieces[-1][0], pieces[-1][1] + count, pieces[-1][2]
                pieces.pop()
            pieces.append((offset, count, into))
        return pieces

    def _scan(self, upto: int) -> None:
        """Learn the offsets of chunks 0..upto-1 (capped at the chunk count).

        A chunk the scan does not report stays UNALLOCATED, which only sends its batches to
        h5py, so a missed chunk costs speed, never correctness; the scan stops at the first
        chunk past `upto` only while the index has reported chunks in order.
        """
        upto = min(upto, self.chunk_count)
        chunks = np.full(upto, UNALLOCATED, dtype=np.int64)
        rows, whole = self.chunk_rows, self.chunk_rows * self.row_bytes
        state = {"last": -1, "ordered": True}

        def visit(info):
            index = info.chunk_offset[0] // rows
            state["ordered"] = state["ordered"] and index > state["last"]
            state["last"] = index
            if index >= upto:
                return True if state["ordered"] else None
            # Unfiltered chunks are stored whole, edge chunks too; anything else goes to h5py.
            if info.byte_offset is not None and info.size == whole and not info.filter_mask:
                chunks[index] = info.byte_offset
            return None

        self._dataset.id.chunk_iter(visit)
        self._chunks = chunks


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read len(view) bytes at `offset` of `fd` into `view`, looping over short reads; returns
    the bytes read, fewer only where the file ends first. os.preadv releases the GIL."""
    done, size = 0, len(view)
    while done < size:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def pwrite_from(fd: int, view: memoryview, offset: int) -> None:
    """Write all of `view` at `offset` of `fd`, looping over short writes. os.pwritev
    releases the GIL."""
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)
