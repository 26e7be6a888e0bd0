"""Checks that need neither MPI nor a loaded model: the preflight of `run` and `validate`."""

from __future__ import annotations

from dataclasses import dataclass

from .data import InputReader, check_output_path
from .errors import BackendError
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
