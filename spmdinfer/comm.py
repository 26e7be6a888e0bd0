"""Communication between the ranks of a job.

Arrays travel as raw buffers, never pickled, in *packets*: a fixed-size int64
header (what comes: kind, first row, rows, and each array's dtype and shape)
followed by the arrays themselves.

Every wait for a peer goes through `Channel.wait`, which tests a nonblocking
request, checks the job-wide failure notices (`Peers`) and, between tests, yields
the core for a while (`patience`: 1 ms when no more ranks may run on this rank's
cores than it has, as when each has a core of its own or is bound to one, and 20 ms
in the waits after the last batch; none otherwise), then sleeps with a growing
backoff: ranks that wait do not burn a core when ranks outnumber cores, and no rank
waits forever for a peer that has failed. Once a polite
rendezvous shows every rank of a group is present, bulk transfers test without
sleeping (they are moving), still checking for failure notices: a rank never sits
in a blocking call that a failed peer will not join.
"""

from __future__ import annotations

import atexit
import os
import pickle
import socket
import time
from collections import deque
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from .errors import PeerFailed
from .topology import cpu_mask, sharing

ROOT = 0
YIELD_SECONDS = 1e-3  # with a core per rank, yield between tests this long before sleeping
FINISH_YIELD_SECONDS = 20e-3  # ... and this long in the waits at the end of a run
CHECK_EVERY = 16      # tests between two looks at the failure notices while yielding
MIN_DELAY = 20e-6     # first sleep between two tests of a pending request
MAX_DELAY = 1e-3      # longest sleep: bounds the latency a waiting rank adds
MAX_ARRAYS = 64       # arrays per packet
MAX_NDIM = 16         # dims per array
SEND_WINDOW = 2       # packets a rank may have in flight to others before it waits
NOTICE_BYTES = 4096
NOTICE_TAG = 7
STOP_CODE = 75        # a notice with this code asks for a clean stop, not a failure
PACKET_TAG = 11
PICKLE_PROTOCOL = 5

# Packet kinds.
GO, DONE = 0, 1


# Nonblocking operations a failing rank stopped waiting for. mpi4py lets go of a request's
# buffer when its Request object goes, yet MPI may still write a pending receive into that
# buffer (a peer's packet arriving while this rank shuts down): freed memory, a corrupted heap,
# and a crash in MPI_Finalize long after the error was reported. They are kept here, buffers
# and all, and MPI is finalized at exit before the interpreter's teardown frees them.
_abandoned: list = []


def abandon(requests) -> None:
    """Keep these requests (and so their buffers) until MPI is finalized, unless complete."""
    _abandoned.extend(request for request in requests if request)


@atexit.register
def _finalize_before_teardown() -> None:
    """Python's atexit runs before module teardown; mpi4py's own MPI_Finalize runs after it
    (and then has nothing left to do)."""
    if not _abandoned:
        return
    from mpi4py import MPI

    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    _abandoned.clear()


def settle(request) -> None:
    """Complete `request` as `Channel.wait` does, before there is a Channel: test, sleep.
    (`settle(comm.Ibarrier())` before a job's first blocking call: ranks that arrive first
    sleep while the last ones still import, instead of spinning in MPI on their cores.)"""
    sleep_until(request.Test)


def sleep_until(ready: Callable[[], bool], seconds: float | None = None) -> None:
    """Test `ready()` until it holds, sleeping between tests (MIN_DELAY, doubling up to
    MAX_DELAY); give up after `seconds` if given."""
    deadline = None if seconds is None else time.monotonic() + seconds
    delay = MIN_DELAY
    while not ready():
        if deadline is not None and time.monotonic() >= deadline:
            return
        time.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)


