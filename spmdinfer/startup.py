"""Start-up: what every rank does before the first batch, one phase a call, in this order.

- discover: who this rank is (topology.RankInfo), in the log.
- preflight: rank 0 checks every file and dataset and takes the output's lock.
- check_devices: no two ranks on one node would use the same device.
- form_cluster: the ranks of each model instance whose slices communicate inside their
  graphs join one MindSpore cluster (spmdinfer.cluster), before any slice loads.
- load: every rank loads its graphs and binds them to what its stage receives.
- schedule: rank 0 opens the journal; every rank learns which batches are still to do.
- start_collector: rank 0 starts the collector that commits and writes finished batches.

Every rank takes every phase, and each phase that can fail ends in an agreement
(`Channel.agree`): bad input ends every rank together, with one message, before the next
phase begins, and so before any rank loads a model or writes anything.

What the phases open for the rest of the run is released by `Startup.close`, at the end and
on failure alike: the input reader, the output's temporary file, the journal, then whatever
a phase pushed on `closers` (a contextlib.ExitStack, unwound latest first), then the lock and
the folders this run made.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from pathlib import Path

from . import __version__, backends, cluster, topology
from .backends import Placement
from .collector import Collector
from .comm import Channel
from .input import InputField, InputReader
from .output import OutputWriter
from .errors import BackendError, DataError, SpmdinferError
from .failure import reported
from .hooks import Hook, load_hooks, preprocessed_fields, schema_of
from .journal import Journal, OutputLock, fingerprint, parts_folder
from .log import log, setup_logging
from .program import Program, check_output_count, output_note
from .progress import Progress
from .spec import JobSpec
from .topology import Layout, RankInfo, physical_device
from .validate import check_manifest, open_checked, read_manifest, sha256_of


def _phase(method):
    """A start-up phase: its seconds go to this rank's metrics (`startup_seconds`)."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        with self.world.recorder.phase(method.__name__):
            return method(self, *args, **kwargs)
    return timed


