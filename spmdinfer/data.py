"""HDF5 input and output on rank 0: checked input datasets read by row slices, and an
output file written under a temporary name and renamed only when complete."""

from __future__ import annotations

import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError, OutputExistsError
from .spec import InputSpec, OutputSpec

INPUT_CHUNK_CACHE = 64 * 1024 * 1024   # bytes of HDF5 chunk cache per input dataset
MAX_CHUNK_BYTES = 4 * 1024 * 1024      # output chunks: one batch of rows, capped at this size
SLAB_BYTES = 4 * 1024 * 1024           # output rows held back to be written in one call
PARTIAL_SUFFIX = ".partial"

NUMERIC_KINDS = "biufc"                # bool, int, uint, float, complex
MAX_SOFT_LINKS = 16                    # HDF5's own limit on soft links followed in one path
ABSURD_BYTES = 2 ** 40                 # a dataset declaring more than this ...
ABSURD_RATIO = 10_000                  # ... and more than this many times its file's size is refused
BATCH_MEMORY_SHARE = 2                 # a node's input batches may use 1/this of the available memory
# Launchers that export how many ranks share this node, in the order they are trusted.
LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


@dataclass(frozen=True)
class InputField:
    """One input dataset as every rank needs to know it: name, path, dtype, row shape."""

    name: str
    path: str
    dtype: str
    row_shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=object)) * np.dtype(self.dtype).itemsize

    def buffer(self, rows: int) -> np.ndarray:
        return np.empty((rows,) + self.row_shape, dtype=np.dtype(self.dtype))

    def describe(self) -> str:
        return f"dataset {self.path} {np.dtype(self.dtype)} (rows, {', '.join(map(str, self.row_shape))})"