class Peers:
    """Notices between all ranks of the job: "this rank failed" (every rank stops now) and
    "stop requested" (every replica stops at its next batch boundary)."""

    def __init__(self, world):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = world.Dup()
        self._buffer = bytearray(NOTICE_BYTES)
        self._request = self._post()
        self._sent: list = []
        self.signalled = False   # set by this process's signal handler (no MPI inside handlers)
        self.stopping = False    # a stop was requested here or by a peer

    def _post(self):
        return self.comm.Irecv(self._buffer, source=self._mpi.ANY_SOURCE, tag=NOTICE_TAG)

    def check(self) -> None:
        """Raise PeerFailed if some rank has sent a failure notice; note stop requests."""
        if self.signalled and not self.stopping:
            self.stopping = True
            self._send(f"{STOP_CODE} -1 stop requested", wait=False)
        while self._request.Test():
            code, batch, text = bytes(self._buffer).rstrip(b"\0").decode("utf-8", "replace").split(" ", 2)
            if int(code) != STOP_CODE:
                raise PeerFailed(text, int(code), None if int(batch) < 0 else int(batch))
            self.stopping = True
            self._buffer[:] = bytes(NOTICE_BYTES)
            self._request = self._post()

    def notify(self, message: str, code: int, batch: int | None = None) -> None:
        """Tell every other rank that this one failed (small messages: they leave at once)."""
        self._send(f"{code} {-1 if batch is None else batch} {message}", wait=True)

    def _send(self, text: str, wait: bool) -> None:
        payload = bytearray(NOTICE_BYTES)
        data = text.encode("utf-8")[:NOTICE_BYTES]
        payload[:len(data)] = data
        self._sent += [(self.comm.Isend(payload, dest=rank, tag=NOTICE_TAG), payload)
                       for rank in range(self.comm.size) if rank != self.comm.rank]
        if wait:
            sleep_until(lambda: self._mpi.Request.Testall([r for r, _ in self._sent]), 5.0)

    def close(self) -> None:
        if self._request:  # still pending: nobody failed
            self._request.Cancel()
            self._request.Wait()
        abandon(request for request, _ in self._sent)
        self.comm.Free()