class Startup:
    """One rank's start-up, a method per phase, and what the phases open for the run."""

    def __init__(self, spec: JobSpec, world: Channel, overwrite: bool, resume: bool,
                 progress: bool):
        self.spec = spec
        self.world = world
        self.overwrite = overwrite
        self.resume = resume
        self.show_progress = progress
        self.info: RankInfo | None = None
        self.layout: Layout | None = None
        self.reader: InputReader | None = None
        self.collector: Collector | None = None
        self.journal: Journal | None = None
        self.lock: OutputLock | None = None
        self.made_dirs: list[Path] = []
        self.counted: list[int] = []   # batches whose attempt this run counted
        self.closers = contextlib.ExitStack()  # what a phase opened: see `close`
        self.cluster: cluster.Membership | None = None
        self.pre: Hook | None = None    # the job's preprocess, on each stage-0 leader
        self.post: Hook | None = None   # the job's postprocess, on rank 0

    @_phase
    def discover(self) -> RankInfo:
        """Who this rank is (collective: the ranks of each node find each other)."""
        info = topology.discover(self.world.comm, self.spec)
        self.info, self.layout = info, info.layout
        setup_logging(info.rank)
        # The pid too: MPICH's launcher names a killed rank by its pid and host alone.
        log.info("%s pid=%d", info, os.getpid())
        return info

    @_phase
    def preflight(self) -> tuple[list[InputField], int, bool]:
        """Rank 0 checks every file and dataset and takes the output's lock before any rank
        loads a model; with --resume, a complete output means there is nothing to do."""
        error = plan = None
        if self.world.is_root:
            try:
                output = self.spec.output.file
                done = self.resume and output.is_file() and not parts_folder(output).exists()
                self.reader = open_checked(self.spec, self.overwrite or done)
                fields = self.reader.fields
                if not done:
                    self.pre, self.post = load_hooks(self.spec)
                    if self.pre is not None:  # the model gets what the preprocess returns
                        fields = preprocessed_fields(self.pre, self.reader,
                                                     self.spec.input.batch_size)
                plan = (fields, self.reader.rows, done)
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

    @_phase
    def check_devices(self) -> None:
        """No two ranks on one node would use the same device; checked before any model loads."""
        target = self.spec.device.target
        devices = self.world.allgather_objects((self.info.host,
                                                physical_device(target, self.info.device_id)))
        self.world.agree(shared_device(devices, target))

    @_phase
    def form_cluster(self) -> None:
        """Join this rank's MindSpore cluster where its model instance's slices communicate
        inside their graphs (collective; a no-op for independent slices)."""
        model = self.spec.model
        backend = backends.resolve(model.backend, model.slice_path(self.info.model_rank))
        self.cluster = cluster.form(self.world, self.spec, self.info, backend)
        if self.cluster is not None and self.world.is_root:
            self.cluster.watch.on_exit.append(self._abandon)

    def _abandon(self) -> None:
        """Rank 0 leaving from its PeerWatch (the main thread stuck inside MindSpore after a
        peer failed): the committed batches stay for --resume; the lock and the output's
        temporary file go."""
        if self.collector is not None:
            self.collector.writer.temp_path.unlink(missing_ok=True)
        self.release()

    @_phase
    def load(self, fields: list[InputField]) -> tuple[Program, list]:
        """Every rank loads its graphs and binds them to what its stage receives."""
        info, layout, model = self.info, self.layout, self.spec.model
        error, code, identity, program, notes = None, 0, None, None, []
        paths = model.graph_paths(info.model_rank)
        try:
            name = backends.resolve(model.backend, paths[0])
            placement = Placement(target=self.spec.device.target, device_id=info.device_id,
                                  rank_id=info.model_rank, threads=info.threads,
                                  provider=self.spec.device.provider,
                                  config_file=self.spec.device.config_path(info.model_rank),
                                  cores=info.cores)
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
            if layout.stage == 0 and layout.stage_rank == 0 and self.spec.input.preprocess \
                    and self.pre is None:  # another replica's leader: it reads its own batches
                self.pre = Hook.load("[input] preprocess", self.spec.input.preprocess,
                                     self.spec.path.parent)
                self.pre.schema = schema_of(fields)
            last = layout.stage == layout.stages - 1
            program = Program(sessions, paths, self.spec.steps, batch,
                              self.spec.output.sources if last else ())
            notes = program.notes
            if layout.stage == layout.stages - 1:
                check_output_count(program.outputs(), self.spec.output_names, paths[-1])
                notes = notes + [output_note(program.outputs(), self.spec.output_names, paths[-1])]
            digests = [sha256_of(p) for p in paths]
            if model.sha256:
                manifest = read_manifest(Path(model.sha256))
                for path, digest in zip(paths, digests):
                    check_manifest(manifest, path, digest)
            identity = ([str(p) for p in paths], digests, name, program.version)
        except Exception as exc:
            error, code = reported(exc, info)
        self.world.agree(error, code)
        # Named by the job's path templates, so that every rank's note on its own slice reads alike.
        notes = [_templated(n, paths, model.files) for n in notes if n]
        noted = self.world.gather_objects(notes)
        for note in dict.fromkeys(n for ranks in noted or () for n in ranks):
            log.warning("%s", note)  # rank 0, once for all the ranks whose slices say the same
        identities = self.world.allgather_objects(identity)
        if self.world.is_root:
            log.info("backend %s %s", identity[2], identity[3])
        if layout.stage == 0 and layout.stage_rank == 0 and self.reader is None:
            self.reader = InputReader(self.spec.input)  # every replica leader reads its own batches
        return program, identities

    @_phase
    def schedule(self, identities: list, rows: int, starts: list[int]) -> list[int]:
        """Rank 0 opens the journal (checking a resumed run's identity); every rank learns
        which batches are still to do."""
        error = pending = None
        if self.world.is_root:
            identity = self._identity(identities)  # reads the input's size and times
            try:
                self.journal = Journal.open(self.spec.output.file, identity,
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
            except OSError as exc:  # the journal's folder, manifest or log: no room, no permission
                error = DataError(f"[output] file {self.spec.output.file}: cannot write "
                                  f"{parts_folder(self.spec.output.file)} "
                                  f"({exc.strerror or exc}); nothing was scored")
        return self.world.agree(error, value=pending)

    def _identity(self, identities: list) -> dict:
        """What produced the committed batches: resuming with anything else is refused."""
        return {
            "job": hashlib.sha256(self.spec.text.encode()).hexdigest(),
            "slices": [h for i in identities[:self.spec.model.ranks] for h in i[1]],
            "input": fingerprint(self.spec.input.file),
        }

    @_phase
    def start_collector(self, rows: int, identities: list, batches: int) -> None:
        """Rank 0 opens the output's temporary file and starts committing finished batches,
        also while it waits for its peers."""
        error, code = None, 0
        if self.world.is_root:
            writer = None
            try:
                writer = OutputWriter(self.spec.output, rows, self.spec.input.batch_size,
                                      self._provenance(identities, rows, batches))
                self.collector = Collector(self.world, self.journal, writer, self.lock,
                                           self.layout, Progress(rows, self.show_progress),
                                           self.spec.input.batch_size,
                                           self.spec.output.datasets, self.post,
                                           cores=self.info.helper_cores)
                self.world.idle = self.collector.poll
            except Exception as exc:
                if writer is not None and self.collector is None:
                    writer.discard()  # nothing else holds it to discard it
                error, code = reported(exc, self.info)
        # The others go on to split the world into groups, a blocking collective that hears
        # no failure notice: they must learn here that rank 0 could not open its output.
        self.world.agree(error, code)

    def _provenance(self, identities, rows: int, batches: int) -> dict:
        """The output file's attributes known at the start; `complete` and `end_time` are
        added when it is finished."""
        manifest = self.journal.manifest
        return {
            "spmdinfer_version": __version__,
            "job_file": _text(self.spec.path),
            "job_text": self.spec.text,
            "input_file": _text(self.spec.input.file),
            "backend": identities[0][2],
            "backend_version": identities[0][3],
            "slice_files": [_text(p) for i in identities[:self.spec.model.ranks] for p in i[0]],
            "slice_sha256": [h for i in identities[:self.spec.model.ranks] for h in i[1]],
            "world_size": self.world.size,
            "replicas": self.layout.replicas,
            "stages": self.layout.stages,
            "rows": rows,
            "batches": batches,
            "runs": manifest["runs"],
            "start_time": manifest["start_time"],
        }

    # The end, on success and on failure alike.

    def close(self) -> None:
        """Release what the phases opened, in this order: the input reader, the output's
        temporary file, the journal, what phases pushed on `closers` (latest first), then
        the lock and the folders this run made."""
        if self.reader is not None:
            self.reader.close()
        if self.collector is not None:
            self.collector.writer.discard()  # unless it was finished: then there is nothing left
        if self.journal is not None:
            self.journal.close()
        self.closers.close()
        self.release()

    def release(self) -> None:
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


def _text(path) -> str:
    """A path as text that HDF5 can store: bytes of the name that are not UTF-8 (a name in
    another encoding) become backslash escapes, as in `job\\xff.toml`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _templated(note: str, paths: list[Path], templates: tuple[str, ...]) -> str:
    """`note` with this rank's slice files named by the job's templates (`.../net{rank}.mindir`)."""
    for path, template in zip(paths, templates):
        note = note.replace(str(path), template.replace("{{", "{").replace("}}", "}"))
    return note


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
