"""The job's input on each replica leader: its HDF5 datasets checked once, then read by
row slices into reused buffers (straight from the file's bytes where they can be used as
they are: spmdinfer.direct_io)."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .direct_io import DirectRows, direct_rows, pread_into
from .errors import DataError
from .spec import InputSpec
from .topology import available_memory, launcher_ranks_on_node

INPUT_CHUNK_CACHE = 64 * 1024 * 1024   # bytes of HDF5 chunk cache per input dataset

NUMERIC_KINDS = "biufc"                # bool, int, uint, float, complex
MAX_SOFT_LINKS = 16                    # HDF5's own limit on soft links followed in one path
ABSURD_BYTES = 2 ** 40                 # a dataset declaring more than this ...
ABSURD_RATIO = 10_000                  # ... and more than this many times its file's size is refused
BATCH_MEMORY_SHARE = 2                 # a node's input batches may use 1/this of the available memory


@dataclass(frozen=True)
class InputField:
    """One input dataset as every rank needs to know it: name, path, dtype (in this
    machine's byte order: what the model gets), row shape, and the dtype the file stores
    where that differs only in byte order (converted while reading)."""

    name: str
    path: str
    dtype: str
    row_shape: tuple[int, ...]
    stored: str = ""
    made_by: str = ""   # the preprocess function (module:function) that returns it, if one does

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=object)) * np.dtype(self.dtype).itemsize

    def buffer(self, rows: int) -> np.ndarray:
        return np.empty((rows,) + self.row_shape, dtype=np.dtype(self.dtype))

    def describe(self) -> str:
        if self.made_by:
            shape = ", ".join(["rows", *map(str, self.row_shape)])
            return f"{np.dtype(self.dtype)} ({shape}) from [input] preprocess {self.made_by}"
        text = f"dataset {self.path} {np.dtype(self.dtype)} (rows, {', '.join(map(str, self.row_shape))})"
        if self.stored:
            order = "big" if self.stored.startswith(">") else "little"
            text += f", stored {order}-endian ({self.stored}): converted while reading"
        return text


def field_of(name: str, path: str, dataset) -> InputField:
    """The field of an input dataset; a dtype of the other byte order is read as this
    machine's (the same numbers: h5py converts, and the direct path swaps in place)."""
    dtype = dataset.dtype
    native = dtype.newbyteorder("=")
    return InputField(name, path, native.str, tuple(dataset.shape[1:]),
                      stored="" if dtype.isnative else dtype.str)


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
            self.fields = [field_of(name, path, ds)
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
            if source.swapped(buffer):
                buffer[:stop - start].byteswap(inplace=True)

    def _close_fd(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        try:
            self._close_fd()
        finally:
            self._file.close()


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

    Counted: one batch (one buffer per input dataset, of min(batch_size, rows) rows, at
    least 1) for every rank on the node; together at most half of the memory available
    (`available_memory`). A rule of thumb, not an exact count: the ranks that read keep up
    to three batches (overlap.PREFETCH_DEPTH), a shared-memory group shares three slots
    (spmdinfer.shared), a rank receiving by message keeps two; so a node holds from 3/N of
    the count (one shared-memory group of N ranks) to three times it, and the other half of
    the memory is for that, the model, its outputs and the combine. Skipped when the
    available memory cannot be read.
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
