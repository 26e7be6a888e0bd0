"""InputReader's direct path: rows located in the file and read with os.preadv (no GIL),
checked byte for byte against h5py, and the h5py path kept wherever bytes need decoding.

Every read goes into buffers first filled with the complement of the expected bytes, so a
row left unread fails; spies on os.preadv and h5py's read_direct tell which path a batch took.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from spmdinfer import direct_io
from spmdinfer.input import InputReader
from spmdinfer.errors import DataError
from spmdinfer.spec import InputSpec


def open_reader(path, datasets=("/x",), batch_size=64) -> InputReader:
    names = tuple((f"in{i}", name) for i, name in enumerate(datasets))
    return InputReader(InputSpec(path, names, batch_size), ranks_on_node=1)


class Calls:
    """Counts os.preadv calls and h5py read_direct calls made while reading."""

    def __init__(self, monkeypatch, max_bytes: int | None = None):
        self.preadv = 0
        self.h5py = 0
        real_preadv, real_read_direct = os.preadv, h5py.Dataset.read_direct

        def preadv(fd, buffers, offset):
            self.preadv += 1
            if max_bytes is not None:  # a short read: at most max_bytes
                buffers = [memoryview(buffers[0])[:max_bytes]]
            return real_preadv(fd, buffers, offset)

        def read_direct(dataset, *args, **kwargs):
            self.h5py += 1
            return real_read_direct(dataset, *args, **kwargs)

        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(h5py.Dataset, "read_direct", read_direct)

    def reset(self):
        self.preadv = self.h5py = 0


@pytest.fixture
def calls(monkeypatch):
    return Calls(monkeypatch)


def same(actual: np.ndarray, expected: np.ndarray) -> bool:
    """Equal values and equal bytes (NaN payloads, -0.0 and bool bytes included)."""
    return (actual.dtype == expected.dtype and actual.shape == expected.shape
            and np.array_equal(actual, expected, equal_nan=actual.dtype.kind in "fc")
            and actual.tobytes() == expected.tobytes())


def read_and_compare(path, datasets=("/x",), batch_size=64, starts=None, buffers=None,
                     reader=None) -> int:
    """Read every batch (or those at `starts`) and compare each with h5py's ds[start:stop];
    returns the number of batches read."""
    own = reader is None
    reader = reader or open_reader(path, datasets, batch_size)
    try:
        rows = reader.rows
        buffers = buffers or [f.buffer(batch_size) for f in reader.fields]
        starts = range(0, rows, batch_size) if starts is None else starts
        with h5py.File(path, "r") as f:
            for start in starts:
                stop = min(start + batch_size, rows)
                expected = [f[name][start:stop] for name in datasets]
                for buffer, want in zip(buffers, expected):  # anything unread differs
                    buffer.view(np.uint8).reshape(-1)[:] = 0x5A
                    buffer[:stop - start].view(np.uint8)[...] = ~want.astype(buffer.dtype).view(
                        np.uint8)
                reader.read(start, stop, buffers)
                for name, buffer, want in zip(datasets, buffers, expected):
                    got = buffer[:stop - start]
                    assert same(got, want.astype(buffer.dtype)), (name, start, stop)
                    assert np.array_equal(got, want)
        return len(starts)
    finally:
        if own:
            reader.close()


def read_checked(path, direct, batch_size=64) -> int:
    """Open a reader, check which path each dataset takes, read and compare every batch;
    returns the number of batches read."""
    reader = open_reader(path, batch_size=batch_size)
    try:
        assert reader.direct == direct
        return read_and_compare(path, batch_size=batch_size, reader=reader)
    finally:
        reader.close()


def random_rows(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def write(path, arrays: dict, libver=None, userblock_size=None, **options):
    kwargs = {"libver": libver} if libver else {}
    if userblock_size:
        kwargs["userblock_size"] = userblock_size
    with h5py.File(path, "w", **kwargs) as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=array, **options)
    return path


# The direct path: contiguous and chunked storage.

def test_contiguous_is_read_directly_one_preadv_per_batch(tmp_path, calls):
    path = write(tmp_path / "in.h5", {"x": random_rows((1000, 16), np.float32)})
    assert read_checked(path, [True]) == 16  # the last one partial (1000 = 15 * 64 + 40)
    assert (calls.preadv, calls.h5py) == (16, 0)


@pytest.mark.parametrize("chunk_rows", [48, 64, 100, 1, 1000])
def test_chunked_is_read_directly_and_merged_into_one_preadv_per_batch(tmp_path, calls,
                                                                        chunk_rows):
    # 48 does not divide the batch of 64, so batches cross chunk boundaries; 1000 rows leave
    # a partial last batch and a partial last chunk.
    path = write(tmp_path / "in.h5", {"x": random_rows((1000, 16), np.float32)},
                 chunks=(chunk_rows, 16))
    assert read_checked(path, [True]) == 16
    assert calls.h5py == 0
    if chunk_rows > 1:  # chunks written in order lie one after another: a batch is one read
        assert calls.preadv == 16
    else:  # 1000 one-row chunks with B-tree nodes among them: merged, but not all
        assert 16 < calls.preadv < 100


def test_chunks_out_of_order_on_disk_are_read_piece_by_piece(tmp_path, calls):
    path = tmp_path / "in.h5"
    rows = random_rows((1000, 16), np.float32)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", shape=rows.shape, dtype=rows.dtype, chunks=(48, 16))
        for start in reversed(range(0, 1000, 48)):  # last chunk first: chunks not adjacent
            ds[start:start + 48] = rows[start:start + 48]
    assert read_and_compare(path) == 16
    assert calls.h5py == 0
    assert calls.preadv > 16  # a batch spans 2 or 3 chunks, none adjacent to the next


@pytest.mark.parametrize("chunks", [None, (5, 3, 4), (64, 3, 4)])
def test_multidimensional_rows(tmp_path, calls, chunks):
    path = write(tmp_path / "in.h5", {"x": random_rows((203, 3, 4), np.float32)}, chunks=chunks)
    reader = open_reader(path, batch_size=32)
    try:
        assert reader.direct == [True]
        assert read_and_compare(path, batch_size=32, reader=reader) == 7
    finally:
        reader.close()
    assert (calls.preadv, calls.h5py) == (7, 0)


@pytest.mark.parametrize("dtype", ["float32", "int8", "bool", "float64", "complex64", "uint16",
                                   "int64", "float16", "complex128"])
@pytest.mark.parametrize("chunks", [None, (17, 5)])
def test_dtypes(tmp_path, calls, dtype, chunks):
    path = write(tmp_path / "in.h5", {"x": random_rows((300, 5), dtype)}, chunks=chunks)
    reader = open_reader(path)
    try:
        assert reader.direct == [True]
        assert reader.fields[0].dtype == np.dtype(dtype).str
        assert read_and_compare(path, reader=reader) == 5
    finally:
        reader.close()
    assert (calls.preadv, calls.h5py) == (5, 0)


def test_two_datasets_at_once(tmp_path, calls):
    path = write(tmp_path / "in.h5", {"a": random_rows((500, 8), np.float32)})
    with h5py.File(path, "a") as f:
        f.create_dataset("g/b", data=random_rows((500, 3, 2), np.int8, seed=1), chunks=(30, 3, 2))
        f.create_dataset("c", data=random_rows((500,), np.complex64, seed=2), chunks=(70,),
                         compression="gzip")
    reader = open_reader(path, ("/a", "/g/b", "/c"), batch_size=64)
    try:
        assert reader.direct == [True, True, False]
        assert read_and_compare(path, ("/a", "/g/b", "/c"), reader=reader) == 8
    finally:
        reader.close()
    assert (calls.preadv, calls.h5py) == (16, 8)


def test_one_dimensional_rows(tmp_path, calls):
    path = write(tmp_path / "in.h5", {"x": random_rows((1000,), np.float64)}, chunks=(128,))
    assert read_and_compare(path, batch_size=100) == 10
    assert (calls.preadv, calls.h5py) == (10, 0)


@pytest.mark.parametrize("libver, maxshape, early", [
    ("earliest", None, False),        # version 1 B-tree (h5py's default)
    ("latest", None, False),          # fixed array
    ("latest", (None, 16), False),    # extensible array
    ("latest", (None, None), False),  # version 2 B-tree
    ("latest", None, True),           # implicit index (allocated early)
])
def test_every_chunk_index_type(tmp_path, calls, libver, maxshape, early):
    rows = random_rows((1000, 16), np.float32)
    path = tmp_path / "in.h5"
    with h5py.File(path, "w", libver=libver) as f:
        dcpl = None
        if early:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        f.create_dataset("x", shape=rows.shape, dtype=rows.dtype, chunks=(48, 16),
                         maxshape=maxshape, dcpl=dcpl)[...] = rows
    assert read_and_compare(path) == 16
    assert calls.h5py == 0 and calls.preadv >= 16


def test_single_chunk(tmp_path, calls):
    path = write(tmp_path / "in.h5", {"x": random_rows((100, 16), np.float32)},
                 chunks=(100, 16), libver="latest")
    assert read_and_compare(path, batch_size=30) == 4
    assert (calls.preadv, calls.h5py) == (4, 0)


def test_user_block_before_the_hdf5_data(tmp_path, calls):
    path = tmp_path / "in.h5"
    with h5py.File(path, "w", userblock_size=4096) as f:
        f.create_dataset("c", data=random_rows((300, 8), np.float32))
        f.create_dataset("k", data=random_rows((300, 8), np.float32, seed=3), chunks=(50, 8))
        f.create_dataset("empty", shape=(300, 8), dtype=np.float32, fillvalue=2.5)
    direct_chunks = h5py.version.hdf5_version_tuple >= direct_io.CHUNK_ADDRESSES_INCLUDE_USERBLOCK
    reader = open_reader(path, ("/c", "/k", "/empty"))
    try:
        # unallocated contiguous storage: H5Dget_offset says 4095 here, not None
        assert reader.direct == [True, direct_chunks, False]
        assert read_and_compare(path, ("/c", "/k", "/empty"), reader=reader) == 5
    finally:
        reader.close()
    assert calls.preadv == 5 * (1 + direct_chunks)


def test_rows_read_in_any_order(tmp_path, calls, monkeypatch):
    monkeypatch.setattr(direct_io, "DIRECT_SCAN_CHUNKS", 2)  # learn chunk addresses in small steps
    path = write(tmp_path / "in.h5", {"x": random_rows((1000, 4), np.int64)}, chunks=(7, 4))
    starts = [960, 0, 500, 64, 999, 3, 128]
    assert read_and_compare(path, starts=starts) == len(starts)
    assert (calls.preadv, calls.h5py) == (len(starts), 0)


def test_many_chunks_are_learned_in_growing_scans(tmp_path, calls, monkeypatch):
    monkeypatch.setattr(direct_io, "DIRECT_SCAN_CHUNKS", 8)
    scans = []
    real_scan = direct_io.DirectRows._scan
    monkeypatch.setattr(direct_io.DirectRows, "_scan",
                        lambda self, upto: (scans.append(upto), real_scan(self, upto))[1])
    path = write(tmp_path / "in.h5", {"x": random_rows((5000, 2), np.float32)}, chunks=(3, 2))
    assert read_and_compare(path, batch_size=64) == 79
    assert calls.h5py == 0
    assert 79 <= calls.preadv < 200  # merged, except around the B-tree nodes among the chunks
    assert scans == [22, 44, 88, 176, 352, 704, 1408, 2816]  # the last one stops at 1667 chunks


# Fill values: h5py reads the batches that touch chunks never written.

def test_unallocated_chunks_give_the_fill_value(tmp_path, calls):
    path = tmp_path / "in.h5"
    rows = random_rows((1000, 4), np.float32)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", shape=rows.shape, dtype=rows.dtype, chunks=(100, 4),
                              fillvalue=7.0)
        ds[0:100] = rows[0:100]
        ds[300:450] = rows[300:450]   # chunks 3 and 4; chunks 1, 2 and 5..9 never written
    reader = open_reader(path, batch_size=50)
    try:
        assert reader.direct == [True]
        assert read_and_compare(path, batch_size=50, reader=reader) == 20
        buffers = [reader.fields[0].buffer(50)]
        reader.read(150, 200, buffers)
        assert (buffers[0] == 7.0).all()
    finally:
        reader.close()
    # rows 0..99 and 300..499 (chunk 4 holds 400..499 in full) are on disk: 6 batches
    assert calls.preadv == 6
    assert calls.h5py == 20 - 6 + 1


def test_nothing_written_at_all(tmp_path, calls):
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("k", shape=(100, 4), dtype=np.int16, chunks=(10, 4), fillvalue=-3)
        f.create_dataset("c", shape=(100, 4), dtype=np.int16, fillvalue=-4)  # contiguous
    reader = open_reader(path, ("/k", "/c"))
    try:
        assert reader.direct == [True, False]
        assert read_and_compare(path, ("/k", "/c"), reader=reader) == 2
    finally:
        reader.close()
    assert (calls.preadv, calls.h5py) == (0, 4)


# The h5py path: whatever needs decoding.

@pytest.mark.parametrize("filters", [{"compression": "gzip"}, {"compression": "lzf"},
                                     {"shuffle": True}, {"fletcher32": True},
                                     {"scaleoffset": 0}])
def test_filtered_chunks_fall_back_to_h5py(tmp_path, calls, filters):
    path = write(tmp_path / "in.h5", {"x": random_rows((1000, 16), np.int32)}, chunks=(48, 16),
                 **filters)
    assert read_checked(path, [False]) == 16
    assert (calls.preadv, calls.h5py) == (0, 16)


@pytest.mark.parametrize("chunks", [(50, 8), (50, 1), (50, 1, 4), (50, 3, 2)])
def test_chunks_splitting_rows_fall_back_to_h5py(tmp_path, calls, chunks):
    shape = (1000, 16) if len(chunks) == 2 else (1000, 3, 4)
    path = write(tmp_path / "in.h5", {"x": random_rows(shape, np.float32)}, chunks=chunks)
    assert read_checked(path, [False]) == 16
    assert (calls.preadv, calls.h5py) == (0, 16)


def test_chunks_wider_than_the_rows_fall_back_to_h5py(tmp_path, calls):
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=random_rows((100, 3), np.float32), chunks=(10, 4),
                         maxshape=(None, None))
    assert read_checked(path, [False], batch_size=30) == 4  # chunks of 4 columns, rows of 3
    assert (calls.preadv, calls.h5py) == (0, 4)


def test_compact_storage_falls_back_to_h5py(tmp_path, calls):
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        f.create_dataset("x", data=random_rows((100, 4), np.float32), dcpl=dcpl)
    assert read_checked(path, [False], batch_size=30) == 4
    assert (calls.preadv, calls.h5py) == (0, 4)


@pytest.mark.parametrize("chunks", [None, (48, 16)])
def test_big_endian_is_read_directly_into_either_byte_order(tmp_path, calls, chunks):
    """A big-endian dataset's field is in this machine's order (what the model gets): its
    buffers are filled by the direct path and swapped in place; a buffer in the file's own
    order gets the bytes as they are. Neither goes through h5py."""
    rows = random_rows((1000, 16), np.float32).astype(">f4")
    path = write(tmp_path / "in.h5", {"x": rows}, chunks=chunks)
    reader = open_reader(path)
    try:
        assert reader.fields[0].dtype == np.dtype("=f4").str and reader.fields[0].stored == ">f4"
        assert reader.direct == [True]
        assert read_and_compare(path, reader=reader) == 16   # the field's own buffers
        assert (calls.preadv, calls.h5py) == (16, 0)
        calls.reset()
        big = [np.empty((64, 16), ">f4")]
        read_and_compare(path, reader=reader, buffers=big)
        assert (calls.preadv, calls.h5py) == (16, 0)
    finally:
        reader.close()


def test_integers_of_odd_precision_are_converted_by_h5py(tmp_path, calls):
    # A 16-bit container holding 12-bit integers at bit offset 2: the bytes on disk are not
    # the int16 values h5py returns.
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        odd = h5py.h5t.STD_I16LE.copy()
        odd.set_precision(12)
        odd.set_offset(2)
        space = h5py.h5s.create_simple((100, 4))
        h5py.h5d.create(f.id, b"x", odd, space)
        f["x"][...] = np.arange(400, dtype=np.int16).reshape(100, 4) - 200
    assert read_checked(path, [False], batch_size=30) == 4
    assert (calls.preadv, calls.h5py) == (0, 4)


def test_empty_dataset(tmp_path, calls):
    path = write(tmp_path / "in.h5", {"x": np.zeros((0, 4), np.float32)})
    reader = open_reader(path)
    try:
        assert reader.direct == [False]
        reader.read(0, 0, [reader.fields[0].buffer(1)])
    finally:
        reader.close()
    assert (calls.preadv, calls.h5py) == (0, 0)


# Reading itself.

def test_short_reads_are_continued(tmp_path, monkeypatch):
    calls = Calls(monkeypatch, max_bytes=1000)
    path = write(tmp_path / "in.h5", {"x": random_rows((1000, 16), np.float32)}, chunks=(48, 16))
    assert read_and_compare(path) == 16
    assert calls.h5py == 0
    assert calls.preadv == sum(-(-min(64, 1000 - s) * 64 // 1000) for s in range(0, 1000, 64))


@pytest.mark.parametrize("chunks", [None, (48, 16)])
def test_file_truncated_under_the_reader_is_a_data_error(tmp_path, chunks):
    path = write(tmp_path / "in.h5", {"x": random_rows((1000, 16), np.float32)}, chunks=chunks)
    reader = open_reader(path)
    try:
        assert reader.direct == [True]
        buffers = [reader.fields[0].buffer(64)]
        reader.read(0, 64, buffers)
        with h5py.File(path, "r") as f:  # where row 100 starts
            offset = (f["x"].id.get_offset() + 100 * 64 if chunks is None else
                      f["x"].id.get_chunk_info_by_coord((96, 0)).byte_offset + 4 * 64)
        os.truncate(path, offset + 10)  # the file now ends inside row 100
        with pytest.raises(DataError) as caught:
            reader.read(64, 128, buffers)
        message = str(caught.value)
        assert str(path) in message and "rows 64..127" in message and "\n" not in message
        assert "/x" in message
    finally:
        reader.close()


def test_close_closes_the_file_descriptor(tmp_path):
    path = write(tmp_path / "in.h5", {"x": random_rows((100, 4), np.float32)})
    before = set(os.listdir("/proc/self/fd"))
    reader = open_reader(path)
    assert len(set(os.listdir("/proc/self/fd")) - before) == 2  # h5py's and the direct one
    reader.close()
    assert set(os.listdir("/proc/self/fd")) - before == set()


def test_a_file_renamed_over_the_path_is_not_read_directly(tmp_path, monkeypatch):
    path = write(tmp_path / "in.h5", {"x": random_rows((100, 4), np.float32)})
    other = write(tmp_path / "other.h5", {"x": random_rows((100, 4), np.float32, seed=9)})
    real_open = os.open

    def open_after_rename(name, flags, *args, **kwargs):  # the path changes between the opens
        if str(name) == str(path):
            os.replace(other, path)
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_rename)
    reader = open_reader(path, batch_size=100)
    try:
        assert reader.direct == [False]   # h5py holds the original file: read it through h5py
        buffers = [reader.fields[0].buffer(100)]
        reader.read(0, 100, buffers)
        assert np.array_equal(buffers[0], random_rows((100, 4), np.float32))
    finally:
        reader.close()


def test_rows_past_the_end_are_refused_as_h5py_refuses_them(tmp_path, calls):
    path = write(tmp_path / "in.h5", {"x": random_rows((1000, 16), np.float32),
                                      "y": random_rows((1000, 16), np.float32, seed=1)})
    reader = open_reader(path)   # /y's bytes follow /x's: a direct read past /x would succeed
    try:
        assert reader.direct == [True]
        with pytest.raises((TypeError, ValueError)):
            reader.read(990, 1054, [reader.fields[0].buffer(64)])
    finally:
        reader.close()
    assert calls.preadv == 0


class CountingDataset:
    """A dataset whose chunk_iter counts the chunks it reports."""

    def __init__(self, dataset):
        self.id = self
        self._id = dataset.id
        self.visits = 0

    def chunk_iter(self, callback):
        def counted(info):
            self.visits += 1
            return callback(info)
        return self._id.chunk_iter(counted)


def test_the_first_batch_scans_only_the_start_of_the_chunk_index(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "DIRECT_SCAN_CHUNKS", 8)
    path = write(tmp_path / "in.h5", {"x": random_rows((5000, 2), np.float32)}, chunks=(3, 2))
    reader = open_reader(path)
    try:
        source = reader._direct[0]
        source._dataset = counting = CountingDataset(source._dataset)
        read_and_compare(path, starts=[0], reader=reader)
        assert counting.visits == 23   # chunks 0..21 for rows 0..63, and chunk 22 ends the scan
        read_and_compare(path, starts=[4990], reader=reader)
        assert counting.visits == 23 + 1667  # the rest, to the last of the 1667 chunks
    finally:
        reader.close()


def test_a_chunk_stored_short_is_left_to_h5py(tmp_path, calls):
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", shape=(400, 4), dtype=np.float32, chunks=(100, 4))
        ds[...] = random_rows((400, 4), np.float32)
        ds.id.write_direct_chunk((100, 0), np.ones(8, np.float32).tobytes())  # 32 of 1600 bytes
    assert read_and_compare(path, batch_size=100, starts=[0, 200, 300]) == 3
    assert (calls.preadv, calls.h5py) == (3, 0)
    # Past its 32 stored bytes the short chunk's rows are undefined (HDF5 returns whatever
    # its buffer held), so only the stored rows are compared; h5py reads it, not preadv.
    reader = open_reader(path, ("/x",), 100)
    try:
        buffer = reader.fields[0].buffer(100)
        reader.read(100, 200, [buffer])
    finally:
        reader.close()
    assert (calls.preadv, calls.h5py) == (3, 1)
    assert np.array_equal(buffer[:2], np.ones((2, 4), np.float32))


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i4", ">u2", ">c8", "<f4"])
@pytest.mark.parametrize("options, direct", [
    ({}, True),                                            # contiguous
    ({"chunks": (7, 3)}, True),                            # chunked whole rows, no filters
    ({"chunks": (7, 3), "compression": "gzip", "shuffle": True}, False),
])
def test_the_other_byte_order_is_read_as_this_machines(tmp_path, calls, dtype, options, direct):
    """A dataset stored in the other byte order (as some tools write) holds the same numbers:
    it is read into buffers of this machine's order, converted by h5py or, on the direct
    path, copied and swapped in place; the field says so."""
    stored = np.dtype(dtype)
    values = random_rows((100, 3), stored.newbyteorder("="), seed=7)
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=values.astype(stored), dtype=stored, **options)
    reader = open_reader(path, batch_size=16)
    try:
        (field,) = reader.fields
        assert np.dtype(field.dtype).isnative and np.dtype(field.dtype) == stored.newbyteorder("=")
        assert field.stored == ("" if stored.isnative else stored.str)
        assert ("converted while reading" in field.describe()) == (not stored.isnative)
        assert reader.direct == [direct]
        buffer = field.buffer(16)
        for start in range(0, 100, 16):
            reader.read(start, min(start + 16, 100), [buffer])
            assert np.array_equal(buffer[:min(16, 100 - start)], values[start:start + 16])
    finally:
        reader.close()
    if direct:
        assert calls.h5py == 0 and calls.preadv > 0