class Channel:
    """A private duplicate of a communicator with the few operations the runner uses."""

    def __init__(self, comm, peers: Peers, idle: Callable[[], None] | None = None,
                 recorder=None, patience: float | None = None):
        """`patience`: seconds a wait yields the core before it sleeps; by default
        YIELD_SECONDS if the ranks of `comm` that may run on this rank's cores (their CPU
        masks overlap) are no more than those cores, else 0."""
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm.Dup()
        if patience is None:
            node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
            masks = node.allgather(cpu_mask())
            patience = YIELD_SECONDS if sharing(masks, node.rank) <= len(masks[node.rank]) else 0.0
            node.Free()
        self.patience = patience
        self.peers = peers
        self.idle = idle  # run while waiting (rank 0 drains finished batches to the output)
        self.recorder = recorder  # metrics.Recorder: time spent waiting
        self.rank = self.comm.rank
        self.size = self.comm.size
        self._outbox: deque = deque()
        self._buffers: dict[int, np.ndarray] = {}
        self._pads: dict[int, np.ndarray] = {}
        self._turn = 0  # which of two sets of fixed-size buffers the next packet goes into

    @property
    def is_root(self) -> bool:
        return self.rank == ROOT

    def split(self, color: int) -> Channel:
        """The ranks that share `color`, in rank order, with the same peers and idle work."""
        part = self.comm.Split(color, self.rank)
        try:
            return Channel(part, self.peers, self.idle, self.recorder, self.patience)
        finally:
            part.Free()

    def close(self) -> None:
        self.comm.Free()

    # Waiting.

    def finishing(self) -> None:
        """The run's last waits come next (the drain, the outcome, the last barrier), where
        every rank arrives within a few ms of the others: a rank with a core of its own
        yields for up to FINISH_YIELD_SECONDS before it sleeps, so that none of them wakes
        up to MAX_DELAY late. (Each wait of the finish waits on the one before, so those
        late wake-ups added up: 3 to 5 ms at the end of a run over two emulated hosts.)"""
        if self.patience:
            self.patience = max(self.patience, FINISH_YIELD_SECONDS)

    def wait(self, request, busy: bool = False) -> None:
        """Complete `request`, yielding then sleeping between tests; raise PeerFailed if a
        peer failed.

        `busy`: a bulk transfer already under way, which MPI moves forward only inside
        tests: test without sleeping, yielding the core to any rank that has work.
        """
        try:
            self.until(request.Test, busy)
        except BaseException:
            abandon([request])
            raise

    def until(self, ready: Callable[[], bool], busy: bool = False) -> None:
        """Poll `ready()` (a request's test, or a flag in shared memory) as `wait` does."""
        if ready():
            return
        began = time.time()
        delay = MIN_DELAY
        polls = 0
        while not ready():
            polls += 1
            yielding = busy or time.time() - began < self.patience
            if not yielding or polls % CHECK_EVERY == 0:
                self.peers.check()
                if self.idle is not None:
                    self.idle()
            if yielding:
                os.sched_yield()
            else:
                time.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)
        if self.recorder is not None:
            self.recorder.add("wait", began, time.time() - began)

    def wait_all(self, requests) -> None:
        for request in requests:
            self.wait(request)

    def barrier(self) -> None:
        self.wait(self.comm.Ibarrier())

    # Small metadata (pickled), only at start-up and at the end: the sizes, then the bytes,
    # each a nonblocking collective waited for as above. (mpi4py's pickled collectives block,
    # and MPI spins inside a blocking call until its last member arrives: on a core that
    # member may need, for as long as it takes to arrive.)

    def bcast_object(self, obj: Any) -> Any:
        data = bytearray(pickle.dumps(obj, PICKLE_PROTOCOL)) if self.is_root else None
        size = np.array([len(data) if self.is_root else 0], np.int64)
        self.wait(self.comm.Ibcast(size, root=ROOT))
        if not self.is_root:
            data = bytearray(int(size[0]))
        self.wait(self.comm.Ibcast(data, root=ROOT))
        return obj if self.is_root else pickle.loads(data)

    def gather_objects(self, obj: Any) -> list[Any] | None:
        data = pickle.dumps(obj, PICKLE_PROTOCOL)
        sizes = np.zeros(self.size, np.int64)
        self.wait(self.comm.Igather(np.array([len(data)], np.int64), sizes, root=ROOT))
        if not self.is_root:
            self.wait(self.comm.Igatherv(data, None, root=ROOT))
            return None
        received, displacements = bytearray(int(sizes.sum())), _displacements(sizes)
        self.wait(self.comm.Igatherv(data, [received, (sizes, displacements), self._mpi.BYTE],
                                     root=ROOT))
        return _unpickled(received, sizes, displacements)

    def allgather_objects(self, obj: Any) -> list[Any]:
        data = pickle.dumps(obj, PICKLE_PROTOCOL)
        sizes = np.zeros(self.size, np.int64)
        self.wait(self.comm.Iallgather(np.array([len(data)], np.int64), sizes))
        received, displacements = bytearray(int(sizes.sum())), _displacements(sizes)
        self.wait(self.comm.Iallgatherv(data, [received, (sizes, displacements), self._mpi.BYTE]))
        return _unpickled(received, sizes, displacements)

    def agree(self, error: BaseException | None, code: int = 0, value: Any = None) -> Any:
        """Raise PeerFailed on every rank if `error` is set on any rank; else return the
        root's `value` on every rank.

        Every rank must call this at the same point; the root learns each rank's
        message and host, so the first failure can be printed once.
        """
        report = None if error is None else (code or 2, str(error), socket.gethostname())
        reports = self.gather_objects(report)
        verdict = None
        if self.is_root:
            verdict = ([(rank, r) for rank, r in enumerate(reports) if r is not None], value)
        failed, value = self.bcast_object(verdict)
        if failed:
            raise job_failed(failed, self.size)
        return value

    # Packets inside a group: the root's arrays reach every rank.

    def bcast_packet(self, kind: int = GO, start: int = 0, rows: int = 0,
                     arrays: Sequence[np.ndarray] = ()) -> tuple[int, int, int, list[np.ndarray]]:
        """Broadcast a packet from the root; every rank returns (kind, start, rows, arrays)."""
        return self.take_packet(self.post_packet(kind, start, rows, arrays))

    def post_packet(self, kind: int = GO, start: int = 0, rows: int = 0,
                    arrays: Sequence[np.ndarray] = (),
                    fixed: Sequence[tuple[np.dtype, tuple]] | None = None) -> PostedPacket:
        """Start a packet's broadcast without waiting: the root posts the header and the
        arrays at once (collectives on one communicator match in order), the others post the
        header's receive (they learn the arrays' sizes from it). `take_packet` completes it;
        the root's arrays must stay untouched until then.

        `fixed`: the (dtype, shape) of each array at its largest, the same for every packet
        and known to every rank (a stage's input fields at full batch size). The others then
        post the arrays' receives together with the header's, so a batch moves as soon as
        both ends have posted it; the root pads a packet with fewer rows, or no arrays."""
        if fixed is not None:
            return self._post_fixed(kind, start, rows, arrays, fixed)
        if self.is_root:
            header = pack_header(kind, start, rows, arrays)
            return PostedPacket(self._broadcasts(header, arrays), header,
                                (kind, start, rows, list(arrays)))
        header = empty_header()
        return PostedPacket(self._broadcasts(header), header)

    def _post_fixed(self, kind: int, start: int, rows: int, arrays: Sequence[np.ndarray],
                    fixed: Sequence[tuple[np.dtype, tuple]]) -> PostedPacket:
        # The header needs room for the fixed arrays only: a small broadcast, sent eagerly.
        if self.is_root:
            if len(arrays) > len(fixed):
                raise RuntimeError(f"{len(arrays)} arrays in a packet of {len(fixed)} fixed ones")
            header = pack_header(kind, start, rows, arrays)[:header_size(len(fixed))]
            sent = [self._padded(k, dtype, shape, arrays[k] if k < len(arrays) else None)
                    for k, (dtype, shape) in enumerate(fixed)]
            return PostedPacket(self._broadcasts(header, sent), header,
                                (kind, start, rows, list(arrays)))
        # Two sets of buffers in turn: this packet's receive may be posted while the arrays of
        # the one before are still in use.
        self._turn = 1 - self._turn
        buffers = [self._receive_buffer(2 * k + self._turn, dtype, shape)
                   for k, (dtype, shape) in enumerate(fixed)]
        header = empty_header(len(fixed))
        return PostedPacket(self._broadcasts(header, buffers), header, buffers=buffers)

    def _broadcasts(self, header: np.ndarray, arrays: Sequence[np.ndarray] = ()) -> list:
        """Post the header's broadcast, then each non-empty array's, in that order on every
        rank (collectives on one communicator match in order)."""
        return [self.comm.Ibcast(header, root=ROOT),
                *(self.comm.Ibcast(_bytes(a), root=ROOT) for a in arrays if a.nbytes)]

    def _padded(self, k: int, dtype: np.dtype, shape: tuple,
                array: np.ndarray | None) -> np.ndarray:
        """`array` as the root sends it as fixed array `k`: itself at full size, else copied
        into a kept buffer of that size (the last, shorter batch; zeros for no array)."""
        if array is not None and (array.dtype != dtype or array.shape[1:] != shape[1:]
                                  or array.shape[0] > shape[0]):
            raise RuntimeError(f"array {k} of a packet is {array.dtype} {array.shape}, beyond "
                               f"the fixed {np.dtype(dtype)} {shape}")
        if array is not None and array.shape == shape:
            return array
        pad = self._pads.get(k)
        if pad is None or pad.dtype != dtype or pad.shape != shape:
            pad = self._pads[k] = np.zeros(shape, dtype)
        if array is not None:
            pad[:array.shape[0]] = array
        return pad

    def take_packet(self, posted: PostedPacket) -> tuple[int, int, int, list[np.ndarray]]:
        """Complete a posted broadcast; every rank returns (kind, start, rows, arrays)."""
        first, *rest = posted.requests
        try:
            self.wait(first)  # every rank is there once it completes: the rest moves busily
            if self.is_root or posted.buffers is not None:
                for request in rest:
                    self.wait(request, busy=True)
                if self.is_root:
                    return posted.packet
        except BaseException:
            abandon(rest)  # a peer failed: the arrays' broadcasts keep their buffers
            raise
        kind, start, rows, layout = unpack_header(posted.header)
        if posted.buffers is not None:
            return kind, start, rows, [buffer[:shape[0]] for buffer, (_, shape)
                                       in zip(posted.buffers, layout)]
        arrays = [self._receive_buffer(k, dtype, shape) for k, (dtype, shape) in enumerate(layout)]
        for array in arrays:
            if array.nbytes:
                self.wait(self.comm.Ibcast(_bytes(array), root=ROOT), busy=True)
        return kind, start, rows, arrays

    def _receive_buffer(self, slot: int, dtype: np.dtype, shape: tuple) -> np.ndarray:
        """A view of a buffer kept between batches (fresh buffers each batch cost page faults);
        the arrays of one batch are done with before the next batch arrives."""
        held = self._buffers.get(slot)
        if held is None or held.dtype != dtype or held.shape[1:] != shape[1:] or \
                held.shape[0] < shape[0]:
            held = self._buffers[slot] = np.empty(shape, dtype)
        return held[:shape[0]] if shape else held

    # Packets between two ranks.

    def send_packet(self, dest: int, kind: int, start: int, rows: int,
                    arrays: Sequence[np.ndarray] = ()) -> None:
        """Send a packet to `dest` without waiting for it, keeping at most SEND_WINDOW in flight."""
        while len(self._outbox) >= SEND_WINDOW:
            self._complete_oldest()
        arrays = [np.ascontiguousarray(a) for a in arrays]
        header = pack_header(kind, start, rows, arrays)
        requests = [self.comm.Isend(header, dest=dest, tag=PACKET_TAG)]
        requests += [self.comm.Isend(_bytes(a), dest=dest, tag=PACKET_TAG) for a in arrays if a.nbytes]
        self._outbox.append((requests, header, arrays))  # buffers live until sent

    def flush(self) -> None:
        """Wait until every packet this rank sent has left."""
        while self._outbox:
            self._complete_oldest()

    def abandon(self, seconds: float = 2.0) -> None:
        """On failure: give packets in flight a moment to leave, so that no peer reads a
        buffer this process no longer holds; then drop them."""
        requests = [r for entry in self._outbox for r in entry[0]]
        sleep_until(lambda: self._mpi.Request.Testall(requests), seconds)
        abandon(requests)
        self._outbox.clear()

    def _complete_oldest(self) -> None:
        """Wait for the oldest packet in flight; its buffers stay referenced until it has left."""
        requests, _header, _arrays = self._outbox[0]
        self.wait_all(requests)
        self._outbox.popleft()

    def recv_packet(self, source: int) -> tuple[int, int, int, list[np.ndarray]]:
        receiver = PacketReceiver(self, source)
        while (packet := receiver.poll()) is None:
            self.wait(receiver.request)
        return packet

    # Combining a group's outputs on its root.

    def allgather_layouts(self, arrays: Sequence[np.ndarray]) -> list[list[tuple[np.dtype, tuple]]]:
        """Every rank's (dtype, shape) of each array, so every rank reaches the same verdict."""
        table = np.empty((self.size, header_size()), dtype=np.int64)
        self.wait(self.comm.Iallgather(pack_header(GO, 0, 0, arrays), table))
        return [unpack_header(row)[3] for row in table]

    def gather(self, array: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray] | None:
        """Every rank's `array` (shapes known from the layouts), in rank order, on the root."""
        counts = [int(np.prod(s)) * array.itemsize for s in shapes]
        if not self.is_root:
            self.wait(self.comm.Igatherv(_bytes(array), None, root=ROOT), busy=True)
            return None
        received = np.empty(sum(counts), dtype=np.uint8)
        displacements = np.cumsum([0] + counts[:-1])
        self.wait(self.comm.Igatherv(_bytes(array), [received, counts, displacements,
                                                     self._mpi.BYTE], root=ROOT), busy=True)
        return [received[d:d + c].view(array.dtype).reshape(s)
                for d, c, s in zip(displacements, counts, shapes)]