class InputReader:
    """The job's input file, opened on rank 0, with every dataset checked before use.

    Refused, each with a one-line DataError: a file that is not HDF5; a path that
    crosses an external link (soft links inside the file are followed and checked);
    virtual datasets and datasets with external raw storage (their bytes live in
    other files); scalar or null datasets; non-numeric dtypes (strings, variable-length,
    references, compound, enum, opaque, array); filters this HDF5 cannot decode;
    absurd declared sizes (see `check_declared_size`); and a batch too big for the
    node's memory (see `check_batch_memory`). Values are never looked at: NaN and Inf
    pass through, and a dataset with 0 rows is fine.

    Datasets whose stored bytes are the values as they are (contiguous, or chunked whole
    rows without filters, in the buffer's dtype) are read with os.preadv on a file
    descriptor of their own, without the GIL (`direct`, `direct_rows`); the rest by h5py.
    """

    def __init__(self, spec: InputSpec, ranks_on_node: int | None = None):
        import h5py

        self.file_path = spec.file
        if not spec.file.is_file():
            raise DataError(f"[input] file {spec.file}: no such file")
        try:
            self._file = h5py.File(spec.file, "r", rdcc_nbytes=INPUT_CHUNK_CACHE)
        except OSError as exc:
            raise DataError(f"[input] file {spec.file}: not a readable HDF5 file ({exc})") from None
        try:
            self._datasets = [self._dataset(name, path) for name, path in spec.datasets]
            self.fields = [InputField(name, path, ds.dtype.str, tuple(ds.shape[1:]))
                           for (name, path), ds in zip(spec.datasets, self._datasets)]
            counts = {f.path: ds.shape[0] for f, ds in zip(self.fields, self._datasets)}
            if len(set(counts.values())) > 1:
                shown = ", ".join(f"{p} has {n}" for p, n in counts.items())
                raise DataError(f"[input.datasets] in {spec.file} must all have the same number of "
                                f"rows (axis 0): {shown}")
            self.rows = next(iter(counts.values()))
            check_batch_memory(self.fields, self.rows, spec.batch_size,
                               ranks_on_node or launcher_ranks_on_node())
            self._datasets = [with_chunk_cache(ds, spec.batch_size) for ds in self._datasets]
            self._fd = None
            self._direct = self._open_direct()
        except BaseException:
            self._close_fd()
            self._file.close()
            raise

    @property
    def direct(self) -> list[bool]:
        """Per dataset: True where its rows are read with os.preadv (without the GIL), False
        where h5py reads them. A direct dataset still goes through h5py for a batch that
        touches a chunk never written (fill values) or a buffer whose dtype differs."""
        return [source is not None for source in self._direct]

    def _open_direct(self) -> list[DirectRows | None]:
        """Which datasets can be read from the file's bytes as they are (see `direct_rows`);
        opens the file descriptor they are read with when any can.

        The bytes on disk are the truth because the input is open read-only: h5py and HDF5
        only hold data that is not yet on disk (in their metadata, chunk or sieve caches) for
        a file open for writing.
        """
        sources = [direct_rows(ds, self._file) for ds in self._datasets]
        if not any(sources):
            return sources
        self._fd = os.open(self.file_path, os.O_RDONLY)
        try:  # the path must still name the file h5py opened (not one renamed over it since)
            same = os.path.samestat(os.fstat(self._fd), os.fstat(self._file.id.get_vfd_handle()))
        except (OSError, ValueError, TypeError, RuntimeError):
            same = False
        if not same:
            self._close_fd()
            return [None] * len(sources)
        return sources

    def _dataset(self, name: str, path: str):
        import h5py

        where = f"[input.datasets] {name}: dataset {path} in {self.file_path}"
        check_links(self._file, path, where)
        try:
            obj = self._file.get(path)
        except (RuntimeError, OSError, KeyError, ValueError) as exc:
            raise DataError(f"{where}: cannot be opened ({exc})") from None
        if obj is None:
            raise DataError(f"{where}: no such dataset")
        if not isinstance(obj, h5py.Dataset):
            raise DataError(f"{where}: is a {type(obj).__name__.lower()}, expected a dataset")
        check_storage(obj, where)
        if obj.shape is None:
            raise DataError(f"{where}: has a null dataspace (no elements), expected rows along axis 0")
        if obj.ndim == 0:
            raise DataError(f"{where}: is a scalar, expected rows along axis 0")
        if obj.dtype.kind not in NUMERIC_KINDS or h5py.check_enum_dtype(obj.dtype) is not None:
            raise DataError(f"{where}: has dtype {dtype_name(obj.dtype)}, expected a numeric dtype "
                            f"(bool, int, uint, float or complex)")
        check_declared_size(obj, where, self.file_path.stat().st_size)
        return obj

    def read(self, start: int, stop: int, buffers: Sequence[np.ndarray]) -> None:
        """Read rows [start, stop) of every dataset into the front of `buffers`.

        Direct datasets are read with os.preadv, which releases the GIL, so a prefetch
        thread reading them leaves the main thread alone; h5py holds the GIL for the whole
        H5Dread. Call it from one thread at a time.
        """
        if stop <= start:
            return
        for dataset, source, buffer in zip(self._datasets, self._direct, buffers):
            pieces = None
            if source is not None and source.fits(buffer, stop - start):
                pieces = source.pieces(start, stop)
            if pieces is None:
                dataset.read_direct(buffer, np.s_[start:stop], np.s_[0:stop - start])
                continue
            view = memoryview(buffer[:stop - start].reshape(-1).view(np.uint8))
            for offset, size, into in pieces:
                done = pread_into(self._fd, view[into:into + size], offset)
                if done < size:
                    raise DataError(f"[input] file {self.file_path}: dataset {dataset.name} rows "
                                    f"{start}..{stop - 1}: the file ends at byte {offset + done}, "
                                    f"{size - done} bytes short of the rows' data (was it "
                                    f"truncated or replaced while the job runs?)")

    def _close_fd(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        try:
            self._close_fd()
        finally:
            self._file.close()


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
        """Whether `rows` rows can be copied into the front of `buffer` byte for byte."""
        return (buffer.dtype == self.dtype and tuple(buffer.shape[1:]) == self.row_shape
                and len(buffer) >= rows and buffer.flags.c_contiguous and buffer.flags.writeable)

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


def with_chunk_cache(dataset, batch_size: int):
    """`dataset` reopened with a chunk cache that holds every chunk one batch touches (plus the
    chunk straddling the next batch), so no chunk is decompressed twice; as is when the
    file's default cache already does."""
    import h5py

    if dataset.chunks is None:
        return dataset
    chunk_bytes = int(np.prod(dataset.chunks)) * dataset.dtype.itemsize
    across = int(np.prod([-(-n // c) for n, c in zip(dataset.shape[1:], dataset.chunks[1:])]))
    chunks = (-(-min(batch_size, max(dataset.shape[0], 1)) // dataset.chunks[0]) + 1) * across
    need = chunks * chunk_bytes
    if need <= INPUT_CHUNK_CACHE:
        return dataset
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(max(521, 10 * chunks + 1), int(need * 1.25), 1.0)
    return h5py.Dataset(h5py.h5d.open(dataset.file.id, dataset.name.encode(), dapl))


def check_links(file, path: str, where: str, depth: int = 0) -> None:
    """Refuse a dataset path that crosses an external link anywhere along it.

    Each group on the path is looked at as a link before it is entered, so HDF5 never
    opens another file; soft links are followed (inside this file) and their targets
    checked the same way. A missing component is left to the caller ("no such dataset").
    """
    import h5py

    if depth > MAX_SOFT_LINKS:
        raise DataError(f"{where}: more than {MAX_SOFT_LINKS} soft links on the path (a loop?)")
    current = "/"
    for part in (p for p in path.split("/") if p):
        here = posixpath.join(current, part)
        try:
            link = file.get(here, getlink=True)
        except (RuntimeError, OSError, KeyError, ValueError, TypeError) as exc:
            raise DataError(f"{where}: cannot resolve {here} ({exc})") from None
        if link is None:
            return
        if isinstance(link, h5py.ExternalLink):
            raise DataError(f"{where}: {here} is an external link to {link.path} in "
                            f"{link.filename}, expected data stored in the input file")
        if isinstance(link, h5py.SoftLink):
            check_links(file, posixpath.normpath(posixpath.join(current, link.path)), where,
                        depth + 1)
        elif not isinstance(link, h5py.HardLink):
            raise DataError(f"{where}: {here} is a {type(link).__name__}, expected a dataset "
                            f"stored in the input file")
        current = here


def check_storage(dataset, where: str) -> None:
    """Refuse datasets whose bytes live outside the file, or that this HDF5 cannot decode."""
    import h5py

    if dataset.is_virtual:
        sources = sorted({s.file_name for s in dataset.virtual_sources()})
        raise DataError(f"{where}: is a virtual dataset (mapped from {', '.join(sources)}), "
                        f"expected data stored in the input file")
    if dataset.external is not None:
        files = sorted({str(name) for name, _, _ in dataset.external})
        raise DataError(f"{where}: keeps its data in external raw file(s) {', '.join(files)}, "
                        f"expected data stored in the input file")
    plist = dataset.id.get_create_plist()
    for index in range(plist.get_nfilters()):
        code, _, _, name = plist.get_filter(index)
        if not h5py.h5z.filter_avail(code):
            label = name.decode(errors="replace") or "unnamed"
            raise DataError(f"{where}: is compressed with HDF5 filter {code} ({label}), which this "
                            f"HDF5 cannot decode; install its plugin (HDF5_PLUGIN_PATH) or rewrite "
                            f"the dataset")


def check_declared_size(dataset, where: str, file_bytes: int) -> None:
    """Refuse a dataset whose declared size is absurd next to what the file stores.

    Declared bytes are rows × max(row bytes, 1) (each row costs at least a byte to
    loop over, so 2**50 rows of width 0 count too). The dataset is refused when they
    exceed both 2**40 bytes (1 TiB) and 10,000 × the input file's size on disk. No
    sane dataset trips this: anything under 1 TiB passes whatever is stored, however
    partially written; above that, the file must hold at least 1/10,000 of it, which
    real compressed data always does (compressors do not reach 10,000:1 on real data;
    only never-written or fill-value chunks do, and those hold nothing to score).
    """
    rows = dataset.shape[0]
    row_bytes = int(np.prod(dataset.shape[1:], dtype=object)) * dataset.dtype.itemsize
    declared = rows * max(row_bytes, 1)
    if declared > ABSURD_BYTES and declared > ABSURD_RATIO * file_bytes:
        raise DataError(f"{where}: declares shape {dataset.shape} {dataset.dtype} = "
                        f"{_bytes(declared)} but the file holds only {_bytes(file_bytes)}; "
                        f"expected at most {_bytes(ABSURD_BYTES)} or {ABSURD_RATIO:,} × the "
                        f"file's size")


def check_batch_memory(fields: Sequence[InputField], rows: int, batch_size: int,
                       ranks_on_node: int, available: int | None = None) -> None:
    """Refuse a batch whose buffers would not fit in memory, before any is allocated.

    Every rank holds one batch buffer per input dataset, of min(batch_size, rows) rows
    (at least 1), and every rank on the node does so; together they may use at most
    half of the memory available (`available_memory`), leaving the rest for the model,
    its outputs and the combine. Skipped when the available memory cannot be read.
    """
    available = available_memory() if available is None else available
    if available is None:
        return
    row_bytes = sum(f.row_bytes for f in fields)
    batch_rows = max(1, min(batch_size, rows))
    needed = batch_rows * row_bytes * ranks_on_node
    budget = available // BATCH_MEMORY_SHARE
    if needed <= budget:
        return
    per_rank = _bytes(batch_rows * row_bytes)
    needs = (f"{per_rank} on each of {ranks_on_node} ranks on this node = {_bytes(needed)}"
             if ranks_on_node > 1 else per_rank)
    fitting = budget // max(1, row_bytes * ranks_on_node)
    advice = (f"use a smaller batch_size (at most {fitting})" if fitting >= 1 else
              "even one row does not fit; use fewer ranks per node")
    raise DataError(f"[input] batch_size = {batch_size}: a batch of {batch_rows} rows needs "
                    f"{needs}, more than half of the {_bytes(available)} of memory available; "
                    f"{advice}")


def available_memory() -> int | None:
    """Bytes of memory available to this process: MemAvailable (else free pages), capped
    by the memory limit of its cgroup where one is set; None when unknown."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    limit = cgroup_memory_limit()
    return available if limit is None else min(available, limit)


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max, v1 limit_in_bytes), or None.

    A Slurm job or a container sees the whole node in /proc/meminfo, but may only use
    its cgroup's limit.
    """
    try:
        with open("/proc/self/cgroup") as cgroups:
            lines = [line.rstrip("\n").split(":", 2) for line in cgroups]
    except OSError:
        return None
    candidates = []
    for _, controllers, path in (parts for parts in lines if len(parts) == 3):
        relative = path.lstrip("/")
        if controllers == "":
            candidates += [Path("/sys/fs/cgroup", relative, "memory.max"),
                           Path("/sys/fs/cgroup/memory.max")]
        elif "memory" in controllers.split(","):
            candidates += [Path("/sys/fs/cgroup/memory", relative, "memory.limit_in_bytes"),
                           Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    for candidate in candidates:
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        return int(text) if text.isdigit() else None  # "max": no limit
    return None


def launcher_ranks_on_node() -> int:
    """How many ranks the launcher started on this node; 1 when it does not say."""
    for name in LOCAL_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def dtype_name(dtype: np.dtype) -> str:
    """A dtype as HDF5 users know it: "variable-length string (object)", "enum (int8)", ..."""
    import h5py

    string = h5py.check_string_dtype(dtype)
    if string is not None:
        length = "variable-length" if string.length is None else "fixed-length"
        return f"{length} {string.encoding} string ({dtype})"
    vlen = h5py.check_vlen_dtype(dtype)
    if vlen is not None:
        return f"variable-length sequence of {vlen} ({dtype})"
    ref = h5py.check_ref_dtype(dtype)
    if ref is not None:
        return f"{'region' if ref is h5py.RegionReference else 'object'} reference ({dtype})"
    if h5py.check_enum_dtype(dtype) is not None:
        return f"enum ({dtype})"
    if h5py.check_opaque_dtype(dtype):
        return f"opaque ({dtype})"
    if dtype.names:
        return f"compound ({', '.join(dtype.names)})"
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return f"array of {base} {shape}"
    return str(dtype)


def _bytes(count: int) -> str:
    """A byte count a person can read: "1.5 GiB", "312 bytes"."""
    for unit, size in (("EiB", 2 ** 60), ("PiB", 2 ** 50), ("TiB", 2 ** 40), ("GiB", 2 ** 30),
                       ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


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
        attributes known from the start, written with the datasets (by the first `write`,
        in the writer's thread), so that `finish` has little left to do."""
        import h5py

        self.path = spec.file
        self.temp_path = spec.file.with_name(spec.file.name + PARTIAL_SUFFIX)
        self._spec = spec
        self._rows = rows
        self._batch_size = batch_size
        self._file = h5py.File(self.temp_path, "w")  # the runner made the folder with the lock
        self._attrs = dict(attrs or {})
        self._fd: int | None = None
        self._datasets = None
        self._places: list[DirectRows | None] = []   # per dataset: where its rows lie, if known
        self._slab: list[Sequence[np.ndarray]] = []   # consecutive batches not yet written
        self._slab_start = self._slab_stop = 0
        self._slab_bytes = 0

    @property
    def direct(self) -> list[bool]:
        """Per dataset: True where batches are written with os.pwritev, False through h5py."""
        return [p is not None for p in self._places]

    def write(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        """Write one batch's combined outputs at rows [start, start + len) (h5py datasets
        perhaps later, with the batches that follow; `flush` or `finish` writes those)."""
        if self._datasets is None:
            self._datasets = [self._create(path, a) for (_, path), a in
                              zip(self._spec.datasets, arrays)]
            self._write_attrs()
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
        self._attrs.update(attrs)
        self._write_attrs()
        self._file.close()
        os.replace(self.temp_path, self.path)

    def _write_attrs(self) -> None:
        attrs, self._attrs = self._attrs, {}
        for key, value in attrs.items():
            self._file.attrs[key] = value

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

