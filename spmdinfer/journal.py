"""The durable record of a run: committed batches, what produced them, and who holds the output.

HDF5 is not crash-safe: a writer killed in the middle of a write can leave a file
that no longer opens. So a run never writes its output file until the end.
Rank 0 commits every finished batch to `FILE.parts/batches.log`, one append-only
file with one record per batch. A record is a little-endian header (magic, record
length, first row, number of arrays, and each array's dtype and shape), the raw
array bytes (C order, each array starting at a multiple of 64 bytes from the start
of the record; the gaps are zeros) and a CRC32 of everything before it:

    magic "SPB1" | length u64 | start i64 | arrays u32
    per array: dtype length u8 | dtype (numpy's dtype.str, ASCII) | ndim u8 | shape u64 * ndim
    zeros up to a multiple of 64 | per array: its bytes, zeros before it up to a multiple of 64
    CRC32 (zlib's) u32 of all the bytes above

Each record goes out with one appending write, so a process killed in the middle of
one leaves at most one torn record, at the end. A batch counts as committed only
when its record is whole and its CRC matches; `--resume` reads the log from the
start, stops at the first record that is not, cuts the file there and appends
after it, so a torn batch is simply done again. When every batch is committed,
rank 0 assembles `FILE.partial` from the log, marks it complete, renames it to
`FILE` and removes the parts. `--resume` continues from the parts after checking
(manifest.json) that the job, the slices and the input are the ones that produced
them.

`FILE.lock` keeps two runs off one output: created exclusively (O_EXCL, which
NFS v3 and later honour), holding the host and pid, and touched by rank 0 while
the run lives. A lock whose holder is a dead process on this host, or that has
not been touched for LOCK_STALE_SECONDS, is stale and taken over, so a crashed
run never blocks `--resume`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import struct
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import DataError, OutputExistsError

try:
    # zlib's own CRC-32, bit for bit, computed with the CPU's carry-less multiply: 0.016 ms
    # a MiB against 0.144 with the interpreter's zlib, and a 1 MiB commit took 0.195 ms of
    # CPU against 0.326 (an AVX-512 AMD EPYC, 2026-12-06; docs/performance.md). Rank 0's commit thread computes one for each
    # batch's outputs, on a core the ranks may want.
    from zlib_ng.zlib_ng import crc32
except ImportError:  # an install without it writes and reads the same records
    from zlib import crc32

PARTS_SUFFIX = ".parts"
LOCK_SUFFIX = ".lock"
MANIFEST = "manifest.json"
LOG = "batches.log"
LOCK_REFRESH_SECONDS = 10.0
LOCK_STALE_SECONDS = 60.0
FINGERPRINT_BLOCKS = 16
FINGERPRINT_BLOCK_BYTES = 1 << 16

MAGIC = b"SPB1"
HEAD = struct.Struct("<4sQqI")       # magic, record length, first row, number of arrays
CRC = struct.Struct("<I")
ALIGN = 64                           # every array starts at a multiple of this in its record
MAX_DIMS = 64                        # numpy 2's limit (32 before)
MAX_HEADER = 1 << 20                 # a header longer than this is refused (and read as corrupt)
DTYPE_KINDS = "biufcmMSU"            # bool, ints, floats, complex, times, fixed-size strings
READ_CHUNK = 16 << 20                # the scan reads records longer than this piecewise
_ZEROS = bytes(ALIGN)


def _iov_max() -> int:
    try:
        return max(min(os.sysconf("SC_IOV_MAX"), 1024), 16)
    except (AttributeError, ValueError, OSError):
        return 16


_IOV_MAX = _iov_max()


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + PARTS_SUFFIX)


def committed_batches(output: Path) -> int:
    """How many batches of `output` are committed: the valid records of its log (reads it,
    changes nothing; 0 when there is none)."""
    try:
        f = open(parts_folder(output) / LOG, "rb", buffering=1 << 20)
    except FileNotFoundError:
        return 0
    with f:
        index, _ = _scan(f, os.fstat(f.fileno()).st_size)
    return len(index)


class Journal:
    """FILE.parts/: an append-only log of the committed batches, and a manifest saying what
    they belong to.

    One thread may commit while others call `committed`, `load` or `batches`.
    """

    def __init__(self, folder: Path, manifest: dict, fsync: bool):
        self.folder = folder
        self.manifest = manifest
        self._fsync = fsync
        self._index: dict[int, tuple[int, int]] = {}   # first row -> (offset, length) in the log
        self._fd: int | None = None
        self._end = 0                   # where the next record goes
        self._broken: OSError | None = None
        self._lock = threading.Lock()   # the index and the fd
        self._write_lock = threading.Lock()  # one commit at a time; taken before _lock

    @classmethod
    def open(cls, output: Path, identity: dict, resume: bool, overwrite: bool,
             fsync: bool = False) -> Journal:
        """The journal of `output`: a fresh one, or (with resume) the one a stopped run left.

        `identity` says what produced the batches (job, slices, input); resuming with a
        different one is refused, naming what changed.
        """
        folder = parts_folder(output)
        if folder.exists() and not (resume or overwrite):
            raise OutputExistsError(f"[output] file {output}: a partial run left {folder}; pass "
                                    "--resume to continue it or --overwrite to start again")
        if folder.exists() and resume:
            manifest = cls._read_manifest(folder)
            changed = [key for key in identity if manifest.get("identity", {}).get(key) != identity[key]]
            if changed:
                raise DataError(f"--resume refused: {describe_changes(changed)} since the run that "
                                f"left {folder}; pass --overwrite to start again")
            journal = cls(folder, manifest, fsync)
            journal._open_log()
            return journal
        if folder.exists():
            remove_tree(folder)
        folder.mkdir(parents=True)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        journal = cls(folder, {"identity": identity, "attempts": {}, "runs": 0,
                               "start_time": started}, fsync)
        try:
            journal.save_manifest()
            journal._open_log()
        except BaseException:  # no room for the manifest: no half-made folder left behind
            with contextlib.suppress(OSError):
                remove_tree(folder)
            raise
        return journal

    def _open_log(self) -> None:
        """Open the log for appending; read what it holds and cut a torn or corrupt tail."""
        path = self.folder / LOG
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            size = os.fstat(fd).st_size
            with open(fd, "rb", buffering=1 << 20, closefd=False) as f:
                index, end = _scan(f, size)
            if end < size:
                os.ftruncate(fd, end)
                if self._fsync:
                    os.fsync(fd)
            if created and self._fsync:
                _fsync_folder(self.folder)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._index, self._end = fd, index, end

    @staticmethod
    def _read_manifest(folder: Path) -> dict:
        try:
            return json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"--resume refused: {folder / MANIFEST} is missing or unreadable "
                            f"({exc}); pass --overwrite to start again") from None

    def save_manifest(self) -> None:
        self._replace(self.folder / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    def committed(self) -> set[int]:
        """The first rows of every committed batch."""
        with self._lock:
            return set(self._index)

    def commit(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        """Make one finished batch durable: one record appended to the log with one write
        (and fdatasync with fsync on). After a failed write the log is cut back, so it
        holds the batch whole or not at all."""
        buffers, length = _record(start, arrays)
        with self._write_lock:
            if self._fd is None:
                raise ValueError(f"the journal {self.folder} is closed")
            if self._broken is not None:
                raise OSError(self._broken.errno or errno.EIO,
                              f"the log could not be cut back after a failed write "
                              f"({self._broken.strerror or self._broken})")
            offset = self._end
            try:
                _write_all(self._fd, buffers, length)
                if self._fsync:
                    os.fdatasync(self._fd)
            except BaseException:
                try:
                    os.ftruncate(self._fd, offset)
                except OSError as exc:
                    self._broken = exc
                raise
            self._end = offset + length
            with self._lock:
                self._index[start] = (offset, length)

    def load(self, start: int) -> list[np.ndarray]:
        """The arrays of the batch committed at `start` (KeyError when there is none)."""
        with self._lock:
            offset, length = self._index[start]
            record = self._read(offset, length)
        found, arrays = _parse(record)
        if found != start:
            raise DataError(f"{self.folder / LOG}: the record at byte {offset} holds rows "
                            f"from {found}, not {start}")
        return arrays

    def batches(self) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Every committed batch as (first row, arrays), in row order."""
        for start in sorted(self.committed()):
            yield start, self.load(start)

    def _read(self, offset: int, length: int) -> np.ndarray:
        """One record's bytes, read into a new (aligned) buffer; the caller holds _lock."""
        if self._fd is None:
            raise ValueError(f"the journal {self.folder} is closed")
        record = np.empty(length, np.uint8)
        done = 0
        while done < length:
            view = memoryview(record)[done:]
            if hasattr(os, "preadv"):
                got = os.preadv(self._fd, [view], offset + done)
            else:
                data = os.pread(self._fd, length - done, offset + done)
                got = len(data)
                view[:got] = data
            if got == 0:
                raise DataError(f"{self.folder / LOG} ends inside the record at byte {offset}")
            done += got
        return record

    def count_attempts(self, starts: Sequence[int], max_attempts: int = 0, batch_size: int = 0,
                       rows: int = 0) -> None:
        """Count one more attempt at each of `starts`; with `max_attempts`, refuse a batch
        that has had that many already."""
        attempts = self.manifest["attempts"]
        for start in starts:
            if max_attempts and attempts.get(str(start), 0) >= max_attempts:
                stop = min(start + batch_size, rows)
                raise DataError(f"batch at rows {start}..{max(stop, start + 1) - 1} was attempted "
                                f"{attempts[str(start)]} times without being committed "
                                f"([run] max_attempts = {max_attempts}); giving up. Look at the "
                                "failures of the earlier runs, or raise max_attempts")
            attempts[str(start)] = attempts.get(str(start), 0) + 1
        if max_attempts:
            self.manifest["runs"] += 1
        self.save_manifest()

    def forget_attempts(self, starts: Sequence[int]) -> None:
        """Undo the count for batches this run never started (it stopped cleanly first)."""
        committed = self.committed()
        for start in starts:
            key = str(start)
            if start not in committed and self.manifest["attempts"].get(key):
                self.manifest["attempts"][key] -= 1
        self.save_manifest()

    def close(self) -> None:
        """Close the log (waits for a commit in progress); again does nothing."""
        with self._write_lock, self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)

    def remove(self) -> None:
        self.close()
        remove_tree(self.folder)

    def _replace(self, path: Path, data: bytes) -> None:
        temp = path.with_name(path.name + ".tmp")
        with open(temp, "wb") as f:
            f.write(data)
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)


