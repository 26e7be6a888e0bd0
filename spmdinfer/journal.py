"""The durable record of a run: committed batches, what produced them, and who holds the output.

HDF5 is not crash-safe: a writer killed in the middle of a write can leave a file
that no longer opens. So a run never writes its output file until the end.
Rank 0 commits every finished batch to `FILE.parts/` as its own small file,
written under a temporary name and renamed (atomic on POSIX file systems), so a
batch reported done survives a kill of any process at any moment. When every
batch is committed, rank 0 assembles `FILE.partial` from the parts, marks it
complete, renames it to `FILE` and removes the parts. `--resume` continues from
the parts after checking that the job, the slices and the input are the ones
that produced them.

`FILE.lock` keeps two runs off one output: created exclusively (O_EXCL, which
NFS v3 and later honour), holding the host and pid, and touched by rank 0 while
the run lives. A lock whose holder is a dead process on this host, or that has
not been touched for LOCK_STALE_SECONDS, is stale and taken over, so a crashed
run never blocks `--resume`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError, OutputExistsError

PARTS_SUFFIX = ".parts"
LOCK_SUFFIX = ".lock"
MANIFEST = "manifest.json"
LOCK_REFRESH_SECONDS = 10.0
LOCK_STALE_SECONDS = 60.0
FINGERPRINT_BLOCKS = 16
FINGERPRINT_BLOCK_BYTES = 1 << 16


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + PARTS_SUFFIX)


class Journal:
    """FILE.parts/: one file per committed batch, and a manifest saying what they belong to."""

    def __init__(self, folder: Path, manifest: dict, fsync: bool):
        self.folder = folder
        self.manifest = manifest
        self._fsync = fsync

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
            return cls(folder, manifest, fsync)
        if folder.exists():
            remove_tree(folder)
        folder.mkdir(parents=True)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        journal = cls(folder, {"identity": identity, "attempts": {}, "runs": 0,
                               "start_time": started}, fsync)
        journal.save_manifest()
        return journal

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
        return {int(p.name[6:-4]) for p in self.folder.glob("batch-*.npz")}

    def commit(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        """Make one finished batch durable (atomic: it is there whole, or not at all)."""
        path = self.folder / f"batch-{start:015d}.npz"
        temp = path.with_name(path.name + ".tmp")
        with open(temp, "wb") as f:
            np.savez(f, *arrays)
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)

    def load(self, start: int) -> list[np.ndarray]:
        with np.load(self.folder / f"batch-{start:015d}.npz", allow_pickle=False) as data:
            return [data[f"arr_{i}"] for i in range(len(data.files))]

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

    def remove(self) -> None:
        remove_tree(self.folder)

    def _replace(self, path: Path, data: bytes) -> None:
        temp = path.with_name(path.name + ".tmp")
        with open(temp, "wb") as f:
            f.write(data)
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)


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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
