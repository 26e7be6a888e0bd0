"""The journal's log (FILE.parts/batches.log) on its own: no MPI, no models."""

from __future__ import annotations

import errno
import os
import threading
import time
import zlib

from pathlib import Path

import numpy as np
import pytest

from spmdinfer.errors import DataError, OutputExistsError
from spmdinfer.journal import LOG, MANIFEST, Journal, committed_batches, parts_folder

IDENTITY = {"job": "job text", "slices": ["abc"], "input": "123"}


def batch(start: int, rows: int = 4) -> list[np.ndarray]:
    """Arrays of mixed dtypes and shapes whose values depend on `start`."""
    rng = np.random.default_rng(start)
    return [
        rng.standard_normal((rows, 3)).astype(np.float32),
        rng.integers(-9, 9, (rows, 2, 2)).astype(np.int64),
        rng.random(rows) > 0.5,
        (rng.standard_normal(rows) + 1j * rng.standard_normal(rows)).astype(np.complex128),
        rng.standard_normal((rows, 5)).astype(np.float16),
        rng.integers(0, 255, (rows,), dtype=np.uint8),
    ]


def assert_same(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, (g.dtype, g.shape, e.dtype, e.shape)
        assert np.array_equal(g, e, equal_nan=True)


def log_path(output) -> os.PathLike:
    return parts_folder(output) / LOG


@pytest.fixture
def output(tmp_path):
    return tmp_path / "out" / "result.h5"


def fresh(output, fsync=False) -> Journal:
    return Journal.open(output, IDENTITY, resume=False, overwrite=False, fsync=fsync)


def resumed(output) -> Journal:
    return Journal.open(output, IDENTITY, resume=True, overwrite=False)


@pytest.mark.parametrize("fsync", [False, True])
def test_round_trip_of_several_batches(output, fsync):
    journal = fresh(output, fsync)
    starts = [8, 0, 4, 12]  # committed out of order, as replicas finish
    for start in starts:
        journal.commit(start, batch(start))
    assert journal.committed() == set(starts)
    for start in starts:
        assert_same(journal.load(start), batch(start))
    rows = [(start, arrays) for start, arrays in journal.batches()]
    assert [start for start, _ in rows] == sorted(starts)
    for start, arrays in rows:
        assert_same(arrays, batch(start))
    # One log, next to the manifest; no file per batch.
    assert sorted(os.listdir(parts_folder(output))) == sorted([LOG, MANIFEST])
    journal.close()
    again = resumed(output)
    assert again.committed() == set(starts)
    for start in starts:
        assert_same(again.load(start), batch(start))
    again.remove()
    assert not parts_folder(output).exists()


def test_loaded_arrays_are_fresh_aligned_and_writeable(output):
    journal = fresh(output)
    journal.commit(0, batch(0))
    first = journal.load(0)
    for array in first:
        assert array.flags.aligned and array.flags.writeable and array.flags.c_contiguous
        array[...] = 0
    assert_same(journal.load(0), batch(0))   # writing to a loaded array changes nothing stored
    journal.close()


def test_empty_batches_and_odd_arrays_round_trip(output):
    journal = fresh(output)
    odd = [
        np.zeros((0, 7), np.float32),                          # zero rows
        np.zeros((3, 0), np.int16),                            # zero bytes with rows
        np.float64(2.5),                                       # 0-d
        np.arange(1 << 16, dtype=np.int8).reshape([2] * 16),   # 16 dimensions
        np.arange(40, dtype=np.float32).reshape(5, 8)[:, ::3],  # not contiguous
        np.arange(6, dtype=">i4"),                             # big-endian
        np.array([np.nan, np.inf, -0.0], np.float64),
        np.array([1, 2], "datetime64[ns]"),
        np.array([True]),
    ]
    journal.commit(0, [np.zeros((0, 3), np.float64), np.zeros(0, np.bool_)])
    journal.commit(1, odd)
    journal.commit(2, [])
    assert_same(journal.load(0), [np.zeros((0, 3), np.float64), np.zeros(0, np.bool_)])
    assert_same(journal.load(1), odd)
    assert journal.load(2) == []
    assert journal.load(1)[5].dtype.str == ">i4"
    journal.close()
    assert committed_batches(output) == 3
    assert_same(resumed(output).load(1), odd)


def test_object_arrays_are_refused_and_leave_the_log_as_it_was(output):
    journal = fresh(output)
    journal.commit(0, batch(0))
    size = os.path.getsize(log_path(output))
    with pytest.raises(TypeError):
        journal.commit(4, [np.array([{"a": 1}], dtype=object)])
    assert os.path.getsize(log_path(output)) == size
    assert journal.committed() == {0}


def commit_three(output) -> int:
    """Batches 0, 4, 8 in a closed journal; the log's size before the last record."""
    journal = fresh(output)
    journal.commit(0, batch(0))
    journal.commit(4, batch(4))
    before_last = os.path.getsize(log_path(output))
    journal.commit(8, batch(8))
    journal.close()
    return before_last


def check_resume_drops_only_the_last(output, before_last: int) -> None:
    assert committed_batches(output) == 2
    journal = resumed(output)
    assert journal.committed() == {0, 4}
    assert os.path.getsize(log_path(output)) == before_last   # the bad tail is cut off
    journal.commit(8, batch(8))                               # and the batch is redone after it
    journal.commit(12, batch(12))
    assert journal.committed() == {0, 4, 8, 12}
    journal.close()
    assert committed_batches(output) == 4
    again = resumed(output)
    assert again.committed() == {0, 4, 8, 12}
    for start, arrays in again.batches():
        assert_same(arrays, batch(start))
    again.close()


@pytest.mark.parametrize("cut", [1, 3, 4, 100])
def test_resume_after_a_torn_tail(output, cut):
    before_last = commit_three(output)
    size = os.path.getsize(log_path(output))
    os.truncate(log_path(output), size - cut)
    check_resume_drops_only_the_last(output, before_last)


def test_resume_after_a_torn_header(output):
    before_last = commit_three(output)
    os.truncate(log_path(output), before_last + 10)   # killed inside the last header
    check_resume_drops_only_the_last(output, before_last)


@pytest.mark.parametrize("where", ["payload", "crc", "header"])
def test_resume_after_a_corrupt_byte_in_the_last_record(output, where):
    before_last = commit_three(output)
    size = os.path.getsize(log_path(output))
    position = {"payload": size - 20, "crc": size - 1, "header": before_last + 20}[where]
    with open(log_path(output), "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x40]))
    check_resume_drops_only_the_last(output, before_last)


def test_garbage_after_the_last_record_is_cut(output):
    journal = fresh(output)
    journal.commit(0, batch(0))
    journal.close()
    size = os.path.getsize(log_path(output))
    with open(log_path(output), "ab") as f:
        f.write(b"\0" * 100)
    assert committed_batches(output) == 1
    assert os.path.getsize(log_path(output)) == size + 100   # counting changes nothing
    assert resumed(output).committed() == {0}
    assert os.path.getsize(log_path(output)) == size


def test_a_later_record_for_the_same_rows_wins(output):
    journal = fresh(output)
    journal.commit(0, batch(0))
    journal.commit(0, batch(99))
    assert_same(journal.load(0), batch(99))
    journal.close()
    assert committed_batches(output) == 1
    assert_same(resumed(output).load(0), batch(99))


def test_a_failed_write_leaves_the_log_whole(output, monkeypatch):
    journal = fresh(output)
    journal.commit(0, batch(0))
    size = os.path.getsize(log_path(output))
    real = os.writev
    calls = []

    def half_then_full(fd, buffers):
        calls.append(len(buffers))
        if len(calls) == 1:           # a short write, as writev may do
            return real(fd, [bytes(memoryview(buffers[0])[:7])])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", half_then_full)
    with pytest.raises(OSError, match="No space"):
        journal.commit(4, batch(4))
    monkeypatch.setattr(os, "writev", real)
    assert os.path.getsize(log_path(output)) == size        # the torn record is cut back
    assert journal.committed() == {0}
    journal.commit(4, batch(4))
    journal.close()
    assert committed_batches(output) == 2


def test_short_writes_are_continued(output, monkeypatch):
    real = os.writev

    def dribble(fd, buffers):   # at most 1000 bytes a call, splitting buffers
        return real(fd, [bytes(memoryview(buffers[0]).cast("B")[:1000])])

    journal = fresh(output)
    monkeypatch.setattr(os, "writev", dribble)
    journal.commit(0, batch(0, rows=300))
    journal.commit(300, batch(300, rows=2))
    monkeypatch.setattr(os, "writev", real)
    journal.close()
    again = resumed(output)
    assert_same(again.load(0), batch(0, rows=300))
    assert_same(again.load(300), batch(300, rows=2))


def test_many_arrays_in_one_batch(output):
    journal = fresh(output)
    arrays = [np.full((2,), i, np.int32) for i in range(1500)]   # more buffers than IOV_MAX
    journal.commit(0, arrays)
    journal.close()
    assert_same(resumed(output).load(0), arrays)


def test_committed_batches_counts_without_touching(output, tmp_path):
    assert committed_batches(tmp_path / "nothing.h5") == 0
    journal = fresh(output)
    assert committed_batches(output) == 0
    for count, start in enumerate(range(0, 40, 4), start=1):
        journal.commit(start, batch(start))
        assert committed_batches(output) == count
    with open(log_path(output), "ab") as f:
        f.write(b"SPB1 torn")
    before = os.path.getsize(log_path(output))
    assert committed_batches(output) == 10
    assert os.path.getsize(log_path(output)) == before
    journal.close()


def test_the_crc_covers_the_record(output):
    journal = fresh(output)
    journal.commit(0, batch(0))
    journal.close()
    data = log_path(output).read_bytes()
    assert data[:4] == b"SPB1"
    assert int.from_bytes(data[4:12], "little") == len(data)
    assert int.from_bytes(data[-4:], "little") == zlib.crc32(data[:-4])


def test_the_crc_is_zlib_ngs_and_a_log_from_plain_zlib_resumes(output, monkeypatch):
    """The journal's CRC-32 comes from zlib-ng (a dependency); an install without it falls
    back to the interpreter's zlib, and their logs are the same bytes."""
    from zlib_ng import zlib_ng

    from spmdinfer import journal as journal_module

    assert journal_module.crc32 is zlib_ng.crc32
    with monkeypatch.context() as patched:
        patched.setattr(journal_module, "crc32", zlib.crc32)
        journal = fresh(output)
        journal.commit(0, batch(0))
        journal.commit(4, batch(4, rows=3))
        journal.close()
    plain = log_path(output).read_bytes()
    journal = resumed(output)
    assert journal.committed() == {0, 4}
    assert_same(journal.load(4), batch(4, rows=3))
    journal.close()
    other = output.with_name("other.h5")
    journal = fresh(other)
    journal.commit(0, batch(0))
    journal.commit(4, batch(4, rows=3))
    journal.close()
    assert log_path(other).read_bytes() == plain


def test_a_fresh_journal_that_cannot_be_written_leaves_no_folder(output, monkeypatch):
    def no_room(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Journal, "_open_log", no_room)
    with pytest.raises(OSError, match="No space"):
        fresh(output)
    assert not parts_folder(output).exists()


def test_load_checks_the_crc(output):
    journal = fresh(output)
    journal.commit(0, batch(0))
    journal.commit(4, batch(4))
    with open(log_path(output), "r+b") as f:   # damage the first record under the journal
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(DataError, match="CRC"):
        journal.load(0)
    assert_same(journal.load(4), batch(4))
    journal.close()
    assert committed_batches(output) == 0   # a bad record ends the valid part of the log


def test_commit_from_a_thread_while_committed_is_called(output):
    journal = fresh(output)
    starts = list(range(0, 2000, 10))
    errors = []

    def committer():
        try:
            for start in starts:
                journal.commit(start, batch(start, rows=3))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=committer)
    thread.start()
    calls, previous = 0, set()
    while thread.is_alive():
        now = journal.committed()
        assert previous <= now <= set(starts)   # only ever grows, only with what was committed
        previous = now
        calls += 1
    thread.join()
    assert not errors, errors
    assert journal.committed() == set(starts)
    assert calls > 1
    for start, arrays in journal.batches():
        assert_same(arrays, batch(start, rows=3))
    journal.close()
    assert committed_batches(output) == len(starts)


def test_close_is_idempotent_and_remove_deletes_the_folder(output):
    journal = fresh(output)
    journal.commit(0, batch(0))
    journal.close()
    journal.close()
    with pytest.raises(ValueError):
        journal.commit(4, batch(4))
    assert journal.committed() == {0}
    journal.remove()
    assert not parts_folder(output).exists()
    journal.close()   # after remove too


def test_open_keeps_its_old_rules(output):
    journal = fresh(output)
    journal.commit(0, batch(0))
    journal.close()
    with pytest.raises(OutputExistsError):
        fresh(output)
    with pytest.raises(DataError, match="job file changed"):
        Journal.open(output, {**IDENTITY, "job": "other"}, resume=True, overwrite=False)
    again = Journal.open(output, IDENTITY, resume=False, overwrite=True)   # starts over
    assert again.committed() == set()
    assert committed_batches(output) == 0
    again.close()


def test_a_lock_held_by_a_zombie_is_stale(tmp_path):
    """A killed rank the launcher has not reaped yet holds no lock: --resume may go on."""
    import socket
    import subprocess

    from spmdinfer.journal import OutputLock

    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        output = tmp_path / "out.h5"
        OutputLock(output).path.write_text(f"{socket.gethostname()} {zombie.pid}\n")
        lock = OutputLock(output)
        lock.acquire()  # taken over, not refused
        assert lock.path.read_text().split()[1] == str(os.getpid())
        lock.release()
    finally:
        zombie.wait()