def _displacements(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64)


def _unpickled(data: bytearray, sizes: np.ndarray, displacements: np.ndarray) -> list[Any]:
    view = memoryview(data)
    return [pickle.loads(view[d:d + n]) for d, n in zip(displacements, sizes)]


class PostedPacket(NamedTuple):
    """A broadcast under way (Channel.post_packet): its requests and the buffers they use."""

    requests: list
    header: np.ndarray
    packet: tuple | None = None  # the root's (kind, start, rows, arrays)
    buffers: list | None = None  # the others' fixed-size arrays, under way (`fixed`)


class PacketReceiver:
    """A packet from one rank, received without blocking: poll() until it returns it."""

    def __init__(self, channel: Channel, source: int):
        self.channel = channel
        self.source = source
        self.header = empty_header()
        self.request = channel.comm.Irecv(self.header, source=source, tag=PACKET_TAG)
        self.arrays: list[np.ndarray] | None = None
        self._data_requests: list = []

    def poll(self):
        """The packet (kind, start, rows, arrays) once it has fully arrived, else None."""
        if self.arrays is None:
            if not self.request.Test():
                return None
            self.channel.peers.check()  # a failed sender's packet is not to be trusted
            _, _, _, layout = unpack_header(self.header)
            self.arrays = [np.empty(shape, dtype) for dtype, shape in layout]
            self._data_requests = [self.channel.comm.Irecv(_bytes(a), source=self.source,
                                                           tag=PACKET_TAG)
                                   for a in self.arrays if a.nbytes]
        while self._data_requests:
            if not self._data_requests[0].Test():
                self.request = self._data_requests[0]
                return None
            self._data_requests.pop(0)
        kind, start, rows, _ = unpack_header(self.header)
        return kind, start, rows, self.arrays

    def abandon(self) -> None:
        """On failure: stop receiving (see `abandon`)."""
        abandon([self.request, *self._data_requests])