class _Corrupt(Exception):
    """A record that is torn, or whose bytes do not add up."""


def _pad(position: int) -> int:
    return -position % ALIGN


def _record(start: int, arrays: Sequence[np.ndarray]) -> tuple[list, int]:
    """The buffers of one record (the arrays' own memory, not copied) and its length."""
    meta = []
    payload = []
    for array in arrays:
        array = np.asarray(array)
        if array.dtype.kind not in DTYPE_KINDS or array.dtype.fields is not None:
            raise TypeError(f"cannot commit an array of dtype {array.dtype} (numeric and "
                            "fixed-size string dtypes only)")
        if array.ndim > MAX_DIMS:
            raise ValueError(f"cannot commit an array with {array.ndim} dimensions")
        shape = array.shape
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        code = array.dtype.str.encode("ascii")
        meta.append(struct.pack(f"<B{len(code)}sB{len(shape)}Q", len(code), code, len(shape),
                                *shape))
        payload.append(memoryview(array.reshape(-1).view(np.uint8)))
    head_len = HEAD.size + sum(map(len, meta))
    if head_len > MAX_HEADER:
        raise ValueError(f"too many arrays in one batch ({len(meta)})")
    buffers: list = []
    position = head_len + _pad(head_len)
    for data in payload:
        if data.nbytes:
            if _pad(position):
                buffers.append(_ZEROS[:_pad(position)])
                position += _pad(position)
            buffers.append(data)
            position += data.nbytes
    length = position + CRC.size
    head = b"".join([HEAD.pack(MAGIC, length, start, len(meta)), *meta, _ZEROS[:_pad(head_len)]])
    crc = crc32(head)
    for data in buffers:
        crc = crc32(data, crc)
    return [head, *buffers, CRC.pack(crc)], length


