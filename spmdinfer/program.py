"""What one rank runs for every batch: its graphs, in the order of the job's [[steps]].

A job with one graph and no [[steps]] is a program of one step. Each step's
inputs are bound once, at start-up: an input named in the step's `feed` takes
the named output of the step before (or of the same graph's previous repeat);
the others come from the batch, by name where the job names exactly the
graph's inputs, else by position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .backends import Session, TensorInfo
from .data import InputField
from .errors import BackendError, DataError
from .spec import Step

# Where a graph input comes from: ("batch", index into the batch) or ("output", output name).
Source = tuple[str, object]


class Program:
    """The graphs of one slice and the steps that run them (implements predict)."""

    def __init__(self, sessions: Sequence[Session], paths: Sequence[Path], steps: Sequence[Step],
                 batch: Sequence[InputField] | None):
        """`batch`: the fields the batch carries, or None when they are unnamed outputs of a
        previous stage (then bound by position, unchecked)."""
        self.sessions = list(sessions)
        self.paths = list(paths)
        self.steps = list(steps) or [Step(graph=0)]
        self.version = sessions[0].version
        self._plan = [self._bind(step, batch) for step in self.steps]

    def outputs(self) -> list[TensorInfo]:
        """What the last step's graph declares."""
        return self.sessions[self.steps[-1].graph].outputs()

    def predict(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run every step on one batch and return the last step's outputs."""
        named: dict[str, np.ndarray] = {}
        outputs: list[np.ndarray] = []
        for step, sources in zip(self.steps, self._plan):
            session = self.sessions[step.graph]
            for _ in range(step.repeat):
                arrays = [batch[ref] if kind == "batch" else self._fed(named, ref, step)
                          for kind, ref in sources]
                outputs = session.predict(arrays)
                names = [o.name for o in session.outputs()]
                named = {f"output{i}": a for i, a in enumerate(outputs)}
                if len(names) == len(outputs):
                    named.update(zip(names, outputs))
        return outputs

    def _fed(self, named: dict, name: str, step: Step) -> np.ndarray:
        if name not in named:
            known = ", ".join(named) or "none yet"
            raise BackendError(f"[[steps]] graph {step.graph}: feed takes output {name!r}, but the "
                               f"step before gave {known}")
        return named[name]

    def _bind(self, step: Step, batch: Sequence[InputField] | None) -> list[Source]:
        """Where each input of the step's graph comes from, in the graph's input order."""
        path = self.paths[step.graph]
        declared = self.sessions[step.graph].inputs()
        feed = dict(step.feed)
        if not declared:  # the slice does not say: the whole batch, in order
            if feed:
                raise BackendError(f"[[steps]] graph {step.graph}: feed needs input names, and "
                                   f"{path} does not declare them")
            return [("batch", i) for i in range(len(batch or ()))]
        unknown = [name for name in feed if name not in {d.name for d in declared}]
        if unknown:
            raise BackendError(f"[[steps]] graph {step.graph}: feed names input {unknown[0]!r}, but "
                               f"{path} has inputs {', '.join(d.name for d in declared)}")
        order = iter(bind_inputs([d for d in declared if d.name not in feed], batch, path))
        return [("output", feed[d.name]) if d.name in feed else ("batch", next(order))
                for d in declared]


def bind_inputs(declared: list[TensorInfo], fields: Sequence[InputField] | None,
                path: Path) -> list[int]:
    """For each declared input in order, the index of the batch array that feeds it.

    Names match when the job names exactly these inputs; otherwise positional.
    Dtypes and row shapes must fit where the slice declares them: casting is never silent.
    With `fields` None (the unnamed outputs of a previous stage), position decides.
    """
    if fields is None:
        return list(range(len(declared)))
    names = [f.name for f in fields]
    if not declared:
        return list(range(len(fields)))
    if len(declared) != len(fields):
        raise BackendError(f"[input.datasets] names {len(fields)} input(s) ({', '.join(names)}) but "
                           f"slice {path} takes {len(declared)} from the batch: "
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
