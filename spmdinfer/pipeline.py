"""One rank's part in its replica's pipeline: three small objects the run loop composes.

- A *source* gives every rank of a stage's group the group's next batch. The group's
  leader (its first rank) gets it from a *feed*: the input file (stage 0, read ahead by the
  Prefetcher) or the stage before. The others get it from their leader: through shared
  memory (a stage-0 group on one node) or by message.
- A *stage* predicts this rank's slice of the batch and combines the group's outputs on
  the leader.
- A *sink* takes the leader's combined outputs: the last stage's leader delivers them to
  rank 0, which commits and writes them (its `collector.Collector`); in host handoff a
  stage before the last passes them on to the next stage; in graph handoff stage 0 only
  tells the later stages to run each batch along, before it predicts.

`assemble` picks the source, stage and sink for this rank once, so the loop never asks
who this rank is.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from .collector import Collector
from .combine import Combiner
from .comm import DONE, GO, Channel, PostedPacket, abandon
from .input import InputField, InputReader
from .errors import JobFailed, PeerFailed
from .failure import reported
from .hooks import Hook
from .log import log
from .overlap import Prefetcher
from .program import Program
from .shared import SLOTS, SharedBatches, usable
from .spec import JobSpec
from .topology import Layout, RankInfo


class Batch(NamedTuple):
    """One batch, as a rank of a stage's group sees it."""

    kind: int                # GO, or DONE: no more batches
    start: int               # its first row in the input
    rows: int                # its valid rows
    arrays: list             # what the stage predicts on
    sequence: int = 0        # its number in the group's shared memory (on the root)
    slot: int = 0            # the stage-0 leader's prefetch slot that holds it

    @property
    def predicted(self) -> int:
        """The rows the stage predicts: a job with no rows predicts one zero row."""
        return max(self.rows, 1)


NO_MORE = Batch(DONE, 0, 0, [])


# Feeds: where a group's leader gets its batches.

class _FromFile:
    """Stage 0's leader: the batches read ahead from the input file; DONE once there are no
    more, or once a stop was requested."""

    def __init__(self, world: Channel, prefetcher: Prefetcher):
        self.world = world
        self.prefetcher = prefetcher

    def next(self) -> Batch:
        self.world.peers.check()
        batch = None if self.world.peers.stopping else self.prefetcher.next()
        if batch is None:
            return NO_MORE
        start, valid, buffers, slot = batch
        return Batch(GO, start, valid, [b[:max(valid, 1)] for b in buffers], slot=slot)

    def ready(self) -> bool:
        """Whether `next` would not wait for the input file."""
        return self.world.peers.stopping or self.prefetcher.ready()

    def release(self, slot: int) -> None:
        self.prefetcher.release(slot)

    def close(self) -> None:
        self.prefetcher.close()


class _FromStage:
    """A later stage's leader: the packets of the stage before (host handoff) or of stage 0
    (graph handoff)."""

    def __init__(self, world: Channel, source: int):
        self.world = world
        self.source = source

    def next(self) -> Batch:
        return Batch(*self.world.recv_packet(self.source))

    def ready(self) -> bool:
        """Never ahead of time: `next` waits for a peer."""
        return False

    def release(self, slot: int) -> None:
        pass

    def close(self) -> None:
        pass


# Sources: the group's next batch on every rank of it.

class Source(abc.ABC):
    """The group's batches; `feed` gives the leader its own (None on the others)."""

    def __init__(self, group: Channel, feed):
        self.group = group
        self.feed = feed

    @abc.abstractmethod
    def take(self) -> Batch:
        """The group's next batch, on every rank of it."""

    def post_ahead(self) -> None:
        """After the stage predicted a batch, before it combines it: a start on the next."""

    def release(self, batch: Batch) -> None:
        """Every rank of the group is done with the batch's arrays."""
        if self.feed is not None:
            self.feed.release(batch.slot)

    def close(self, finished: bool) -> None:
        if self.feed is not None:
            self.feed.close()


class _ByMessage(Source):
    """The leader broadcasts each batch its feed gives, on a communicator kept for batches
    (the combine's collectives on the group's own do not have to match them in order). Once
    a rank has predicted a batch it posts the next one's broadcast (the leader, if its feed
    has that batch at hand; the others, its receive), so that batch b+1 travels while the
    group combines batch b and the others go straight on to predict it.

    `fixed`: stage 0's batches, whose arrays every rank knows ahead (the input fields at
    full batch size): the others post the arrays' receives with the header's, so the arrays
    move during the combine too, not only once the header has arrived."""

    def __init__(self, group: Channel, feed,
                 fixed: list[tuple[np.dtype, tuple]] | None = None):
        super().__init__(group, feed)
        self.batches = group.split(0)
        self.fixed = fixed
        self._posted: tuple[PostedPacket, int] | None = None  # the next batch, and its slot

    def take(self) -> Batch:
        posted, slot = self._posted or self._post()
        self._posted = None
        return Batch(*self.batches.take_packet(posted), slot=slot)

    def post_ahead(self) -> None:
        if self.feed is None or self.feed.ready():
            with self.group.recorder.span("bcast"):
                self._posted = self._post()

    def _post(self) -> tuple[PostedPacket, int]:
        packet = NO_MORE if self.feed is None else self.feed.next()
        return self.batches.post_packet(*packet[:4], fixed=self.fixed), packet.slot

    def close(self, finished: bool) -> None:
        if self._posted is not None:  # a failure left a broadcast under way
            abandon(self._posted[0].requests)
        super().close(finished)
        self.batches.close()


