"""Checks that need neither MPI nor a loaded model: the preflight of `run` and `validate`."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .data import InputReader, check_output_path
from .errors import BackendError, SpmdinferError
from .spec import JobSpec


@dataclass(frozen=True)
class Preflight:
    """What the checks found: the job is runnable with these numbers."""

    ranks: int
    rows: int
    batches: int
    inputs: list

    def __str__(self) -> str:
        inputs = "; ".join(f"{f.name} <- {f.describe()}" for f in self.inputs)
        return (f"{self.ranks} rank(s), {self.rows} rows in {self.batches} batch(es); "
                f"inputs: {inputs}")


def check_slices(spec: JobSpec) -> None:
    """Every model rank's slice file exists."""
    for rank, path in spec.model.slice_paths():
        if not path.is_file():
            raise BackendError(f"[model] files: slice of model rank {rank} not found: {path}")


def open_checked(spec: JobSpec, overwrite: bool) -> InputReader:
    """Check slices, output path and inputs; return the open input reader."""
    check_slices(spec)
    check_output_path(spec.output, overwrite)
    return InputReader(spec.input)


def validate(spec: JobSpec, overwrite: bool = False) -> Preflight:
    """Run every check that needs no MPI and no model; raise SpmdinferError on the first problem."""
    reader = open_checked(spec, overwrite)
    try:
        batch = spec.input.batch_size
        return Preflight(spec.model.ranks, reader.rows, -(-reader.rows // batch), reader.fields)
    finally:
        reader.close()


def read_manifest(path: Path) -> dict[Path, str]:
    """A sha256sum-style manifest: `HASH  FILE` per line, FILE relative to the manifest."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise BackendError(f"[model] sha256 manifest {path}: cannot read it ({exc.strerror})") from None
    entries = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if len(digest) != 64 or not name:
            raise BackendError(f"[model] sha256 manifest {path} line {number}: expected "
                               f"'HASH  FILE' as sha256sum writes it, got {line!r}")
        entries[(path.parent / name).resolve()] = digest.lower()
    return entries


def check_manifest(manifest: dict[Path, str], path: Path, digest: str) -> None:
    """The slice's sha256 is the one the manifest lists."""
    expected = manifest.get(Path(path).resolve())
    if expected is None:
        raise BackendError(f"[model] sha256 manifest does not list slice {path}")
    if expected != digest:
        raise BackendError(f"slice {path} has sha256 {digest}, the [model] sha256 manifest "
                           f"expects {expected}: a wrong or damaged slice")


def launcher_world() -> int | None:
    """The world size the MPI launcher exported, when validate runs under one."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def mpi_libraries() -> tuple[str, str | None]:
    """(what mpi4py loaded, what the mpiexec on PATH reports), as family names."""
    import mpi4py

    mpi4py.rc.initialize = False  # MPI_Get_library_version needs no MPI_Init
    from mpi4py import MPI

    library = MPI.Get_library_version().replace("\0", "")  # Open MPI's ends in a NUL
    launcher = shutil.which("mpiexec") or shutil.which("mpirun")
    launched = None
    if launcher:
        result = subprocess.run([launcher, "--version"], capture_output=True, text=True, timeout=30)
        launched = result.stdout + result.stderr
    return library, launched


def mpi_family(text: str | None) -> str | None:
    if not text:
        return None
    for family, marks in (("Intel MPI", ("Intel(R) MPI",)), ("Open MPI", ("Open MPI", "OpenRTE")),
                          ("MPICH", ("MPICH", "HYDRA"))):
        if any(mark in text for mark in marks):
            return family
    return None


def validate_deep(spec: JobSpec, world: int | None = None, per_node: int | None = None,
                  overwrite: bool = False) -> list[str]:
    """Everything `validate` checks, plus the layout for a world size, the sha256 manifest,
    devices per node, the MPI library against the launcher, and every stage-0 slice's declared
    inputs against the datasets (read one slice at a time). Returns what was checked."""
    from .inspect import declared
    from .plan import plan, shared_devices
    from .program import Program, check_output_count

    found = validate(spec, overwrite)
    lines = [f"files and datasets: {found}"]
    world = world or launcher_world() or spec.model.ranks
    rows = plan(spec, world, per_node)
    clashes = shared_devices(rows)
    if clashes:
        raise BackendError(f"[device] device_id: ranks {clashes[0][0]} and {clashes[0][1]} would "
                           "share a device on one node")
    model = spec.model
    lines.append(f"layout: world {world} = {world // model.ranks} replica(s) x {model.stages} "
                 f"stage(s) x {model.ranks_per_stage} rank(s); devices not shared on a node")
    if model.sha256:
        manifest = read_manifest(Path(model.sha256))
        for _, path in model.slice_paths():
            check_manifest(manifest, path, sha256_of(path))
        lines.append(f"sha256: every slice matches {model.sha256}")
    library, launched = mpi_libraries()
    family, launcher_family = mpi_family(library), mpi_family(launched)
    if launcher_family and family and launcher_family != family:
        raise SpmdinferError(f"MPI mismatch: mpi4py loaded {library.splitlines()[0]!r}, but the "
                             f"mpiexec on PATH is {launcher_family}; launch with the mpiexec of the "
                             "MPI mpi4py was built against")
    lines.append(f"MPI: mpi4py loads {library.splitlines()[0].strip()}; mpiexec on PATH: "
                 f"{launcher_family or 'not found'}")
    fields = InputReader(spec.input)
    try:
        batch = fields.fields
    finally:
        fields.close()
    for rank in range(model.ranks):
        paths = model.graph_paths(rank)
        sessions = [_Declared(*declared(path)) for path in paths]
        stage = rank // model.ranks_per_stage
        inputs = batch if stage == 0 else ([] if model.handoff == "graph" else None)
        program = Program(sessions, paths, spec.steps, inputs)
        if stage == model.stages - 1:
            check_output_count(program.outputs(), spec.output_names, paths[-1])
    lines.append(f"slices: the declared inputs and outputs of all {model.ranks} model rank(s) fit")
    from .backends import resolve
    from .cluster import plan_cluster, slice_collectives

    found = {rank: slice_collectives(spec, rank) for rank in range(model.ranks)}
    cluster = plan_cluster(spec, resolve(model.backend, model.slice_path(0)), found)
    lines.append(f"collectives: {cluster}" if cluster else
                 "collectives: none inside the graphs (independent slices, combined on the host)")
    return lines


class _Declared:
    """A slice as its file declares it: enough for Program to bind, nothing to run."""

    def __init__(self, inputs, outputs, version):
        self._inputs, self._outputs, self.version = inputs, outputs, version

    def inputs(self):
        return self._inputs

    def outputs(self):
        return self._outputs


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
