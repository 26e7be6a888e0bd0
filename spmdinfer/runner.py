"""The run: start-up, the loop over this rank's batches, the finish.

Start-up is a sequence of phases every rank takes in the same order (spmdinfer.startup).
The loop composes this rank's source, stage and sink (spmdinfer.pipeline); rank 0 also
runs the collector that commits and writes every replica's batches (spmdinfer.collector).

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

import logging
import os
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .comm import DONE, Channel, Peers, settle
from .input import InputField
from .errors import DataError, JobFailed, PeerFailed
from .failure import abort, reported
from .log import log
from .metrics import Recorder, write_metrics, write_trace
from .pipeline import assemble
from .program import Program
from .spec import JobSpec
from .startup import Startup, shared_device  # noqa: F401  (shared_device: spmdinfer.runner's API)
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
    job: str = "JOB"              # the job file, as the command to continue names it

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
                    f"{self.remaining} to go; continue with: spmdinfer run "
                    f"{shlex.quote(self.job)} --resume (exit code {EXIT_STOPPED})")
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
    settle(comm.Ibarrier())  # every rank is here before the first blocking call (Dup)
    peers = Peers(comm)
    world = Channel(comm, peers, recorder=Recorder(trace=trace is not None))
    previous = _catch_stop_signals(peers)
    try:
        summary = _Run(Startup(spec, world, overwrite, resume, progress)).run()
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
    level = logging.WARNING if peers.comm.rank == 0 else logging.INFO

    def handler(signum, frame):
        # Under Slurm a rank may get one stop signal from Slurm and one from mpiexec within
        # milliseconds: only a signal well after the first means "now".
        if first and time.monotonic() - first[0] > REPEAT_SIGNAL_SECONDS:
            os._exit(EXIT_STOPPED)
        if not first:
            first.append(time.monotonic())
            peers.signalled = True
            # Not "a user asked": Open MPI's launcher sends SIGTERM to the survivors of a
            # rank that died, and Slurm to every rank of a job it ends. Every rank gets it:
            # one line (rank 0's) says so, the others only at INFO.
            log.log(level, "received %s (from the launcher, Slurm or a user): stopping after "
                    "the batches in flight", signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class _Run:
    """One rank's run: the start-up phases, the loop over its batches, the finish."""

    def __init__(self, startup: Startup):
        self.startup = startup
        self.spec, self.world = startup.spec, startup.world
        self.watchdog: Watchdog | None = None
        self.loaded = 0.0

    def run(self) -> RunSummary:
        started = time.monotonic()
        startup = self.startup
        startup.discover()
        try:
            # Start-up: a phase a call, on every rank in this order (spmdinfer.startup).
            fields, rows, done = startup.preflight()
            if done:
                startup.release()
                return RunSummary(rows, 0, time.monotonic() - started, 0.0, self.spec.output.file,
                                  outcome="already complete")
            startup.check_devices()
            startup.form_cluster()
            program, identities = startup.load(fields)
            starts = list(range(0, rows, self.spec.input.batch_size)) or [0]
            pending = startup.schedule(identities, rows, starts)
            startup.start_collector(rows, identities, len(starts))
            self.watchdog = Watchdog(self.spec.run.batch_timeout, lambda: abort(self.world.comm, 1))
            self._loop(program, fields, pending, rows)
            self.world.finishing()
            if startup.collector is not None:
                startup.collector.drain()
            self.world.flush()
            # The finish waits for every rank too: a rank frozen there (after its last batch)
            # must end the job as it would mid-run, not hang it. So does the last barrier:
            # past it only the exit waits for the others (and, with --metrics or --trace,
            # the gather of their timings): the spmdinfer command bounds that (cli).
            self.watchdog.kick()
            outcome, remaining, batches, done = self._finish(starts)
            self.world.barrier()
            self.watchdog.stop()
        except BaseException as exc:
            raise self._fail(exc) from None
        finally:
            startup.close()
        return RunSummary(rows, batches, time.monotonic() - started, self.loaded - started,
                          self.spec.output.file, outcome=outcome, remaining=remaining,
                          rows_done=done, job=str(self.spec.path))

    def _fail(self, exc: BaseException) -> BaseException:
        """Tell the other ranks (unless they told us) and return what this rank raises.

        Committed batches stay in FILE.parts for --resume; a run that failed before its
        first batch leaves nothing behind.
        """
        startup = self.startup
        if self.watchdog is not None:
            self.watchdog.stop()
        if startup.collector is not None:
            startup.collector.abandon()
        batch = getattr(exc, "batch", None)
        if startup.journal is not None:
            if batch is not None and batch not in startup.counted:
                startup.journal.count_attempts([batch])  # a failure counts as an attempt
            if not startup.journal.committed() and not startup.resume:
                startup.journal.remove()
        if isinstance(exc, PeerFailed) or not isinstance(exc, Exception):
            return exc
        info = startup.info
        error, code = reported(exc, info)
        where = f"rank {info.rank} ({info.host}): " if info.layout.size > 1 else ""
        self.world.peers.notify(f"{where}{error}", code, batch)
        self.world.abandon()
        return JobFailed(f"{where}{error}", code, batch)

    # The loop.

    def _loop(self, program: Program, fields: list[InputField], starts: list[int],
              rows: int) -> None:
        """This rank's share of the batches in `starts`: its source gives the batches, its
        stage predicts and combines them, its sink takes the outputs."""
        startup = self.startup
        with self.world.recorder.phase("assemble"):
            pipeline = assemble(self.world, startup.info, self.spec, program, fields, rows,
                                starts, startup.reader, startup.collector,
                                startup.cluster.watch.predicting if startup.cluster else None,
                                startup.pre)
        source, stage, sink = pipeline.source, pipeline.stage, pipeline.sink
        finished = False
        self.loaded = time.monotonic()  # start-up ends here: the loop starts with the first batch
        self.world.recorder.start_loop()
        try:
            while True:
                self._tick()
                with self.world.recorder.span("bcast"):
                    batch = source.take()
                if batch.kind == DONE:
                    break
                sink.begin(batch)  # graph handoff: the later stages run along
                outputs = stage.predict(batch)
                source.post_ahead()  # shared memory: the others go straight on to the next batch
                sink.put(batch, stage.combine(batch, outputs))
                source.release(batch)  # every rank of the group is done with its arrays
            sink.done()
            finished = True
        finally:
            pipeline.close(finished)

    def _tick(self) -> None:
        """Between two batches: the watchdog sees progress; rank 0 commits what other
        replicas finished."""
        self.watchdog.kick()
        collector = self.startup.collector
        if collector is not None:
            collector.poll()  # other replicas' finished batches, between own batches
            collector.check()

    # The end.

    def _finish(self, starts: list[int]) -> tuple[str, int, int, int]:
        """Rank 0 completes the output once every batch is committed; every rank learns the
        outcome ("complete" or "stopped"), the batches still to do, and the batches and rows
        done this run."""
        journal, collector = self.startup.journal, self.startup.collector
        error = result = None
        if self.world.is_root:
            try:
                remaining = len(set(starts) - journal.committed())
                if remaining:
                    journal.forget_attempts(self.startup.counted)
                    result = ("stopped", remaining, collector.commits, collector.rows)
                else:
                    self._complete()
                    result = ("complete", 0, collector.commits, collector.rows)
            except Exception as exc:
                error = reported(exc, self.startup.info)[0]
        return self.world.agree(error, value=result)

    def _complete(self) -> None:
        """Rank 0: every batch is committed and written; the output file gets its provenance
        and its final name, and the journal goes."""
        journal, writer = self.startup.journal, self.startup.collector.writer
        try:
            with self.world.recorder.span("write"):
                writer.finish({"complete": True, "end_time": _now()})
        except OSError as exc:
            writer.discard()
            raise DataError(f"[output] file {self.spec.output.file}: cannot write it ({exc}); "
                            f"every batch is committed in {journal.folder}, so "
                            f"`spmdinfer run {shlex.quote(str(self.spec.path))} --resume` will "
                            "write it again") from None
        journal.remove()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
