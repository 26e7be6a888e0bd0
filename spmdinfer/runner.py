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

import errno
import hashlib
import os
import signal
import threading
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
from .journal import Journal, OutputLock, fingerprint, parts_folder
from .errors import BackendError, DataError, JobFailed, PeerFailed, SpmdinferError
from .log import log, setup_logging
from .combine import Combiner
from .metrics import Recorder, write_metrics, write_trace
from .overlap import Committer, Prefetcher
from .program import Program, check_output_count
from .progress import Progress
from .shared import SLOTS, SharedBatches, usable
from .spec import JobSpec
from .topology import Layout, RankInfo, discover, physical_device
from .validate import check_manifest, open_checked, read_manifest, sha256_of
from .watchdog import Watchdog


EXIT_STOPPED = 75   # stopped early at a batch boundary; `run --resume` continues (EX_TEMPFAIL)
REPEAT_SIGNAL_SECONDS = 2.0  # a second stop signal sooner than this is the same request


@dataclass(frozen=True)
class RunSummary:
    """What a run did."""

    rows: int
    batches: int            # batches this run committed
    seconds: float          # the whole run, start-up and model loading included
    load_seconds: float     # start-up: checks and model loading, until the first batch
    output: Path
    outcome: str = "complete"   # complete | stopped (resumable) | already complete
    remaining: int = 0          # batches still to do when stopped
    rows_done: int | None = None  # rows this run scored (fewer than `rows` after a resume)

    @property
    def rows_per_second(self) -> float:
        """Throughput of this run's scoring loop: from the first batch (after the models are
        loaded and the communicators, shared memory and threads are set up) to the end."""
        loop = self.seconds - self.load_seconds
        done = self.rows if self.rows_done is None else self.rows_done
        return done / loop if loop > 0 else 0.0

    def __str__(self) -> str:
        if self.outcome == "already complete":
            return f"spmdinfer: {self.output} is already complete; nothing to do"
        if self.outcome == "stopped":
            return (f"spmdinfer: stopped early after {self.batches} batches this run, "
                    f"{self.remaining} to go; continue with: spmdinfer run JOB --resume "
                    f"(exit code {EXIT_STOPPED})")
        resumed = "" if self.rows_done in (None, self.rows) else f" ({self.rows_done} this run)"
        return (f"spmdinfer: {self.rows} rows{resumed}, {self.batches} batches, {self.seconds:.2f} s "
                f"(load {self.load_seconds:.2f} s), {self.rows_per_second:.1f} rows/s "
                f"-> {self.output}")


def run_job(spec: JobSpec, comm=None, *, overwrite: bool = False, resume: bool = False,
            progress: bool = True, metrics: Path | None = None,
            trace: Path | None = None) -> RunSummary:
    """Run `spec` on the ranks of `comm` (COMM_WORLD when None); every rank calls this.

    Returns the summary on every rank (outcome "stopped" after SIGTERM or SIGUSR1).
    `metrics` and `trace` name JSON files rank 0 writes at the end (see spmdinfer.metrics).
    Raises SpmdinferError (JobFailed, with the failing rank's message, on the others)
    on every rank when any rank fails.
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    peers = Peers(comm)
    world = Channel(comm, peers, recorder=Recorder(trace=trace is not None))
    previous = _catch_stop_signals(peers)
    try:
        summary = _Run(spec, world, overwrite, resume, progress).run()
        if metrics is not None or trace is not None:
            _report(world, summary, metrics, trace)
        return summary
    finally:
        _restore_signals(previous)
        world.close()
        peers.close()


def _report(world: Channel, summary: RunSummary, metrics: Path | None, trace: Path | None) -> None:
    """Gather every rank's clock on rank 0 and write the metrics and trace files."""
    import socket

    reports = world.gather_objects(world.recorder.report(world.rank, socket.gethostname()))
    if world.is_root:
        if metrics is not None:
            write_metrics(metrics, summary, reports)
        if trace is not None:
            write_trace(trace, reports)


