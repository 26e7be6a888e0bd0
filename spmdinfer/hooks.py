"""Python next to the model: a job's preprocess and postprocess functions.

`[input] preprocess = "module:function"` runs on each stage-0 leader, on every batch it
reads, before the batch is shared with its group; `[output] postprocess` runs on rank 0,
on every finished batch, before it is committed and written. Each takes a batch's named
arrays (a dict of name -> numpy array, one row per input row) and returns named arrays
with the same number of rows. The module is imported from the job file's folder first,
then from the environment (sys.path).

What a batch of the first call returns (names, dtypes, row shapes) is what every later
batch must return: the model's inputs are bound to it once, and the output's datasets are
made from it. A function that raises ends the job with its name and the batch's rows.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .errors import HookError, SpecError
from .input import InputField


class Hook:
    """One imported function and what its first batch returned."""

    def __init__(self, key: str, name: str, function: Callable):
        self.key = key            # "[input] preprocess" or "[output] postprocess"
        self.name = name          # module:function, as the job gives it
        self.function = function
        self.schema: list[tuple[str, np.dtype, tuple[int, ...]]] | None = None

    @classmethod
    def load(cls, key: str, name: str, folder: Path) -> Hook:
        """Import `name` (module:function) from `folder` (the job's) or the environment."""
        module_name, _, function_name = name.partition(":")
        where = str(folder)
        added = where not in sys.path
        if added:
            sys.path.insert(0, where)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise SpecError(f"{key} {name}: cannot import {module_name} from {folder} or the "
                            f"environment ({exc})") from None
        except Exception as exc:  # the module's own code failed while it was imported
            raise SpecError(f"{key} {name}: importing {module_name} raised "
                            f"{type(exc).__name__}: {exc}") from None
        finally:
            if added:
                sys.path.remove(where)
        function = getattr(module, function_name, None)
        if not callable(function):
            found = "not a function" if function is not None else "not defined"
            raise SpecError(f"{key} {name}: {function_name} is {found} in {module.__file__}")
        try:
            inspect.signature(function).bind({})
        except TypeError:
            raise SpecError(f"{key} {name}: must take one argument (a batch's named arrays), "
                            f"its signature is {inspect.signature(function)}") from None
        except ValueError:
            pass  # no signature to read (a builtin): the first batch will tell
        return cls(key, name, function)

    def __call__(self, arrays: Mapping[str, np.ndarray], start: int, rows: int
                 ) -> dict[str, np.ndarray]:
        """The function on one batch from row `start` (`rows` valid rows: a job with no rows
        gives a preprocess one zero row), its result checked: one row per row it was given."""
        length = len(next(iter(arrays.values()))) if arrays else 0
        where = f"{self.key} {self.name} on rows {start}..{start + max(rows, 1) - 1}"
        try:
            result = self.function(dict(arrays))
        except Exception as exc:
            raise HookError(f"{where} raised {type(exc).__name__}: {exc}") from None
        return self._checked(result, length, where)

    def _checked(self, result, rows: int, where: str) -> dict[str, np.ndarray]:
        if not isinstance(result, Mapping) or not result or \
                not all(isinstance(k, str) for k in result):
            raise HookError(f"{where} returned {type(result).__name__}; expected a dict of "
                            "name -> array")
        checked = {}
        for name, value in result.items():
            array = np.asarray(value)
            if array.dtype.kind not in "biufc" or array.ndim == 0:
                raise HookError(f"{where} returned {name} as {array.dtype} of shape "
                                f"{array.shape}; expected numbers with one row per input row")
            if len(array) != rows:
                raise HookError(f"{where} returned {len(array)} rows of {name}; expected "
                                f"{rows}, one per row it was given")
            checked[name] = array
        schema = [(n, a.dtype.newbyteorder("="), a.shape[1:]) for n, a in checked.items()]
        if self.schema is None:
            self.schema = schema
        elif schema != self.schema:
            raise HookError(f"{where} returned {describe(schema)}; the first batch returned "
                            f"{describe(self.schema)}")
        return checked


def describe(schema) -> str:
    return ", ".join(f"{name} {np.dtype(dtype)} ({', '.join(['rows', *map(str, shape)])})"
                     for name, dtype, shape in schema)


def load_hooks(spec) -> tuple[Hook | None, Hook | None]:
    """The job's preprocess and postprocess functions, imported (None where it has none)."""
    folder = spec.path.parent
    pre = Hook.load("[input] preprocess", spec.input.preprocess, folder) \
        if spec.input.preprocess else None
    post = Hook.load("[output] postprocess", spec.output.postprocess, folder) \
        if spec.output.postprocess else None
    return pre, post


def preprocessed_fields(pre: Hook, reader, batch_size: int) -> list[InputField]:
    """What the model gets: `pre` on the input's first batch (one zero row for an input with
    no rows, as the model then predicts), its names, dtypes and row shapes."""
    rows = min(batch_size, reader.rows)
    buffers = [f.buffer(max(rows, 1)) for f in reader.fields]
    for buffer in buffers:
        buffer[:1] = 0
    reader.read(0, rows, buffers)
    pre({f.name: b for f, b in zip(reader.fields, buffers)}, 0, rows)
    return fields_of(pre)


def fields_of(pre: Hook) -> list[InputField]:
    return [InputField(name, name, dtype.str, shape, made_by=pre.name)
            for name, dtype, shape in pre.schema]


def schema_of(fields: list[InputField]) -> list:
    """The schema a preprocess gave, back from its fields (another leader's `Hook.schema`)."""
    return [(f.name, np.dtype(f.dtype), f.row_shape) for f in fields]


def preprocess_into(pre: Hook, fields: list[InputField], raw: list[InputField], start: int,
                    rows: int, read: list[np.ndarray], buffers: list[np.ndarray]) -> None:
    """`pre` on a batch read into `read` (the input's fields `raw`), its arrays copied into
    `buffers` (the model's `fields`)."""
    valid = max(rows, 1)
    result = pre({f.name: b[:valid] for f, b in zip(raw, read)}, start, rows)
    for field, buffer in zip(fields, buffers):
        buffer[:valid] = result[field.name]