class _BySharedMemory(Source):
    """The group's ranks share one node: the root reads each batch straight into a slot of
    `shared` and posts it; the others predict on the slot in place."""

    def __init__(self, group: Channel, feed, shared: SharedBatches):
        super().__init__(group, feed)
        self.shared = shared
        self._ahead: Batch | None = None  # the root's next batch, posted before this one ends

    def take(self) -> Batch:
        if self.feed is None:
            return Batch(*self.shared.receive())
        batch = self._ahead or self._post()
        self._ahead = None
        return batch

    def post_ahead(self) -> None:
        """The root, once it has predicted a batch, posts the next one before it settles this
        one: the others go straight on."""
        if self.feed is not None:
            with self.group.recorder.span("bcast"):
                self._ahead = self._post()

    def _post(self) -> Batch:
        batch = self.feed.next()
        return batch._replace(sequence=self.shared.post(batch.kind, batch.start, batch.rows,
                                                        batch.slot))

    def close(self, finished: bool) -> None:
        super().close(finished)
        if finished:
            # The others take the end from the root before it has committed its last batch,
            # and the root can still fail there. Freeing is a blocking collective that hears
            # no failure notice: a polite barrier first, which does.
            self.group.barrier()
            self.shared.close()


class Stage:
    """Every rank of a stage: predict its slice of a batch, then combine the group's outputs
    on the group's root."""

    def __init__(self, program: Program, group: Channel, shared: SharedBatches | None,
                 info: RankInfo, spec: JobSpec, inside=None):
        """`inside`: a context manager factory around each predict, for graphs that wait for
        peers in native code (cluster.PeerWatch.predicting)."""
        layout, model = info.layout, spec.model
        self.program = program
        self.inside = inside or contextlib.nullcontext
        self.group = group
        self.shared = shared
        self.info = info
        self.spec = spec
        self.last = layout.stage == layout.stages - 1
        # In graph handoff only the last stage's outputs count; a later stage's graph ran a
        # padded batch, whose outputs are trimmed to the batch's.
        self.counts = self.last or model.handoff == "host"
        self.trims = model.handoff == "graph" and layout.stage > 0
        self.combiner: Combiner | None = None

    def predict(self, batch: Batch) -> list[np.ndarray]:
        """This rank's outputs for `batch`; a failure names the batch's rows."""
        try:
            with self.group.recorder.span("predict"), self.inside():
                return self.program.predict(batch.arrays)
        except PeerFailed:
            raise  # a peer failed while this rank waited inside the graph: its message counts
        except Exception as exc:
            error, code = reported(exc, self.info)
            last_row = batch.start + batch.predicted - 1
            raise JobFailed(f"predict failed on batch rows {batch.start}..{last_row}: {error}",
                            code, batch=batch.start) from None

    def combine(self, batch: Batch, outputs: list[np.ndarray]) -> list | None:
        """The group's outputs, combined on its root (Nones on the others), or None where
        they do not count; either way the batch is settled in shared memory."""
        if not self.counts:
            if self.shared is not None:
                self.shared.settle(None, batch.predicted, batch.sequence)
            return None
        if self.trims:
            outputs = [o[:batch.predicted] for o in outputs]
        if self.combiner is None:
            layout, model = self.info.layout, self.spec.model
            modes = (self.spec.output.combine if self.last else
                     [model.stage_combine[layout.stage]] * len(outputs))
            self.combiner = Combiner(self.group, modes, self._output_names(len(outputs)),
                                     self.shared)
        with self.group.recorder.span("combine"):
            return self.combiner.combine(outputs, batch.predicted, batch.sequence)

    def _output_names(self, count: int) -> list[str]:
        if self.last:
            return self.spec.output_names
        return [f"stage {self.info.layout.stage} output{i}" for i in range(count)]


# Sinks: where a group's combined outputs go.

class Sink:
    """Where a group's combined outputs go; this one takes nothing: it serves a group's other
    ranks (their leader speaks for them), and in graph handoff the stages between the first
    and the last (their outputs stay on the devices)."""

    def begin(self, batch: Batch) -> None:
        """Before the stage predicts `batch`."""

    def put(self, batch: Batch, combined: list | None) -> None:
        """The stage's combined outputs for `batch`."""

    def done(self) -> None:
        """There are no more batches."""


class _ToCollector(Sink):
    """Rank 0 as its replica's last stage leader: its batches go straight to its collector."""

    def __init__(self, collector: Collector):
        self.collector = collector

    def put(self, batch: Batch, combined: list | None) -> None:
        self.collector.write(batch.start, [c[:batch.rows] for c in combined])