def _catch_stop_signals(peers: Peers) -> dict:
    """SIGTERM and SIGUSR1 (sbatch --signal): finish the batch in flight, commit, stop.
    A second one exits at once; committed batches are safe on disk either way."""
    first = []

    def handler(signum, frame):
        # Under Slurm a rank may get one stop signal from Slurm and one from mpiexec within
        # milliseconds: only a signal well after the first means "now".
        if first and time.monotonic() - first[0] > REPEAT_SIGNAL_SECONDS:
            os._exit(EXIT_STOPPED)
        if not first:
            first.append(time.monotonic())
            peers.signalled = True
            log.warning("received %s: stopping after the batches in flight",
                        signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _failure(exc: BaseException, info: RankInfo | None) -> tuple[BaseException, int]:
    """The error to report for `exc` and its exit code; crashes get their traceback logged."""
    if isinstance(exc, SpmdinferError):
        return exc, exc.exit_code
    log.error("unexpected error%s", f" on {info}" if info else "", exc_info=exc)
    return RuntimeError(f"{type(exc).__name__}: {exc}"), 1


class _Run:
    def __init__(self, spec: JobSpec, world: Channel, overwrite: bool, resume: bool,
                 progress: bool):
        self.spec = spec
        self.world = world
        self.overwrite = overwrite
        self.resume = resume
        self.show_progress = progress
        self.reader: InputReader | None = None
        self.collector: _Collector | None = None
        self.journal: Journal | None = None
        self.lock: OutputLock | None = None
        self.made_dirs: list[Path] = []
        self.counted: list[int] = []   # batches whose attempt this run counted

    def run(self) -> RunSummary:
        started = time.monotonic()
        info = discover(self.world.comm, self.spec)
        self.info, self.layout = info, info.layout
        setup_logging(info.rank)
        log.info("%s", info)
        try:
            fields, rows, done = self._preflight()
            if done:
                self._release()
                return RunSummary(rows, 0, time.monotonic() - started, 0.0, self.spec.output.file,
                                  outcome="already complete")
            program, identities = self._load(fields)
            starts = list(range(0, rows, self.spec.input.batch_size)) or [0]
            pending = self._schedule(identities, rows, starts)
            self._start_collector(rows, identities, len(starts))
            self.watchdog = Watchdog(self.spec.run.batch_timeout)
            self._loop(program, fields, pending, rows)
            if self.collector is not None:
                self.collector.drain()
            self.world.flush()
            self.watchdog.stop()
            outcome, remaining, batches, done = self._finish(starts)
        except BaseException as exc:
            raise self._fail(exc) from None
        finally:
            if self.reader is not None:
                self.reader.close()
            if self.collector is not None:
                self.collector.writer.discard()  # unless it was finished: then there is nothing left
            if self.journal is not None:
                self.journal.close()
            self._release()
        return RunSummary(rows, batches, time.monotonic() - started, self.loaded - started,
                          self.spec.output.file, outcome=outcome, remaining=remaining,
                          rows_done=done)

    def _fail(self, exc: BaseException) -> BaseException:
        """Tell the other ranks (unless they told us) and return what this rank raises.

        Committed batches stay in FILE.parts for --resume; a run that failed before its
        first batch leaves nothing behind.
        """
        if getattr(self, "watchdog", None) is not None:
            self.watchdog.stop()
        if self.collector is not None:
            self.collector.abandon()
        batch = getattr(exc, "batch", None)
        if self.journal is not None:
            if batch is not None and batch not in self.counted:
                self.journal.count_attempts([batch])  # a failure counts as an attempt
            if not self.journal.committed() and not self.resume:
                self.journal.remove()
        if isinstance(exc, PeerFailed) or not isinstance(exc, Exception):
            return exc
        error, code = _failure(exc, self.info)
        where = f"rank {self.info.rank} ({self.info.host}): " if self.layout.size > 1 else ""
        self.world.peers.notify(f"{where}{error}", code, batch)
        self.world.abandon()
        return JobFailed(f"{where}{error}", code, batch)

    def _release(self) -> None:
        """Rank 0: give up the output lock and remove folders this run made and left empty."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        for folder in reversed(self.made_dirs):
            try:
                folder.rmdir()
            except OSError:
                break
        self.made_dirs = []

    # Start-up.

    def _preflight(self) -> tuple[list[InputField], int, bool]:
        """Rank 0 checks every file and dataset and takes the output's lock before any rank
        loads a model; with --resume, a complete output means there is nothing to do."""
        error = plan = None
        if self.world.is_root:
            try:
                output = self.spec.output.file
                done = self.resume and output.is_file() and not parts_folder(output).exists()
                self.reader = open_checked(self.spec, self.overwrite or done)
                plan = (self.reader.fields, self.reader.rows, done)
                self._lock()
            except SpmdinferError as exc:
                error = exc
        return self.world.agree(error, value=plan)

    def _lock(self) -> None:
        output = self.spec.output.file
        self.made_dirs = [p for p in reversed(output.parents) if not p.exists()]
        output.parent.mkdir(parents=True, exist_ok=True)
        self.lock = OutputLock(output)
        self.lock.acquire()

    def _load(self, fields: list[InputField]) -> tuple[Program, list]:
        """Every rank loads its graphs and binds them to what its stage receives."""
        info, layout, model = self.info, self.layout, self.spec.model
        target = self.spec.device.target
        devices = self.world.allgather_objects((info.host, physical_device(target, info.device_id)))
        self.world.agree(shared_device(devices, target))  # before any model loads
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
            with self.world.recorder.span("load"):
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
            digests = [sha256_of(p) for p in paths]
            if model.sha256:
                manifest = read_manifest(Path(model.sha256))
                for path, digest in zip(paths, digests):
                    check_manifest(manifest, path, digest)
            identity = ([str(p) for p in paths], digests, name, program.version)
        except Exception as exc:
            error, code = _failure(exc, info)
        self.world.agree(error, code)
        identities = self.world.allgather_objects(identity)
        if self.world.is_root:
            log.info("backend %s %s", identity[2], identity[3])
        if layout.stage == 0 and layout.stage_rank == 0 and self.reader is None:
            self.reader = InputReader(self.spec.input)  # every replica leader reads its own batches
        return program, identities

    def _schedule(self, identities: list, rows: int, starts: list[int]) -> list[int]:
        """Rank 0 opens the journal (checking a resumed run's identity); every rank learns
        which batches are still to do."""
        error = pending = None
        if self.world.is_root:
            try:
                self.journal = Journal.open(self.spec.output.file, self._identity(identities),
                                            self.resume, self.overwrite, self.spec.run.fsync)
                committed = self.journal.committed()
                pending = [s for s in starts if s not in committed]
                self.counted = pending[:self.layout.replicas]
                self.journal.count_attempts(self.counted, self.spec.run.max_attempts,
                                            self.spec.input.batch_size, rows)
                if committed:
                    log.warning("resuming: %d of %d batches already committed",
                                len(starts) - len(pending), len(starts))
            except SpmdinferError as exc:
                error = exc
        return self.world.agree(error, value=pending)

    def _identity(self, identities: list) -> dict:
        """What produced the committed batches: resuming with anything else is refused."""
        return {
            "job": hashlib.sha256(self.spec.text.encode()).hexdigest(),
            "slices": [h for i in identities[:self.spec.model.ranks] for h in i[1]],
            "input": fingerprint(self.spec.input.file),
        }

    def _start_collector(self, rows: int, identities: list, batches: int) -> None:
        if self.world.is_root:
            writer = OutputWriter(self.spec.output, rows, self.spec.input.batch_size,
                                  self._provenance(identities, rows, batches))
            self.collector = _Collector(self.world, self.journal, writer, self.lock, self.layout,
                                        Progress(rows, self.show_progress), self.spec.input.batch_size)
            self.world.idle = self.collector.poll

    # The loop.

    def _loop(self, program: Program, fields: list[InputField], starts: list[int],
              rows: int) -> None:
        """This rank's share of the batches in `starts`."""
        layout, model = self.layout, self.spec.model
        group = self.world.split(layout.replica * layout.stages + layout.stage)
        last = layout.stage == layout.stages - 1
        forwards = last or model.handoff == "host"  # in graph handoff only the last stage's outputs count
        shared = self._shared(group, fields, rows)
        prefetcher = combiner = None
        if group.is_root and layout.stage == 0:
            prefetcher = Prefetcher(self.reader, fields, starts[layout.replica::layout.replicas],
                                    self.spec.input.batch_size, rows,
                                    lambda: self.world.recorder.span("read"),
                                    shared and [shared.slot_arrays(k) for k in range(SLOTS)])
        finished = False
        ahead = None  # the root's next batch, posted to the group before this one is finished
        self.loaded = time.monotonic()  # start-up ends here: the loop starts with the first batch
        try:
            while True:
                self.watchdog.kick()
                if self.collector is not None:
                    self.collector.poll()  # other replicas' finished batches, between own batches
                    self.collector.check()
                with self.world.recorder.span("bcast"):
                    batch = ahead or self._receive(group, shared, prefetcher)
                ahead = None
                kind, start, valid, arrays, sequence, slot = batch
                if kind == DONE:
                    self._pass_on(group, DONE, 0, 0, [])
                    if group.is_root and last and self.collector is None:
                        self.world.send_packet(0, DONE, 0, 0, [])  # this replica is finished
                    finished = True
                    return
                if model.handoff == "graph" and layout.stage == 0:
                    self._pass_on(group, GO, start, valid, [])  # later stages run along
                try:
                    with self.world.recorder.span("predict"):
                        outputs = program.predict(arrays)
                except Exception as exc:
                    error, code = _failure(exc, self.info)
                    raise JobFailed(f"predict failed on batch rows {start}..{start + max(valid, 1) - 1}"
                                    f": {error}", code, batch=start) from None
                if shared is not None and group.is_root:
                    with self.world.recorder.span("bcast"):
                        ahead = self._receive(group, shared, prefetcher)  # the others go straight on
                if not forwards:
                    if shared is not None:
                        shared.settle(None, max(valid, 1), sequence)
                else:
                    if model.handoff == "graph" and layout.stage > 0:
                        outputs = [o[:max(valid, 1)] for o in outputs]  # the graph ran a padded batch
                    if combiner is None:
                        modes = (self.spec.output.combine if last else
                                 [model.stage_combine[layout.stage]] * len(outputs))
                        combiner = Combiner(group, modes, self._output_names(len(outputs)), shared)
                    with self.world.recorder.span("combine"):
                        combined = combiner.combine(outputs, max(valid, 1), sequence)
                    if group.is_root and last:
                        self._deliver(start, [c[:valid] for c in combined])
                    elif model.handoff == "host":
                        self._pass_on(group, GO, start, valid, combined)
                if prefetcher is not None:
                    prefetcher.release(slot)  # every rank of the group is done with its arrays
        finally:
            if prefetcher is not None:
                prefetcher.close()
            if shared is not None and finished:
                shared.close()  # collective: only when every rank got here
            group.close()

    def _shared(self, group: Channel, fields: list[InputField], rows: int) -> SharedBatches | None:
        """Shared-memory slots for a stage-0 group whose ranks all share one node (collective)."""
        if self.layout.stage != 0 or group.size == 1 or not self.spec.run.shared_memory:
            return None
        capacity = max(1, min(self.spec.input.batch_size, rows))
        if not usable(group, sum(f.row_bytes for f in fields) * capacity):
            return None
        return SharedBatches(group, fields, capacity)

    def _receive(self, group: Channel, shared: SharedBatches | None, prefetcher: Prefetcher | None):
        """The group's next batch on every rank of it: (kind, start, rows, arrays, sequence
        number in `shared`, the root's prefetch slot)."""
        if shared is not None and not group.is_root:
            return *shared.receive(), 0, 0
        packet = (DONE, 0, 0, [], 0)
        if group.is_root:
            packet = self._next_packet(prefetcher)
        if shared is not None:
            return *packet[:4], shared.post(*packet[:3], packet[4]), packet[4]
        return *group.bcast_packet(*packet[:4]), 0, packet[4]

    def _next_packet(self, prefetcher: Prefetcher | None):
        """A stage leader's next packet, (kind, start, rows, arrays, slot): read from the file
        (stage 0; slot is the prefetcher's buffer set) or from the stage before."""
        layout = self.layout
        if layout.stage > 0:
            return *self.world.recv_packet(layout.leader(layout.replica, layout.stage - 1)
                                           if self.spec.model.handoff == "host" else
                                           layout.leader(layout.replica, 0)), 0
        self.world.peers.check()
        batch = None if self.world.peers.stopping else prefetcher.next()
        if batch is None:
            return DONE, 0, 0, [], 0
        start, valid, buffers, slot = batch
        return GO, start, valid, [b[:max(valid, 1)] for b in buffers], slot

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

    def _finish(self, starts: list[int]) -> tuple[str, int, int, int]:
        """Rank 0 completes the output once every batch is committed; every rank learns the
        outcome ("complete" or "stopped"), the batches still to do, and the batches and rows
        done this run."""
        error = result = None
        if self.world.is_root:
            try:
                remaining = len(set(starts) - self.journal.committed())
                if remaining:
                    self.journal.forget_attempts(self.counted)
                    result = ("stopped", remaining, self.collector.commits, self.collector.rows)
                else:
                    self._complete()
                    result = ("complete", 0, self.collector.commits, self.collector.rows)
            except Exception as exc:
                error = _failure(exc, self.info)[0]
        return self.world.agree(error, value=result)

    def _complete(self) -> None:
        """Rank 0: every batch is committed and written; the output file gets its provenance
        and its final name, and the journal goes."""
        try:
            with self.world.recorder.span("write"):
                self.collector.writer.finish({"complete": True, "end_time": _now()})
        except OSError as exc:
            self.collector.writer.discard()
            raise DataError(f"[output] file {self.spec.output.file}: cannot write it ({exc}); "
                            f"every batch is committed in {self.journal.folder}, so "
                            "`spmdinfer run JOB --resume` will write it again") from None
        self.journal.remove()

    def _provenance(self, identities, rows: int, batches: int) -> dict:
        """The output file's attributes known at the start; `complete` and `end_time` are
        added when it is finished."""
        manifest = self.journal.manifest
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
            "runs": manifest["runs"],
            "start_time": manifest["start_time"],
        }


class _Collector:
    """Rank 0's side of the output: takes finished batches from the last stages of every
    replica (its own included), in whatever order they finish, commits each to the journal
    and writes it to the output file, in a background thread; a replica's DONE says it has
    no more.

    The journal is the record that survives a kill; the output file (FILE.partial until
    the run completes) is written alongside it, so that the end of the run has nothing
    left to copy. A run that does not complete removes FILE.partial, and the next run
    writes the committed batches into a fresh one first.
    """

    def __init__(self, world: Channel, journal: Journal, writer: OutputWriter, lock: OutputLock,
                 layout: Layout, progress: Progress, batch_size: int):
        self.world = world
        self.journal = journal
        self.writer = writer
        self.lock = lock
        self.progress = progress
        self.batch_size = batch_size
        sources = {layout.leader(replica, layout.stages - 1) for replica in range(layout.replicas)}
        self._receivers = {s: PacketReceiver(world, s) for s in sorted(sources - {0})}
        self._busy = False
        self.error: Exception | None = None
        self.commits = 0
        self.rows = 0
        self._committer = Committer(self._commit, first=self._rewrite)

    def _rewrite(self) -> None:
        """The batches earlier runs committed, into this run's output file (resume only)."""
        for start, arrays in self.journal.batches():
            self._write(start, arrays)

    def _commit(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        """Make one finished batch durable, then write it (in the committer's thread)."""
        self._guarded(start, "committing", self.journal.folder, self.journal.commit, arrays)
        self._write(start, arrays)

    def _write(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        self._guarded(start, "writing", self.writer.temp_path, self.writer.write, arrays)

    def _guarded(self, start: int, doing: str, where: Path, action, arrays) -> None:
        """`action(start, arrays)`, with a failure to write told in one line."""
        try:
            with self.world.recorder.span("write"):
                action(start, arrays)
        except OSError as exc:
            full = "disk full" if _disk_full(exc) else "cannot write"
            raise DataError(f"{full} while {doing} rows {start}..{start + self.batch_size - 1} to "
                            f"{where} ({exc.strerror or exc}); the batches committed so far are "
                            f"intact in {self.journal.folder}: make room and run again with "
                            "--resume") from None

    def write(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        """Hand one finished batch to the committer; count the ones it has committed."""
        self._committer.put(start, arrays)
        self._count(self._committer.committed())

    def _count(self, rows: list[int]) -> None:
        for done in rows:  # progress shows committed batches only
            self.commits += 1
            self.rows += done
            self.progress.update(done)
        self.lock.refresh()

    def poll(self) -> None:
        """Commit whatever has arrived; never blocks, never raises (it runs inside waits that
        others take part in): a failure is kept for `check`."""
        if self._busy or self.error is not None:
            return
        self._busy = True  # waits inside a commit must not poll again
        try:
            self._count(self._committer.committed())
            for source, receiver in list(self._receivers.items()):
                packet = receiver.poll()
                if packet is None:
                    continue
                kind, start, _, arrays = packet
                if kind == DONE:
                    del self._receivers[source]
                    continue
                self.write(start, arrays)
                self._receivers[source] = PacketReceiver(self.world, source)
        except Exception as exc:
            self.error = exc
        finally:
            self._busy = False

    def check(self) -> None:
        """Raise what went wrong while committing, at a point where every rank can follow."""
        if self.error is not None:
            raise self.error

    def drain(self) -> None:
        """Wait, politely, until every replica has said it is done and all is committed."""
        try:
            while self._receivers:
                self.poll()
                self.check()
                if self._receivers:
                    self.world.wait(next(iter(self._receivers.values())).request)
            self.check()
            self._count(self._committer.close())
        finally:
            self.progress.close()

    def abandon(self) -> None:
        """On failure: let queued commits finish (they are whole batches), then stop."""
        for receiver in self._receivers.values():
            receiver.abandon()
        try:
            self._committer.close()
        except BaseException:
            pass


def shared_device(devices: list[tuple[str, str | None]], target: str) -> BackendError | None:
    """An error if two ranks on one node would use the same device ((host, device) per rank)."""
    seen = {}
    for rank, (host, device) in enumerate(devices):
        if device is None:
            continue
        if (host, device) in seen:
            return BackendError(f"[device] device_id: ranks {seen[(host, device)]} and {rank} on "
                                f"{host} would both use {target} device {device}")
        seen[(host, device)] = rank
    return None


def _disk_full(exc: OSError) -> bool:
    """ENOSPC, from the OS or inside an HDF5 error (which names the errno in its text)."""
    return exc.errno == errno.ENOSPC or "No space left on device" in str(exc)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