def _write_all(fd: int, buffers: list, length: int) -> None:
    """Append `buffers` with as few writev calls as the kernel allows (partial writes go on
    where they stopped)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    written = 0
    while views:
        count = os.writev(fd, views[:_IOV_MAX])
        if count <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        written += count
        while views and count >= views[0].nbytes:
            count -= views[0].nbytes
            views.pop(0)
        if count:
            views[0] = views[0][count:]
    if written != length:
        raise OSError(errno.EIO, f"wrote {written} bytes of a {length}-byte record")


def _layout(head: bytes | np.ndarray, length: int) -> tuple[int, list[tuple[np.dtype, tuple, int, int]]]:
    """Parse a record's header: (first row, [(dtype, shape, offset, bytes)]); checks that the
    arrays end where the CRC begins."""
    try:
        magic, declared, start, count = HEAD.unpack_from(head, 0)
        if magic != MAGIC or declared != length:
            raise _Corrupt("bad magic or length")
        position = HEAD.size
        arrays = []
        for _ in range(count):
            (size,) = struct.unpack_from("<B", head, position)
            code = bytes(head[position + 1:position + 1 + size]).decode("ascii")
            (ndim,) = struct.unpack_from("<B", head, position + 1 + size)
            if ndim > MAX_DIMS:
                raise _Corrupt("too many dimensions")
            shape = struct.unpack_from(f"<{ndim}Q", head, position + 2 + size)
            position += 2 + size + 8 * ndim
            dtype = np.dtype(code)
            if dtype.kind not in DTYPE_KINDS or dtype.str != code:
                raise _Corrupt(f"dtype {code!r}")
            arrays.append((dtype, shape))
        position += _pad(position)
        laid = []
        for dtype, shape in arrays:
            nbytes = dtype.itemsize * int(np.prod(shape, dtype=object))
            if nbytes:
                position += _pad(position)
            laid.append((dtype, shape, position, nbytes))
            position += nbytes
        if position + CRC.size != length:
            raise _Corrupt("arrays do not fill the record")
        return start, laid
    except (struct.error, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise _Corrupt(str(exc)) from None


def _parse(record: np.ndarray) -> tuple[int, list[np.ndarray]]:
    """A record read into `record`: its first row and its arrays (views of `record`)."""
    length = len(record)
    body = length - CRC.size
    if body < HEAD.size or crc32(memoryview(record)[:body]) != CRC.unpack_from(record, body)[0]:
        raise DataError("a record of the journal's log does not match its CRC")
    try:
        start, laid = _layout(record, length)
    except _Corrupt as exc:
        raise DataError(f"a record of the journal's log is malformed ({exc})") from None
    return start, [record[offset:offset + nbytes].view(dtype).reshape(shape)
                   for dtype, shape, offset, nbytes in laid]


def _scan(f, size: int) -> tuple[dict[int, tuple[int, int]], int]:
    """Read a log from its start: {first row: (offset, length)} of the whole records with a
    matching CRC, up to the first one that is not, and where that one begins (the end of the
    good part). A later record for the same first row replaces an earlier one."""
    index: dict[int, tuple[int, int]] = {}
    offset = 0
    f.seek(0)
    while size - offset >= HEAD.size + CRC.size:
        head = f.read(HEAD.size)
        if len(head) != HEAD.size:
            break
        magic, length, start, _ = HEAD.unpack(head)
        if magic != MAGIC or length < HEAD.size + CRC.size or length > size - offset:
            break
        body = length - CRC.size
        first = head + f.read(min(body, READ_CHUNK) - HEAD.size)  # the header is in here
        crc = crc32(first)
        left = body - len(first)
        while left:
            chunk = f.read(min(left, READ_CHUNK))
            if not chunk:
                break
            crc = crc32(chunk, crc)
            left -= len(chunk)
        tail = f.read(CRC.size)
        if left or len(tail) != CRC.size or CRC.unpack(tail)[0] != crc:
            break
        try:
            _layout(first, length)
        except _Corrupt:
            break
        index[start] = (offset, length)
        offset += length
    return index, offset


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_changes(keys: Sequence[str]) -> str:
    words = {"job": "the job file changed", "slices": "the model slices changed",
             "input": "the input file changed", "world": "the launch layout changed"}
    return "; ".join(words.get(k, f"{k} changed") for k in keys)


def fingerprint(path: Path) -> str:
    """A quick identity of a (possibly huge) file: its size and a sample of its bytes.

    Sixteen 64 KiB blocks spread over the file plus its last block are hashed, so
    resuming against a different or rewritten input is caught without reading it all.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        step = max(size // FINGERPRINT_BLOCKS, 1)
        for offset in list(range(0, size, step))[:FINGERPRINT_BLOCKS] + [max(size - FINGERPRINT_BLOCK_BYTES, 0)]:
            f.seek(offset)
            digest.update(f.read(FINGERPRINT_BLOCK_BYTES))
    return digest.hexdigest()


def remove_tree(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


class OutputLock:
    """FILE.lock: one run per output at a time, across hosts sharing the file system."""

    def __init__(self, output: Path):
        self.path = output.with_name(output.name + LOCK_SUFFIX)
        self._held = False
        self._touched = 0.0

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._stale_holder()
                if holder is not None:
                    raise DataError(f"[output] file {self.path.with_suffix('')}: another run is "
                                    f"writing it ({holder}; lock {self.path}); wait for it, or "
                                    "remove the lock if you are sure it is gone") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
            self._held = True
            self._touched = time.monotonic()
            return
        raise DataError(f"cannot take the lock {self.path}")

    def _stale_holder(self) -> str | None:
        """Who holds the lock, or None when the lock is stale."""
        try:
            host, pid = self.path.read_text().split()
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return None
        if host == socket.gethostname() and not _alive(int(pid)):
            return None
        if age > LOCK_STALE_SECONDS:
            return None
        return f"pid {pid} on {host}, lock refreshed {age:.0f} s ago"

    def refresh(self) -> None:
        """Touch the lock now and then, so other hosts can tell it is alive."""
        if self._held and time.monotonic() - self._touched > LOCK_REFRESH_SECONDS:
            os.utime(self.path)
            self._touched = time.monotonic()

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs; a zombie (dead, not yet reaped: launchers reap killed
    ranks late, and some containers' PID 1 never does) has stopped writing, so it is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc here: kill(0) is all there is
    return state not in ("Z", "X")
