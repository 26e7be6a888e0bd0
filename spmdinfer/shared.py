"""Node-local batches: a group whose ranks all share one node exchanges its batches through
an MPI-3 shared-memory window instead of messages.

The group's root reads each input batch straight into one of `SLOTS` slots of a window
every rank of the group maps, and publishes it by writing a sequence number into a small
control block. The other ranks predict on the slot in place: no copy, no message. Each
rank then puts its outputs into its own output segment (also mapped by the root) and
writes its "done" sequence number; the root combines the outputs from the segments.

So a batch costs the group two stores and two polls of shared memory, whatever the
number of ranks, where messages cost a broadcast tree and a gather, each step of which
needs the rank on the receiving end to be awake. The root posts the next batch before it
waits for this one's outputs, so the others go straight on to it. Waiting ranks poll the
control block politely with `Channel.until`, as every wait for a peer does (yield, then
sleep; failure notices checked).

Output segments are sized from the first batch's outputs, whose layouts every rank
agrees on through messages (`combine.Combiner`); later batches must keep those layouts.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .comm import DONE, GO, Channel
from .input import InputField

SLOTS = 3              # input slots: one being finished, one posted ahead, one being read
HALVES = 2             # output segments hold two batches: the one posted ahead, the one combined
ALIGN = 64             # bytes; every array in a window starts on a cache line
CELL = ALIGN // 8      # int64s per control cell: one cell per writer, no false sharing
SHM_FOLDER = "/dev/shm"


def usable(group: Channel, slot_bytes: int) -> bool:
    """Whether every rank of `group` shares this rank's node and the node has room for the
    slots (collective over the group; every rank gets the same answer)."""
    from mpi4py import MPI

    node = group.comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        whole = node.size == group.size
    finally:
        node.Free()
    room = shm_room() >= 2 * SLOTS * slot_bytes if group.is_root else True
    return all(group.allgather_objects(whole and room))


def shm_room() -> int:
    """Free bytes in the node's shared-memory file system (containers often make it small)."""
    try:
        stat = os.statvfs(SHM_FOLDER)
    except OSError:
        return 1 << 62  # no /dev/shm: the MPI library maps memory some other way
    return stat.f_bavail * stat.f_frsize