def header_size(arrays: int = MAX_ARRAYS) -> int:
    """int64s in a header with room for `arrays` arrays."""
    return 4 + arrays * (2 + MAX_NDIM)


def empty_header(arrays: int = MAX_ARRAYS) -> np.ndarray:
    return np.zeros(header_size(arrays), dtype=np.int64)


def pack_header(kind: int, start: int, rows: int, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The int64 header of a packet: kind, start, rows, count, then (dtype, ndim, dims) each."""
    if len(arrays) > MAX_ARRAYS:
        raise ValueError(f"{len(arrays)} arrays in one batch; at most {MAX_ARRAYS} are supported")
    header = empty_header()
    header[:4] = kind, start, rows, len(arrays)
    for k, array in enumerate(arrays):
        if array.ndim > MAX_NDIM:
            raise ValueError(f"an array with {array.ndim} dimensions; at most {MAX_NDIM} are supported")
        at = 4 + k * (2 + MAX_NDIM)
        header[at:at + 2] = ord(array.dtype.char), array.ndim
        header[at + 2:at + 2 + array.ndim] = array.shape
    return header


def unpack_header(header: np.ndarray) -> tuple[int, int, int, list[tuple[np.dtype, tuple]]]:
    kind, start, rows, count = (int(v) for v in header[:4])
    if kind not in (GO, DONE) or not 0 <= count <= MAX_ARRAYS:
        raise RuntimeError(f"corrupt packet header {header[:4].tolist()}")
    layout = []
    for k in range(count):
        at = 4 + k * (2 + MAX_NDIM)
        code, ndim = int(header[at]), int(header[at + 1])
        if not (0 < code < 128 and 0 <= ndim <= MAX_NDIM):
            raise RuntimeError(f"corrupt packet header for array {k}: {header[at:at + 2].tolist()}")
        layout.append((np.dtype(chr(code)), tuple(int(d) for d in header[at + 2:at + 2 + ndim])))
    return kind, start, rows, layout


def job_failed(failed: list[tuple[int, tuple[int, str, str]]], size: int) -> PeerFailed:
    """One PeerFailed that names the first failing rank (and how many others failed)."""
    rank, (code, message, host) = failed[0]
    where = f"rank {rank} ({host}): " if size > 1 else ""
    others = f" [and {len(failed) - 1} more rank(s) failed]" if len(failed) > 1 else ""
    return PeerFailed(f"{where}{message}{others}", max(c for _, (c, _, _) in failed))


def _bytes(array: np.ndarray) -> np.ndarray:
    """A flat byte view of a contiguous array, so any dtype travels as MPI.BYTE."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)
