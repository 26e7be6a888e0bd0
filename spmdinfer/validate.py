"""Checks that need neither MPI nor a loaded model: the preflight of `run` and `validate`."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .hooks import load_hooks, preprocessed_fields
from .input import InputReader
from .output import check_output_path
from .errors import BackendError, SpmdinferError
from .journal import parts_folder
from .spec import JobSpec


@dataclass(frozen=True)
class Preflight:
    """What the checks found: the job is runnable with these numbers; `output` says what
    `run` would do with the output, and `refusal` why `run` with the same flags would not
    start (None: it would)."""

    ranks: int
    rows: int
    batches: int
    inputs: list
    output: str = ""
    refusal: str | None = None
    slices: str = ""  # what the slices' declared inputs and outputs showed
    undeclared: tuple[int, ...] = ()  # model ranks whose last graph declares no outputs

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


def validate(spec: JobSpec, overwrite: bool = False, resume: bool = False) -> Preflight:
    """Run every check that needs no MPI and no model; raise SpmdinferError on the first problem.

    An existing output (or a stopped run's parts) is not a problem of the job: the checks go
    on, and the result says what `run` with these flags would do with it."""
    reader = open_checked(spec, overwrite=True)
    try:
        batch = spec.input.batch_size
        pre, _ = load_hooks(spec)
        fields = reader.fields if pre is None else preprocessed_fields(pre, reader, batch)
        slices, undeclared = check_declared(spec, fields)
        output, refusal = output_outcome(spec.output.file, overwrite, resume)
        return Preflight(spec.model.ranks, reader.rows, -(-reader.rows // batch), fields,
                         output, refusal, slices, tuple(undeclared))
    finally:
        reader.close()


def check_declared(spec: JobSpec, fields: list) -> tuple[str, list[int]]:
    """Bind every model rank's graphs to what its stage receives, as `run` does at load, from
    what the slice files declare (their signatures: no model is loaded): dtypes and row
    shapes of the datasets, the number of outputs, and each combine against the rank of the
    output it combines. Raise the error `run` would; return what was found, and the model
    ranks whose last graph declares no outputs."""
    from .inspect import declared
    from .program import Program, check_output_count

    model = spec.model
    undeclared = []
    for rank in range(model.ranks):
        paths = model.graph_paths(rank)
        sessions = [_Declared(*declared(path)) for path in paths]
        stage = rank // model.ranks_per_stage
        inputs = fields if stage == 0 else ([] if model.handoff == "graph" else None)
        last = stage == model.stages - 1
        program = Program(sessions, paths, spec.steps, inputs, spec.output.sources if last else ())
        if last:
            outputs = program.outputs()
            check_output_count(outputs, spec.output_names, paths[-1])
            if not outputs:
                undeclared.append(rank)
            for name, combine, tensor in zip(spec.output_names, spec.output.combine, outputs):
                check_combine(name, combine, tensor, paths[-1])
    if not undeclared:
        return f"the declared inputs and outputs of all {model.ranks} model rank(s) fit", []
    return (f"the declared inputs of all {model.ranks} model rank(s) fit; model rank(s) "
            f"{', '.join(map(str, undeclared))} declare no outputs (MindIR tuple outputs), so "
            "their outputs are not checked here (--deep learns them)"), undeclared


def learn_outputs(spec: JobSpec, fields: list, ranks: Sequence[int]) -> str:
    """For --deep: the outputs of the slices that do not declare them, learned from one
    predict of one zero row on CPU (MindSpore, one slice at a time), then checked as
    declared ones are. A slice that communicates inside its graph cannot run alone, and a
    later stage's inputs are another stage's outputs: those are left to the run."""
    from .backends import Placement, TensorInfo, open_session
    from .cluster import slice_collectives
    from .program import Program, check_output_count

    model, learned, left, failed = spec.model, [], [], []
    for rank in ranks:
        paths = model.graph_paths(rank)
        if model.stages > 1 or any(slice_collectives(spec, rank).values()):
            left.append(rank)
            continue
        try:
            sessions = [open_session("mindspore", path, Placement("cpu", None, rank, 1), {})
                        for path in paths]
            program = Program(sessions, paths, spec.steps, fields, spec.output.sources)
            arrays = program.predict([np.zeros((1,) + f.row_shape, np.dtype(f.dtype))
                                      for f in fields])
        except Exception as exc:  # an op this CPU build lacks, a graph that needs more rows
            failed.append(f"{rank} ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})")
            continue
        outputs = [TensorInfo(f"output{i}", (None,) + a.shape[1:], a.dtype)
                   for i, a in enumerate(arrays)]
        check_output_count(outputs, spec.output_names, paths[-1])
        for name, combine, tensor in zip(spec.output_names, spec.output.combine, outputs):
            check_combine(name, combine, tensor, paths[-1])
        learned.append(f"{rank}: " + ", ".join(str(o) for o in outputs))
    found = []
    if learned:
        found.append("outputs learned from a one-row predict on CPU, and they fit: model rank "
                     + "; ".join(learned))
    if left:
        found.append(f"model rank(s) {', '.join(map(str, left))}: outputs not declared, and the "
                     "graph cannot run alone (collectives, or a later stage): checked at run")
    if failed:
        found.append(f"model rank(s) {', '.join(failed)}: a one-row predict on CPU failed, so "
                     "their outputs are checked at run")
    return "; ".join(found)


def check_combine(name: str, combine, tensor, path: Path) -> None:
    """A concat must name an axis other than the rows that the declared output has."""
    if combine.mode != "concat" or tensor.shape is None:
        return
    ndim, axis = len(tensor.shape), combine.axis
    if not -ndim <= axis < ndim or axis % ndim == 0:
        raise BackendError(f"[output.combine] {name} = \"{combine}\": slice {path} declares "
                           f"output {tensor}, with {ndim} dimension(s) (axis 0 is the rows); "
                           f"concat takes an axis from 1 to {ndim - 1} or -{ndim - 1} to -1")


def output_outcome(output: Path, overwrite: bool, resume: bool) -> tuple[str, str | None]:
    """What `run` with these flags does with `output` (as its preflight and journal decide):
    a line saying so, and the one-line refusal when it would not start (else None)."""
    parts = parts_folder(output)
    stopped, complete = parts.exists(), output.is_file()
    if overwrite:
        if complete and not stopped:
            return f"{output} exists: `run --overwrite` replaces it once the new one is complete", None
        if stopped:
            there = " and ".join(str(p) for p, here in ((output, complete), (parts, stopped)) if here)
            return f"{there} exist(s): `run --overwrite` starts again", None
        return f"{output} will be written", None
    if complete:
        if resume and not stopped:
            return f"{output} exists and is complete: `run --resume` has nothing to do", None
        beside = f" (a partial run's {parts} is beside it)" if stopped else \
            " (with --resume, a complete output means nothing to do)"
        return (f"{output} exists: `run` refuses it",
                f"[output] file {output} exists; pass --overwrite to replace it{beside}")
    if stopped:
        if resume:
            return (f"a partial run left {parts}: `run --resume` continues it (once it has "
                    "checked that the job, the slices and the input are the ones that made it)"), None
        return (f"a partial run left {parts}: `run` refuses it",
                f"[output] file {output}: a partial run left {parts}; pass --resume to continue "
                "it or --overwrite to start again")
    return f"{output} will be written", None


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
                  overwrite: bool = False, resume: bool = False) -> tuple[Preflight, list[str]]:
    """Everything `validate` checks, plus the layout for a world size, the sha256 manifest,
    devices per node, the MPI library against the launcher, and every stage-0 slice's declared
    inputs against the datasets (read one slice at a time). Returns validate's Preflight and
    what was checked."""
    from .plan import plan, shared_devices

    preflight = validate(spec, overwrite, resume)
    lines = [f"files and datasets: {preflight}"]
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
    lines.append(f"slices: {preflight.slices}")
    if preflight.undeclared:
        lines.append(f"outputs: {learn_outputs(spec, preflight.inputs, preflight.undeclared)}")
    from .backends import resolve
    from .cluster import plan_cluster, slice_collectives

    found = {rank: slice_collectives(spec, rank) for rank in range(model.ranks)}
    cluster = plan_cluster(spec, resolve(model.backend, model.slice_path(0)), found)
    lines.append(f"collectives: {cluster}" if cluster else
                 "collectives: none inside the graphs (independent slices, combined on the host)")
    return preflight, lines


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