class SharedBatches:
    """The shared window of one group: input slots, a control block, output segments."""

    def __init__(self, group: Channel, fields: Sequence[InputField], capacity: int):
        from mpi4py import MPI

        self.group = group
        self.capacity = capacity
        offsets, size = [], 0
        for f in fields:
            offsets.append(size)
            size += aligned(f.row_bytes * capacity)
        control = aligned(8 * CELL * (1 + SLOTS + group.size))
        self._window = MPI.Win.Allocate_shared(control + SLOTS * size if group.is_root else 0, 1,
                                               comm=group.comm)
        self._window.Lock_all(MPI.MODE_NOCHECK)
        memory = np.frombuffer(self._window.Shared_query(0)[0], dtype=np.uint8)
        self._control = memory[:control].view(np.int64)
        self._posted = self._control[:CELL * (1 + SLOTS):CELL]  # DONE's and each slot's sequence
        self._done = self._control[CELL * (1 + SLOTS):CELL * (1 + SLOTS + group.size):CELL]
        self._slots = []  # per slot, each field's array at full capacity
        for k in range(SLOTS):
            slot = memory[control + k * size:control + (k + 1) * size]
            self._slots.append([slot[o:o + f.row_bytes * capacity].view(np.dtype(f.dtype))
                                .reshape((capacity,) + f.row_shape)
                                for f, o in zip(fields, offsets)])
        if group.is_root:
            self._control[:] = 0
        self._sync()
        self.group.barrier()  # the control block is zeroed before anyone reads it
        self._sequence = 0
        self._outputs: _Outputs | None = None

    # Input slots.

    def slot_arrays(self, slot: int, rows: int | None = None) -> list[np.ndarray]:
        """Views of the input fields in `slot` (the first `rows` rows, or all)."""
        return [array[:rows] for array in self._slots[slot]]

    def post(self, kind: int, start: int, rows: int, slot: int) -> int:
        """Root: publish the batch in `slot`, or DONE (no more batches; `slot` is ignored);
        its sequence number.

        The root may post one batch ahead of the one it combines: the other ranks go on
        to it as soon as they are done, without waiting for the root. Each slot has a
        cell (sequence, kind, start, rows), and DONE a cell of its own, so that it never
        replaces a batch some rank has yet to see; the sequence is written last, and a
        slot is posted again only after every rank has settled the batch it held.
        """
        self._sequence += 1
        cell = CELL * (1 + slot) if kind == GO else 0
        self._control[cell + 1:cell + 4] = kind, start, rows
        self._sync()
        self._control[cell] = self._sequence
        return self._sequence

    def receive(self) -> tuple[int, int, int, list[np.ndarray]]:
        """Others: wait for the root's next batch; (kind, start, rows, arrays in place)."""
        self._sequence += 1
        wanted = self._sequence
        posted = self._posted
        self.group.until(lambda: bool((posted == wanted).any()))
        self._sync()
        cell = CELL * int(np.argmax(posted == wanted))
        kind, start, rows = (int(v) for v in self._control[cell + 1:cell + 4])
        if kind != GO:
            return DONE, 0, 0, []
        return kind, start, rows, self.slot_arrays(cell // CELL - 1, max(rows, 1))

    # Outputs.

    @property
    def has_outputs(self) -> bool:
        return self._outputs is not None

    def open_outputs(self, layouts: Sequence[Sequence[tuple[np.dtype, tuple]]]) -> None:
        """Collective: every rank's output segment, sized from the agreed layouts of a full
        batch ((dtype, shape) of each output, per rank)."""
        self._outputs = _Outputs(self.group, layouts, self.capacity)

    def settle(self, outputs: Sequence[np.ndarray] | None, rows: int,
               sequence: int = 0) -> list[list[np.ndarray]] | None:
        """End of a batch. Others: put `outputs` into the segment (None: not needed) and say
        "done"; after this the rank no longer reads the batch's input slot. Root: wait until
        every rank is done with batch `sequence`; every rank's outputs for it (views, valid
        until the batch after the next is posted), or None when no segments are open."""
        if not self.group.is_root:
            if outputs is not None:
                self._outputs.put(outputs, self._sequence % HALVES)
            self._sync()
            self._done[self.group.rank] = self._sequence
            return None
        others = self._done[1:]
        self.group.until(lambda: bool((others >= sequence).all()))
        self._sync()
        return None if self._outputs is None else self._outputs.views(rows, sequence % HALVES)

    def close(self) -> None:
        """Collective (success only: a failed run leaves the window to the process's end)."""
        if self._outputs is not None:
            self._outputs.close()
        self._window.Unlock_all()
        self._window.Free()

    def _sync(self) -> None:
        self._window.Sync()


class _Outputs:
    """One segment per rank, holding its outputs for HALVES batches; the root maps them all."""

    def __init__(self, group: Channel, layouts, capacity: int):
        from mpi4py import MPI

        self.rank = group.rank
        # Per rank: (dtype, row shape, offset in one half of the segment) of each output.
        places, sizes = [], []
        for rank_layout in layouts:
            mine, offset = [], 0
            for dtype, shape in rank_layout:
                dtype, row_shape = np.dtype(dtype), tuple(shape[1:])
                nbytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64)) * capacity
                mine.append((dtype, (capacity,) + row_shape, offset, nbytes))
                offset += aligned(nbytes)
            places.append(mine)
            sizes.append(offset)
        self._window = MPI.Win.Allocate_shared(max(HALVES * sizes[self.rank], 1), 1,
                                               comm=group.comm)
        self._window.Lock_all(MPI.MODE_NOCHECK)
        # self._arrays[rank][half]: that rank's outputs at full capacity (the root maps the
        # other ranks' segments, each other rank its own).
        self._arrays: dict[int, list[list[np.ndarray]]] = {}
        for rank in (range(1, group.size) if group.is_root else [self.rank]):
            segment = np.frombuffer(self._window.Shared_query(rank)[0], dtype=np.uint8)
            halves = [segment[h * sizes[rank]:(h + 1) * sizes[rank]] for h in range(HALVES)]
            self._arrays[rank] = [[half[o:o + n].view(dtype).reshape(shape)
                                   for dtype, shape, o, n in places[rank]] for half in halves]
        group.barrier()

    def put(self, outputs: Sequence[np.ndarray], half: int) -> None:
        for target, output in zip(self._arrays[self.rank][half], outputs):
            target[:len(output)] = output

    def views(self, rows: int, half: int) -> list[list[np.ndarray]]:
        """Every rank's outputs (none for the root, which has its own at hand)."""
        return [[]] + [[a[:rows] for a in self._arrays[r][half]] for r in sorted(self._arrays)]

    def close(self) -> None:
        self._window.Unlock_all()
        self._window.Free()


def aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN
