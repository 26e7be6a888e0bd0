"""Rank 0's collector: every replica's finished batches, committed and written in the background."""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .comm import DONE, Channel, PacketReceiver
from .output import OutputWriter
from .errors import DataError, HookError
from .hooks import Hook
from .journal import Journal, OutputLock
from .overlap import Committer
from .progress import Progress
from .topology import Layout


_DATASET_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class Collector:
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
                 layout: Layout, progress: Progress, batch_size: int,
                 datasets: Sequence[tuple[str, str]] = (), post: Hook | None = None,
                 cores: frozenset[int] = frozenset()):
        """`datasets`: [output.datasets], the model's outputs by name; `post` (the job's
        postprocess) gets them so named, and what it returns is committed and written.
        `cores`: where the commit thread runs (RankInfo.helper_cores)."""
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
        self.names = [name for name, _ in datasets]
        self._declared = dict(datasets)
        self.post = post
        if post is not None and "written" in journal.manifest:  # a resumed run's datasets
            writer.paths = [path for _, path in journal.manifest["written"]]
        self._committer = Committer(self._commit, first=self._rewrite, cores=cores)

    def _rewrite(self) -> None:
        """The batches earlier runs committed, into this run's output file (resume only)."""
        for start, arrays in self.journal.batches():
            self._write(start, arrays)

    def _commit(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        """Make one finished batch durable, then write it (in the committer's thread)."""
        if self.post is not None:
            arrays = self._postprocessed(start, arrays)
        self._guarded(start, "committing", self.journal.folder, self.journal.commit, arrays)
        self._write(start, arrays)

    def _postprocessed(self, start: int, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """What the postprocess makes of a finished batch, in the order of its datasets. The
        first batch names them: a name [output.datasets] gives is written at its path there,
        any other at /NAME; the journal keeps them for a resumed run."""
        rows = len(arrays[0]) if arrays else 0
        with self.world.recorder.span("write"):  # metrics: a postprocess counts as writing
            result = self.post(dict(zip(self.names, arrays)), start, rows)
        if "written" not in self.journal.manifest:
            written = [(name, self._declared.get(name, "/" + name)) for name in result]
            bad = [name for name in result if not _DATASET_NAME.fullmatch(name)]
            if bad:
                raise HookError(f"[output] postprocess {self.post.name} returned {bad[0]!r}: a "
                                "dataset name is letters, digits, '_', '-' and '.'")
            self.journal.manifest["written"] = written
            self.journal.save_manifest()
            self.writer.paths = [path for _, path in written]
        names = [name for name, _ in self.journal.manifest["written"]]
        if list(result) != names:
            raise HookError(f"[output] postprocess {self.post.name} on rows {start}.."
                            f"{start + rows - 1} returned {', '.join(result)}; the output's "
                            f"datasets are {', '.join(names)}")
        return list(result.values())

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


def _disk_full(exc: OSError) -> bool:
    """ENOSPC, from the OS or inside an HDF5 error (which names the errno in its text)."""
    return exc.errno == errno.ENOSPC or "No space left on device" in str(exc)
