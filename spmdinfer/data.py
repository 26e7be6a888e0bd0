"""HDF5 input and output on rank 0: checked input datasets read by row slices, and an
output file written under a temporary name and renamed only when complete."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError, OutputExistsError
from .spec import InputSpec, OutputSpec

INPUT_CHUNK_CACHE = 64 * 1024 * 1024   # bytes of HDF5 chunk cache per input dataset
MAX_CHUNK_BYTES = 4 * 1024 * 1024      # output chunks: one batch of rows, capped at this size
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class InputField:
    """One input dataset as every rank needs to know it: name, path, dtype, row shape."""

    name: str
    path: str
    dtype: str
    row_shape: tuple[int, ...]

    def buffer(self, rows: int) -> np.ndarray:
        return np.empty((rows,) + self.row_shape, dtype=np.dtype(self.dtype))

    def describe(self) -> str:
        return f"dataset {self.path} {np.dtype(self.dtype)} (rows, {', '.join(map(str, self.row_shape))})"


class InputReader:
    """The job's input file, opened on rank 0, with every dataset checked before use."""

    def __init__(self, spec: InputSpec):
        import h5py

        self.file_path = spec.file
        if not spec.file.is_file():
            raise DataError(f"[input] file {spec.file}: no such file")
        try:
            self._file = h5py.File(spec.file, "r", rdcc_nbytes=INPUT_CHUNK_CACHE)
        except OSError as exc:
            raise DataError(f"[input] file {spec.file}: not a readable HDF5 file ({exc})") from None
        try:
            self._datasets = [self._dataset(name, path) for name, path in spec.datasets]
            self.fields = [InputField(name, path, ds.dtype.str, tuple(ds.shape[1:]))
                           for (name, path), ds in zip(spec.datasets, self._datasets)]
            counts = {f.path: ds.shape[0] for f, ds in zip(self.fields, self._datasets)}
            if len(set(counts.values())) > 1:
                shown = ", ".join(f"{p} has {n}" for p, n in counts.items())
                raise DataError(f"[input.datasets] in {spec.file} must all have the same number of "
                                f"rows (axis 0): {shown}")
            self.rows = next(iter(counts.values()))
        except BaseException:
            self._file.close()
            raise

    def _dataset(self, name: str, path: str):
        import h5py

        where = f"[input.datasets] {name}: dataset {path} in {self.file_path}"
        obj = self._file.get(path)
        if obj is None:
            raise DataError(f"{where}: no such dataset")
        if not isinstance(obj, h5py.Dataset):
            raise DataError(f"{where}: is a {type(obj).__name__.lower()}, expected a dataset")
        if obj.ndim == 0:
            raise DataError(f"{where}: is a scalar, expected rows along axis 0")
        if obj.dtype.kind not in "biufc":
            raise DataError(f"{where}: has dtype {obj.dtype}, expected a numeric dtype")
        return obj

    def read(self, start: int, stop: int, buffers: Sequence[np.ndarray]) -> None:
        """Read rows [start, stop) of every dataset into the front of `buffers`."""
        for dataset, buffer in zip(self._datasets, buffers):
            if stop > start:
                dataset.read_direct(buffer, np.s_[start:stop], np.s_[0:stop - start])

    def close(self) -> None:
        self._file.close()


def check_output_path(spec: OutputSpec, overwrite: bool) -> None:
    """Refuse an output that exists (unless `overwrite`) or that cannot be a file."""
    path = spec.file
    if path.is_dir():
        raise DataError(f"[output] file {path} is a directory, expected a file path")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"[output] file {path} exists; pass --overwrite to replace it")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"[output] file {path}: cannot create it, {parent} is not a writable folder")


class OutputWriter:
    """Rank 0's output: written to FILE.partial, renamed to FILE by `finish`."""

    def __init__(self, spec: OutputSpec, rows: int, batch_size: int):
        import h5py

        self.path = spec.file
        self.temp_path = spec.file.with_name(spec.file.name + PARTIAL_SUFFIX)
        self._spec = spec
        self._rows = rows
        self._batch_size = batch_size
        self._made_dirs = [p for p in reversed(spec.file.parents) if not p.exists()]
        spec.file.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self.temp_path, "w")
        self._datasets = None

    def write(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        """Write one batch's combined outputs at rows [start, start + len)."""
        if self._datasets is None:
            self._datasets = [self._create(path, a) for (_, path), a in
                              zip(self._spec.datasets, arrays)]
        for dataset, array in zip(self._datasets, arrays):
            if len(array):
                dataset[start:start + len(array)] = array

    def _create(self, path: str, sample: np.ndarray):
        row_shape = sample.shape[1:]
        row_bytes = max(1, int(np.prod(row_shape)) * sample.itemsize)
        chunk_rows = max(1, min(self._batch_size, self._rows, MAX_CHUNK_BYTES // row_bytes))
        return self._file.create_dataset(path, shape=(self._rows,) + row_shape, dtype=sample.dtype,
                                         chunks=(chunk_rows,) + row_shape if self._rows else None)

    def finish(self, attrs: dict) -> None:
        """Record provenance, close, and move the file to its final name."""
        for key, value in attrs.items():
            self._file.attrs[key] = value
        self._file.close()
        os.replace(self.temp_path, self.path)

    def discard(self) -> None:
        """Close and remove everything this writer created."""
        try:
            self._file.close()
        finally:
            self.temp_path.unlink(missing_ok=True)
            for folder in reversed(self._made_dirs):
                try:
                    folder.rmdir()
                except OSError:
                    break
