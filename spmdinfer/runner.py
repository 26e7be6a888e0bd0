"""The run loop: rank 0 reads and broadcasts each batch, every rank predicts its slice in
lockstep, rank 0 combines the ranks' outputs and writes them.

Failures are agreed on at fixed points of the loop (after the preflight, after
loading, after every predict and with every batch header), so a failing rank
never leaves the others waiting in a collective: all ranks leave together with
the failing rank's message and exit code.
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
from .backends import Placement, Session, TensorInfo
from .comm import MAX_NDIM, Channel
from .data import InputField, InputReader, OutputWriter
from .errors import BackendError, DataError, JobFailed, SpmdinferError
from .log import log, setup_logging
from .progress import Progress
from .spec import Combine, JobSpec
from .topology import RankInfo, discover
from .validate import open_checked

# Batch header codes, broadcast by rank 0 before every batch.
GO, DONE, FAILED = 0, 1, 2


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

    Returns the summary on every rank. Raises SpmdinferError (or JobFailed, with
    the failing rank's message) on every rank when any rank fails.
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    channel = Channel(comm)
    try:
        return _Run(spec, channel, overwrite, progress).run()
    finally:
        channel.close()


def _failure(exc: BaseException, info: RankInfo | None) -> tuple[BaseException, int]:
    """The error to report for `exc` and its exit code; crashes get their traceback logged."""
    if isinstance(exc, SpmdinferError):
        return exc, exc.exit_code
    log.error("unexpected error%s", f" on {info}" if info else "", exc_info=exc)
    return RuntimeError(f"{type(exc).__name__}: {exc}"), 1


class _Run:
    def __init__(self, spec: JobSpec, channel: Channel, overwrite: bool, progress: bool):
        self.spec = spec
        self.channel = channel
        self.overwrite = overwrite
        self.show_progress = progress
        self.reader: InputReader | None = None
        self.writer: OutputWriter | None = None
        self._pending: tuple[BaseException, int] | None = None  # rank 0's read or write failure

    def run(self) -> RunSummary:
        started = time.monotonic()
        start_time = _now()
        info = discover(self.channel.comm, self.spec)
        setup_logging(info.rank)
        log.info("%s", info)
        try:
            fields, rows = self._preflight()
            session, order, identity = self._load(info, fields)
            loaded = time.monotonic()
            if self.channel.is_root:
                self.writer = OutputWriter(self.spec.output, rows, self.spec.input.batch_size)
            batches = self._loop(info, session, order, fields, rows)
            if self.channel.is_root:
                attrs = self._provenance(identity, rows, batches, start_time)
            self._finish(attrs if self.channel.is_root else None)
        except BaseException:
            if self.writer is not None:
                self.writer.discard()
            raise
        finally:
            if self.reader is not None:
                self.reader.close()
        return RunSummary(rows, batches, time.monotonic() - started, loaded - started,
                          self.spec.output.file)

    def _preflight(self) -> tuple[list[InputField], int]:
        """Rank 0 checks every file and dataset before any rank loads a model."""
        error = None
        plan = None
        if self.channel.is_root:
            try:
                self.reader = open_checked(self.spec, self.overwrite)
                plan = (self.reader.fields, self.reader.rows)
            except SpmdinferError as exc:
                error = exc
        self.channel.agree(error)
        return self.channel.bcast_object(plan)

    def _load(self, info: RankInfo, fields: list[InputField]):
        """Every rank loads its slice and checks it against the inputs and outputs."""
        error, code, identity, session, order = None, 0, None, None, None
        path = self.spec.model.slice_path(info.model_rank)
        try:
            name = backends.resolve(self.spec.model.backend, path)
            placement = Placement(target=self.spec.device.target, device_id=info.device_id,
                                  rank_id=info.model_rank, threads=info.threads,
                                  provider=self.spec.device.provider,
                                  config_file=self.spec.device.config_path(info.model_rank))
            loaded = time.monotonic()
            session = backends.open_session(name, path, placement,
                                            self.spec.backend_options.get(name, {}))
            log.info("loaded %s with %s %s in %.2f s", path, name, session.version,
                     time.monotonic() - loaded)
            order = bind_inputs(session.inputs(), fields, path)
            check_output_count(session.outputs(), self.spec.output_names, path)
            identity = (str(path), sha256(path), name, session.version)
        except Exception as exc:
            error, code = _failure(exc, info)
        self.channel.agree(error, code)
        identities = self.channel.gather_objects(identity)
        if self.channel.is_root:
            log.info("backend %s %s", identity[2], identity[3])
        return session, order, identities

    def _loop(self, info: RankInfo, session: Session, order: list[int],
              fields: list[InputField], rows: int) -> int:
        batch_size = self.spec.input.batch_size
        # A job with no rows still runs one batch of one zero row, to learn the outputs' shapes.
        buffers = [f.buffer(max(1, min(batch_size, rows))) for f in fields]
        for buffer in buffers:
            buffer[:1] = 0
        starts = list(range(0, rows, batch_size)) or [0]
        header = np.zeros(3, dtype=np.int64)
        progress = Progress(rows, self.show_progress and self.channel.is_root)
        batches = 0
        try:
            for start in starts + [None]:
                if self.channel.is_root:
                    header[:] = self._read_batch(start, rows, buffers)
                self.channel.bcast_ints(header)
                if header[0] == FAILED:
                    self.channel.agree(*(self._pending or (None, 0)))
                if header[0] == DONE:
                    break
                start, valid = int(header[1]), int(header[2])
                sent = max(valid, 1)
                for buffer in buffers:
                    self.channel.bcast_array(buffer[:sent])
                combined = self._predict_and_combine(info, session, order, buffers, sent, start)
                if self.channel.is_root:
                    try:
                        self.writer.write(start, [c[:valid] for c in combined])
                    except Exception as exc:
                        self._pending = _failure(
                            DataError(f"writing {self.writer.temp_path}: {exc}"), info)
                progress.update(valid)
                batches += 1
        finally:
            progress.close()
        return batches

    def _read_batch(self, start: int | None, rows: int, buffers) -> tuple[int, int, int]:
        """Rank 0: read the batch at `start` into `buffers`; the header that says what comes."""
        if self._pending is not None:
            return FAILED, 0, 0
        if start is None:
            return DONE, 0, 0
        stop = min(start + self.spec.input.batch_size, rows)
        try:
            self.reader.read(start, stop, buffers)
        except Exception as exc:
            self._pending = (DataError(f"reading rows {start}..{stop - 1} of "
                                       f"{self.reader.file_path}: {exc}"), 2)
            return FAILED, 0, 0
        return GO, start, stop - start

    def _predict_and_combine(self, info: RankInfo, session: Session, order: list[int],
                             buffers: Sequence[np.ndarray], sent: int, start: int) -> list[np.ndarray]:
        """Predict one batch on every rank; rank 0 gets the combined outputs."""
        error, code, outputs = None, 0, []
        try:
            outputs = session.predict([buffers[i][:sent] for i in order])
            if len(outputs) != len(self.spec.output_names):
                raise BackendError(f"slice {self.spec.model.slice_path(info.model_rank)} returned "
                                   f"{len(outputs)} outputs, [output.datasets] names "
                                   f"{len(self.spec.output_names)}")
        except Exception as exc:
            error, code = _failure(exc, info)
            error = type(error)(f"predict failed on batch rows {start}..{start + sent - 1}: {error}")
        table = self.channel.allgather_ints(batch_report(code, outputs, len(self.spec.output_names)))
        if table[:, 0].any():
            self.channel.agree(error, code)
        results = []
        for k, (combine, (name, _)) in enumerate(zip(self.spec.output.combine, self.spec.output.datasets)):
            shapes = report_layout(table, k, name, combine, sent)
            output = np.asarray(outputs[k])
            if combine.mode == "rank0":
                results.append(output)
            elif combine.mode == "concat":
                results.append(self.channel.gather_concat(output, shapes, combine.axis))
            else:
                results.append(self.channel.reduce_sum(output))
        return results

    def _provenance(self, identities, rows: int, batches: int, start_time: str) -> dict:
        return {
            "spmdinfer_version": __version__,
            "job_file": str(self.spec.path),
            "job_text": self.spec.text,
            "input_file": str(self.spec.input.file),
            "backend": identities[0][2],
            "backend_version": identities[0][3],
            "slice_files": [i[0] for i in identities],
            "slice_sha256": [i[1] for i in identities],
            "world_size": self.channel.size,
            "rows": rows,
            "batches": batches,
            "start_time": start_time,
            "end_time": _now(),
        }

    def _finish(self, attrs: dict | None) -> None:
        """Rank 0 moves the output into place; every rank learns whether that worked."""
        error = None
        if self.channel.is_root:
            try:
                self.writer.finish(attrs)
                self.writer = None
            except Exception as exc:
                error = DataError(f"[output] file {self.spec.output.file}: cannot finish: {exc}")
        self.channel.agree(error)


def bind_inputs(declared: list[TensorInfo], fields: list[InputField], path: Path) -> list[int]:
    """For each model input in declared order, the index of the dataset that feeds it.

    Names match when the job names exactly the slice's inputs; otherwise positional.
    Dtypes and row shapes must fit where the slice declares them: casting is never silent.
    """
    names = [f.name for f in fields]
    if not declared:
        return list(range(len(fields)))
    if len(declared) != len(fields):
        raise BackendError(f"[input.datasets] names {len(fields)} input(s) ({', '.join(names)}) but "
                           f"slice {path} declares {len(declared)}: "
                           f"{', '.join(str(d) for d in declared)}")
    if sorted(d.name for d in declared) == sorted(names):
        order = [names.index(d.name) for d in declared]
    else:
        order = list(range(len(fields)))
    for tensor, index in zip(declared, order):
        field = fields[index]
        dtype_ok = tensor.dtype is None or tensor.dtype == np.dtype(field.dtype)
        shape_ok = tensor.shape is None or (
            len(tensor.shape) == len(field.row_shape) + 1 and
            all(d is None or d == s for d, s in zip(tensor.shape[1:], field.row_shape)))
        if not (dtype_ok and shape_ok):
            raise DataError(f"[input.datasets] {field.name}: {field.describe()} does not fit model "
                            f"input {tensor} of slice {path} (casting is never silent)")
    return order


def check_output_count(declared: list[TensorInfo], names: list[str], path: Path) -> None:
    if declared and len(declared) != len(names):
        raise BackendError(f"[output.datasets] names {len(names)} output(s) ({', '.join(names)}) but "
                           f"slice {path} declares {len(declared)}: "
                           f"{', '.join(str(d) for d in declared)}")


def batch_report(code: int, outputs: Sequence[np.ndarray], count: int) -> np.ndarray:
    """This rank's status and output layout: [code, (dtype num, ndim, dims...) per output]."""
    report = np.full(1 + count * (2 + MAX_NDIM), -1, dtype=np.int64)
    report[0] = code
    if code:
        return report
    for k, output in enumerate(outputs):
        output = np.asarray(output)
        if output.ndim > MAX_NDIM:
            report[0] = 1
            return report
        at = 1 + k * (2 + MAX_NDIM)
        report[at:at + 2] = output.dtype.num, output.ndim
        report[at + 2:at + 2 + output.ndim] = output.shape
    return report


def report_layout(table: np.ndarray, k: int, name: str, combine: Combine,
                  rows: int) -> list[tuple[int, ...]]:
    """Check output k across ranks from the gathered reports; every rank reaches the same verdict."""
    at = 1 + k * (2 + MAX_NDIM)
    shapes = [tuple(int(d) for d in row[at + 2:at + 2 + row[at + 1]]) for row in table]
    dtypes = {int(row[at]) for row in table}
    ranks = range(len(table)) if combine.mode != "rank0" else [0]
    for rank in ranks:
        if not shapes[rank] or shapes[rank][0] != rows:
            raise BackendError(f"output {name}: rank {rank} returned shape {shapes[rank]} for a batch "
                               f"of {rows} rows; outputs must keep the batch's rows on axis 0")
    if combine.mode == "rank0":
        return shapes
    if len(dtypes) > 1:
        raise BackendError(f"output {name}: ranks returned different dtypes, cannot {combine}")
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
    return shapes


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
