"""The run loop.

The world is `replicas` copies of the model; each copy is `stages` groups of
`ranks / stages` ranks. Batch b goes to replica b mod replicas, whose stage-0
leader reads it from the input file and broadcasts it to its stage. Every rank
of a stage predicts its slice in lockstep; the stage's leader combines the
outputs and hands them to the next stage's leader (or, from the last stage, to
rank 0). Rank 0 writes every batch at its rows, whichever replica finishes
first, while doing its own share of the work.

Failures: the ranks agree at start-up (after the checks and after loading), so
bad input ends every rank together with one message and nothing written. Inside
the loop a failing rank sends a notice to every other rank (`comm.Peers`); every
wait checks for notices, so no rank waits forever for a peer that has failed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__, backends
from .backends import Placement
from .comm import DONE, GO, Channel, PacketReceiver, Peers
from .data import InputField, InputReader, OutputWriter
from .errors import BackendError, DataError, JobFailed, PeerFailed, SpmdinferError
from .log import log, setup_logging
from .program import Program, check_output_count
from .progress import Progress
from .spec import Combine, JobSpec
from .topology import Layout, RankInfo, discover
from .validate import open_checked


@dataclass(frozen=True)
class RunSummary:
    """What a finished run did."""

    rows: int
    batches: int
    seconds: float          # the whole run, start-up and model loading included
    load_seconds: float     # start-up: checks and model loading, until the first batch
    output: Path

    @property
    def rows_per_second(self) -> float:
        """Throughput of the scoring loop, after the models are loaded."""
        loop = self.seconds - self.load_seconds
        return self.rows / loop if loop > 0 else 0.0

    def __str__(self) -> str:
        return (f"spmdinfer: {self.rows} rows, {self.batches} batches, {self.seconds:.2f} s "
                f"(load {self.load_seconds:.2f} s), {self.rows_per_second:.1f} rows/s "
                f"-> {self.output}")


def run_job(spec: JobSpec, comm=None, *, overwrite: bool = False,
            progress: bool = True) -> RunSummary:
    """Run `spec` on the ranks of `comm` (COMM_WORLD when None); every rank calls this.

    Returns the summary on every rank. Raises SpmdinferError (JobFailed, with the
    failing rank's message, on the others) on every rank when any rank fails.
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    peers = Peers(comm)
    world = Channel(comm, peers)
    try:
        return _Run(spec, world, overwrite, progress).run()
    finally:
        world.close()
        peers.close()


def _failure(exc: BaseException, info: RankInfo | None) -> tuple[BaseException, int]:
    """The error to report for `exc` and its exit code; crashes get their traceback logged."""
    if isinstance(exc, SpmdinferError):
        return exc, exc.exit_code
    log.error("unexpected error%s", f" on {info}" if info else "", exc_info=exc)
    return RuntimeError(f"{type(exc).__name__}: {exc}"), 1


class _Run:
    def __init__(self, spec: JobSpec, world: Channel, overwrite: bool, progress: bool):
        self.spec = spec
        self.world = world
        self.overwrite = overwrite
        self.show_progress = progress
        self.reader: InputReader | None = None
        self.writer: OutputWriter | None = None
        self.collector: _Collector | None = None

    def run(self) -> RunSummary:
        started = time.monotonic()
        start_time = _now()
        info = discover(self.world.comm, self.spec)
        self.info, self.layout = info, info.layout
        setup_logging(info.rank)
        log.info("%s", info)
        try:
            fields, rows = self._preflight()
            program, identities = self._load(fields)
            loaded = time.monotonic()
            starts = list(range(0, rows, self.spec.input.batch_size)) or [0]
            collector = self._start_output(starts, rows)
            self._loop(program, fields, starts, rows)
            if collector is not None:
                collector.drain()
            self.world.flush()
            attrs = self._provenance(identities, rows, len(starts), start_time)
            self._finish(attrs)
        except BaseException as exc:
            raise self._fail(exc) from None
        finally:
            if self.reader is not None:
                self.reader.close()
        return RunSummary(rows, len(starts), time.monotonic() - started, loaded - started,
                          self.spec.output.file)

    def _fail(self, exc: BaseException) -> BaseException:
        """Drop the unfinished output, tell the other ranks (unless they told us), and
        return what this rank raises."""
        if self.writer is not None:
            self.writer.discard()
            self.writer = None
        if isinstance(exc, PeerFailed) or not isinstance(exc, Exception):
            return exc
        error, code = _failure(exc, self.info)
        where = f"rank {self.info.rank} ({self.info.host}): " if self.layout.size > 1 else ""
        self.world.peers.notify(f"{where}{error}", code)
        self.world.abandon()
        return JobFailed(f"{where}{error}", code)

    # Start-up.

    def _preflight(self) -> tuple[list[InputField], int]:
        """Rank 0 checks every file and dataset before any rank loads a model."""
        error = plan = None
        if self.world.is_root:
            try:
                self.reader = open_checked(self.spec, self.overwrite)
                plan = (self.reader.fields, self.reader.rows)
            except SpmdinferError as exc:
                error = exc
        self.world.agree(error)
        return self.world.bcast_object(plan)

    def _load(self, fields: list[InputField]) -> tuple[Program, list]:
        """Every rank loads its graphs and binds them to what its stage receives."""
        info, layout, model = self.info, self.layout, self.spec.model
        error, code, identity, program = None, 0, None, None
        paths = model.graph_paths(info.model_rank)
        try:
            name = backends.resolve(model.backend, paths[0])
            placement = Placement(target=self.spec.device.target, device_id=info.device_id,
                                  rank_id=info.model_rank, threads=info.threads,
                                  provider=self.spec.device.provider,
                                  config_file=self.spec.device.config_path(info.model_rank))
            options = self.spec.backend_options.get(name, {})
            began = time.monotonic()
            sessions = [backends.open_session(name, path, placement, options) for path in paths]
            log.info("loaded %s with %s %s in %.2f s", ", ".join(map(str, paths)), name,
                     sessions[0].version, time.monotonic() - began)
            if layout.stage == 0:
                batch = fields
            else:
                batch = [] if model.handoff == "graph" else None
            program = Program(sessions, paths, self.spec.steps, batch)
            if layout.stage == layout.stages - 1:
                check_output_count(program.outputs(), self.spec.output_names, paths[-1])
            identity = ([str(p) for p in paths], [sha256(p) for p in paths], name, program.version,
                        info.host, info.device_id)
        except Exception as exc:
            error, code = _failure(exc, info)
        self.world.agree(error, code)
        identities = self.world.allgather_objects(identity)
        self.world.agree(shared_device(identities, self.spec.device.target))
        if self.world.is_root:
            log.info("backend %s %s", identity[2], identity[3])
        if layout.stage == 0 and layout.stage_rank == 0 and self.reader is None:
            self.reader = InputReader(self.spec.input)  # every replica leader reads its own batches
        return program, identities

    def _start_output(self, starts: list[int], rows: int) -> _Collector | None:
        if not self.world.is_root:
            return None
        self.writer = OutputWriter(self.spec.output, rows, self.spec.input.batch_size)
        self.collector = _Collector(self.world, self.writer, self.layout, starts,
                                    Progress(rows, self.show_progress))
        self.world.idle = self.collector.poll
        return self.collector

    # The loop.

    def _loop(self, program: Program, fields: list[InputField], starts: list[int],
              rows: int) -> None:
        layout, model = self.layout, self.spec.model
        group = self.world.split(layout.replica * layout.stages + layout.stage)
        last = layout.stage == layout.stages - 1
        forwards = last or model.handoff == "host"  # in graph handoff only the last stage's outputs count
        my_starts = iter(starts[layout.replica::layout.replicas])
        buffers = [f.buffer(max(1, min(self.spec.input.batch_size, rows))) for f in fields]
        for buffer in buffers:
            buffer[:1] = 0  # a job with no rows predicts one zero row, to learn the output shapes
        try:
            while True:
                if self.collector is not None:
                    self.collector.poll()  # other replicas' finished batches, between own batches
                packet = (DONE, 0, 0, [])
                if group.is_root:
                    packet = self._next_packet(my_starts, buffers, rows)
                kind, start, valid, arrays = group.bcast_packet(*packet)
                if kind == DONE:
                    self._pass_on(group, DONE, 0, 0, [])
                    return
                if model.handoff == "graph" and layout.stage == 0:
                    self._pass_on(group, GO, start, valid, [])  # later stages run along
                try:
                    outputs = program.predict(arrays)
                except Exception as exc:
                    error, code = _failure(exc, self.info)
                    raise JobFailed(f"predict failed on batch rows {start}..{start + max(valid, 1) - 1}"
                                    f": {error}", code) from None
                if not forwards:
                    continue
                if model.handoff == "graph" and layout.stage > 0:
                    outputs = [o[:max(valid, 1)] for o in outputs]  # the graph ran a padded batch
                modes = (self.spec.output.combine if last else
                         [model.stage_combine[layout.stage]] * len(outputs))
                combined = combine_outputs(group, outputs, modes, self._output_names(len(outputs)),
                                           max(valid, 1))
                if group.is_root and last:
                    self._deliver(start, [c[:valid] for c in combined])
                elif model.handoff == "host":
                    self._pass_on(group, GO, start, valid, combined)
        finally:
            group.close()

    def _next_packet(self, my_starts, buffers, rows):
        """A stage leader's next packet: read from the file (stage 0) or from the stage before."""
        layout = self.layout
        if layout.stage > 0:
            return self.world.recv_packet(layout.leader(layout.replica, layout.stage - 1)
                                          if self.spec.model.handoff == "host" else
                                          layout.leader(layout.replica, 0))
        start = next(my_starts, None)
        if start is None:
            return DONE, 0, 0, []
        stop = min(start + self.spec.input.batch_size, rows)
        try:
            self.reader.read(start, stop, buffers)
        except Exception as exc:
            raise DataError(f"reading rows {start}..{stop - 1} of {self.reader.file_path}: "
                            f"{exc}") from None
        sent = max(stop - start, 1)
        return GO, start, stop - start, [b[:sent] for b in buffers]

    def _pass_on(self, group: Channel, kind: int, start: int, rows: int, arrays) -> None:
        """A stage leader hands a packet to the stage(s) after it."""
        layout = self.layout
        if not group.is_root or layout.stage == layout.stages - 1:
            return
        if self.spec.model.handoff == "host":
            targets = [layout.stage + 1]
        else:
            targets = range(1, layout.stages) if layout.stage == 0 else []
        for stage in targets:
            self.world.send_packet(layout.leader(layout.replica, stage), kind, start, rows, arrays)

    def _deliver(self, start: int, arrays: list[np.ndarray]) -> None:
        """The last stage's leader gives a finished batch to rank 0, which writes it."""
        if self.collector is not None:
            self.collector.write(start, arrays)
        else:
            self.world.send_packet(0, GO, start, len(arrays[0]) if arrays else 0, arrays)

    def _output_names(self, count: int) -> list[str]:
        if self.layout.stage == self.layout.stages - 1:
            return self.spec.output_names
        return [f"stage {self.layout.stage} output{i}" for i in range(count)]

    # The end.

    def _provenance(self, identities, rows: int, batches: int, start_time: str) -> dict | None:
        if not self.world.is_root:
            return None
        return {
            "spmdinfer_version": __version__,
            "job_file": str(self.spec.path),
            "job_text": self.spec.text,
            "input_file": str(self.spec.input.file),
            "backend": identities[0][2],
            "backend_version": identities[0][3],
            "slice_files": [p for i in identities[:self.spec.model.ranks] for p in i[0]],
            "slice_sha256": [h for i in identities[:self.spec.model.ranks] for h in i[1]],
            "world_size": self.world.size,
            "replicas": self.layout.replicas,
            "stages": self.layout.stages,
            "rows": rows,
            "batches": batches,
            "start_time": start_time,
            "end_time": _now(),
        }

    def _finish(self, attrs: dict | None) -> None:
        """Rank 0 moves the output into place; every rank learns whether that worked."""
        error = None
        if self.world.is_root:
            try:
                self.writer.finish(attrs)
                self.writer = None
            except Exception as exc:
                error = DataError(f"[output] file {self.spec.output.file}: cannot finish: {exc}")
        self.world.agree(error)


class _Collector:
    """Rank 0's side of the output: receives finished batches from the last stages of every
    replica, in whatever order they finish, and writes each at its rows."""

    def __init__(self, world: Channel, writer: OutputWriter, layout: Layout, starts: list[int],
                 progress: Progress):
        self.world = world
        self.writer = writer
        self.progress = progress
        self.pending = len(starts)
        self._queues = {}   # source rank -> its batches' starts still to come, in order
        for replica in range(layout.replicas):
            source = layout.leader(replica, layout.stages - 1)
            if source != 0:
                self._queues[source] = list(starts[replica::layout.replicas])
        self._receivers = {s: PacketReceiver(world, s) for s, q in self._queues.items() if q}
        self._busy = False

    def write(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        try:
            self.writer.write(start, arrays)
        except Exception as exc:
            raise DataError(f"writing {self.writer.temp_path}: {exc}") from None
        self.progress.update(len(arrays[0]) if arrays else 0)
        self.pending -= 1

    def poll(self) -> None:
        """Write whatever has arrived; never blocks."""
        if self._busy:
            return
        self._busy = True  # writing may wait on nothing, but keep poll from nesting
        try:
            for source, receiver in list(self._receivers.items()):
                packet = receiver.poll()
                if packet is None:
                    continue
                _, start, _, arrays = packet
                expected = self._queues[source].pop(0)
                assert start == expected, (start, expected)
                self.write(start, arrays)
                if self._queues[source]:
                    self._receivers[source] = PacketReceiver(self.world, source)
                else:
                    del self._receivers[source]
        finally:
            self._busy = False

    def drain(self) -> None:
        """Wait, politely, until every batch is written."""
        try:
            while self.pending:
                self.poll()
                if self.pending:
                    self.world.wait(next(iter(self._receivers.values())).request)
        finally:
            self.progress.close()


def combine_outputs(group: Channel, outputs: Sequence[np.ndarray], modes: Sequence[Combine],
                    names: Sequence[str], rows: int) -> list[np.ndarray | None]:
    """Combine each output across the group on its root (None elsewhere)."""
    outputs = [np.asarray(o) for o in outputs]
    if len(outputs) != len(names):
        raise BackendError(f"the slice returned {len(outputs)} outputs, [output.datasets] names "
                           f"{len(names)}")
    layouts = group.allgather_layouts(outputs) if any(m.mode != "rank0" for m in modes) else None
    results = []
    for k, (output, mode, name) in enumerate(zip(outputs, modes, names)):
        if mode.mode == "rank0":
            check_rows(name, 0, output.shape, rows)
            results.append(output)
            continue
        shapes = [layout[k][1] for layout in layouts]
        check_layout(name, mode, shapes, [layout[k][0] for layout in layouts], rows)
        if mode.mode == "concat":
            results.append(group.gather_concat(output, shapes, mode.axis))
        else:
            results.append(group.reduce_sum(output))
    return results


def check_rows(name: str, rank: int, shape: tuple, rows: int) -> None:
    if not shape or shape[0] != rows:
        raise BackendError(f"output {name}: rank {rank} returned shape {tuple(shape)} for a batch "
                           f"of {rows} rows; outputs must keep the batch's rows on axis 0")


def check_layout(name: str, combine: Combine, shapes: list[tuple], dtypes: list[np.dtype],
                 rows: int) -> None:
    """Check that every rank's output `name` can be combined; every rank reaches the same verdict."""
    for rank, shape in enumerate(shapes):
        check_rows(name, rank, shape, rows)
    if len(set(dtypes)) > 1:
        raise BackendError(f"output {name}: ranks returned different dtypes "
                           f"({', '.join(sorted({str(d) for d in dtypes}))}), cannot {combine}")
    if combine.mode == "sum" and len(set(shapes)) > 1:
        raise BackendError(f"output {name}: ranks returned shapes {shapes}; sum needs equal shapes")
    if combine.mode == "concat":
        ndim = len(shapes[0])
        axis = combine.axis
        if not -ndim <= axis < ndim or axis % ndim == 0:
            raise BackendError(f"output {name}: {combine} does not fit output shape {shapes[0]}")
        rest = {s[:axis % ndim] + s[axis % ndim + 1:] for s in shapes}
        if len(rest) > 1 or len({len(s) for s in shapes}) > 1:
            raise BackendError(f"output {name}: ranks returned shapes {shapes}, which {combine} "
                               "cannot join")


def shared_device(identities: list, target: str) -> BackendError | None:
    """An error if two ranks on one node would use the same device."""
    if target == "cpu":
        return None
    seen = {}
    for rank, (_, _, _, _, host, device) in enumerate(identities):
        if (host, device) in seen:
            return BackendError(f"[device] device_id: ranks {seen[(host, device)]} and {rank} on "
                                f"{host} would both use {target} device {device}")
        seen[(host, device)] = rank
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