class _ToRankZero(Sink):
    """The last stage's leader of another replica gives its finished batches to rank 0,
    which writes them."""

    def __init__(self, world: Channel):
        self.world = world

    def put(self, batch: Batch, combined: list | None) -> None:
        arrays = [c[:batch.rows] for c in combined]
        self.world.send_packet(0, GO, batch.start, len(arrays[0]) if arrays else 0, arrays)

    def done(self) -> None:
        self.world.send_packet(0, DONE, 0, 0, [])  # this replica is finished


class _ToNextStage(Sink):
    """Host handoff: a stage leader before the last hands its combined outputs to the next
    stage's leader, as that stage's batch."""

    def __init__(self, world: Channel, leader: int):
        self.world = world
        self.leader = leader

    def put(self, batch: Batch, combined: list | None) -> None:
        self.world.send_packet(self.leader, GO, batch.start, batch.rows, combined)

    def done(self) -> None:
        self.world.send_packet(self.leader, DONE, 0, 0, [])


class _RunAlong(Sink):
    """Graph handoff: stage 0's leader tells every later stage's leader to run each batch
    along with it (the graphs pass the data themselves), before it predicts."""

    def __init__(self, world: Channel, leaders: Sequence[int]):
        self.world = world
        self.leaders = list(leaders)

    def begin(self, batch: Batch) -> None:
        for leader in self.leaders:
            self.world.send_packet(leader, GO, batch.start, batch.rows, [])

    def done(self) -> None:
        for leader in self.leaders:
            self.world.send_packet(leader, DONE, 0, 0, [])


# This rank's pipeline.

@dataclass(frozen=True)
class Pipeline:
    """This rank's source, stage and sink, and its stage's group."""

    group: Channel
    source: Source
    stage: Stage
    sink: Sink

    def close(self, finished: bool) -> None:
        """`finished`: every rank of the group took the loop to its end (then the shared
        memory is freed, collectively)."""
        self.source.close(finished)
        self.group.close()


def assemble(world: Channel, info: RankInfo, spec: JobSpec, program: Program,
             fields: list[InputField], rows: int, starts: list[int], reader: InputReader | None,
             collector: Collector | None, inside=None, pre: Hook | None = None) -> Pipeline:
    """This rank's pipeline for the batches in `starts` (collective: splits `world` into the
    stages' groups, and a stage-0 group on one node opens its shared memory)."""
    layout = info.layout
    group = world.split(layout.replica * layout.stages + layout.stage)
    capacity = max(1, min(spec.input.batch_size, rows))  # a stage-0 batch's rows at most
    shared = _shared(group, layout, spec, fields, capacity)
    feed = None
    if group.is_root and layout.stage == 0:
        prefetcher = Prefetcher(reader, fields, starts[layout.replica::layout.replicas],
                                spec.input.batch_size, rows, lambda: world.recorder.span("read"),
                                shared and [shared.slot_arrays(k) for k in range(SLOTS)], pre,
                                cores=info.helper_cores)
        feed = _FromFile(world, prefetcher)
    elif group.is_root:
        before = layout.stage - 1 if spec.model.handoff == "host" else 0
        feed = _FromStage(world, layout.leader(layout.replica, before))
    if shared is not None:
        source = _BySharedMemory(group, feed, shared)
    elif layout.stage == 0 and group.size > 1:
        source = _ByMessage(group, feed, [(np.dtype(f.dtype), (capacity, *f.row_shape))
                                          for f in fields])
    else:
        source = _ByMessage(group, feed)
    if group.is_root and group.size > 1:
        log.info("replica %d stage %d: %d ranks, batches %s", layout.replica, layout.stage,
                 group.size, "by message" if shared is None else "in shared memory")
    return Pipeline(group, source, Stage(program, group, shared, info, spec, inside),
                    _sink(world, layout, spec, group, collector))


def _shared(group: Channel, layout: Layout, spec: JobSpec, fields: list[InputField],
            capacity: int) -> SharedBatches | None:
    """Shared-memory slots of `capacity` rows for a stage-0 group whose ranks all share one
    node (collective)."""
    if layout.stage != 0 or group.size == 1 or not spec.run.shared_memory:
        return None
    if not usable(group, sum(f.row_bytes for f in fields) * capacity):
        return None
    return SharedBatches(group, fields, capacity)


def _sink(world: Channel, layout: Layout, spec: JobSpec, group: Channel,
          collector: Collector | None) -> Sink:
    if not group.is_root:
        return Sink()
    if layout.stage == layout.stages - 1:
        return _ToRankZero(world) if collector is None else _ToCollector(collector)
    if spec.model.handoff == "host":
        return _ToNextStage(world, layout.leader(layout.replica, layout.stage + 1))
    if layout.stage == 0:
        return _RunAlong(world, [layout.leader(layout.replica, stage)
                                 for stage in range(1, layout.stages)])
    return Sink()
