"""What one rank runs for every batch: its graphs, in the order of the job's [[steps]].

A job with one graph and no [[steps]] is a program of one step. Each step's
inputs are bound once, at start-up: an input named in the step's `feed` takes
the named output of the step before (or of the same graph's previous repeat);
one named in its `inputs` takes a field of the batch by name, or an earlier
step's output ("STEP.OUTPUT"); the others come from the batch, by name where
the job names exactly the graph's inputs, else by position. The program returns
the last step's outputs, or those `[output.from]` names, from any steps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .backends import Session, TensorInfo
from .input import InputField
from .errors import BackendError, DataError
from .spec import Step, step_reference

# Where a graph input comes from: ("batch", index into the batch), ("output", an output name
# of the step before) or ("step", (index of an earlier step, its output name)).
Source = tuple[str, object]


class Program:
    """The graphs of one slice and the steps that run them (implements predict)."""

    def __init__(self, sessions: Sequence[Session], paths: Sequence[Path], steps: Sequence[Step],
                 batch: Sequence[InputField] | None, sources: Sequence[tuple[str, str]] = ()):
        """`batch`: the fields the batch carries, or None when they are unnamed outputs of a
        previous stage (then bound by position, unchecked). `sources`: (output name,
        "STEP.OUTPUT") for each output the program returns (`[output.from]`); empty: the last
        step's outputs."""
        self.sessions = list(sessions)
        self.paths = list(paths)
        self.steps = list(steps) or [Step(graph=0, name="step1")]
        self.version = sessions[0].version
        self.notes: list[str] = []  # inputs bound by position although the job names them
        self._index = {step.name: i for i, step in enumerate(self.steps)}
        self._plan = [self._bind(step, batch) for step in self.steps]
        for index, step in enumerate(self.steps):
            if step.until is not None:
                self._check_until(index)
        self._returns = [(f"[output.from] {name}", *self._reference(source, f"[output.from] {name}"))
                         for name, source in sources]

    def outputs(self) -> list[TensorInfo]:
        """What the graphs declare of the outputs the program returns (empty: not declared)."""
        if not self._returns:
            last = len(self.steps) - 1
            declared = self.sessions[self.steps[last].graph].outputs()
            return [self._declared_output(last, f"output{i}") for i in range(len(declared))]
        found = [self._declared_output(index, output) for _, index, output in self._returns]
        return [] if None in found else found

    def predict(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run every step on one batch and return the program's outputs."""
        named: dict[str, np.ndarray] = {}
        made: list[dict[str, np.ndarray]] = []   # each step's outputs, by name
        outputs: list[np.ndarray] = []
        for step, sources in zip(self.steps, self._plan):
            session = self.sessions[step.graph]
            repeats: list[dict[str, np.ndarray]] = []
            lengths = None   # with `until`: each row's repeats up to its stop value
            for repeat in range(step.repeat):
                arrays = [self._source(kind, ref, batch, named, made, step) for kind, ref in sources]
                outputs = session.predict(arrays)
                names = [o.name for o in session.outputs()]
                named = {f"output{i}": a for i, a in enumerate(outputs)}
                if len(names) == len(outputs):
                    named.update(zip(names, outputs))
                if step.collect:
                    repeats.append(named)
                if step.until is not None:
                    lengths = self._stop(step, named, lengths, repeat)
                    if (lengths <= repeat + 1).all():
                        break
            made.append(self._results(step, named, repeats, lengths))
        if not self._returns:  # the last step's, by position
            return [made[-1][f"output{i}"] for i in range(len(outputs))]
        return [self._made(made, index, output, where) for where, index, output in self._returns]

    def _stop(self, step: Step, named: dict, lengths, repeat: int) -> np.ndarray:
        """Each row's length so far: the first repeat (counted from 1) whose `until.output`
        holds `until.equals`, or the step's repeat count while it has not."""
        until = step.until
        if until.output not in named:
            raise BackendError(f"[[steps]] {step.name} until output {until.output!r}: graph "
                               f"{step.graph} gave {', '.join(named)}")
        value = named[until.output]
        hit = (value.reshape(len(value), -1) == until.equals).any(axis=1)
        if lengths is None:
            lengths = np.full(len(value), step.repeat, np.int32)
        lengths[hit & (lengths > repeat + 1)] = repeat + 1
        return lengths

    @staticmethod
    def _results(step: Step, named: dict, repeats: list, lengths) -> dict[str, np.ndarray]:
        """What later steps and [output.from] get of a step: its last repeat's outputs, or,
        collected, every repeat's stacked along axis 1 and padded to `repeat` after each
        row's length; and with `until`, "length"."""
        results = dict(named)
        if step.collect:
            for name in named:
                stacked = np.stack([r[name] for r in repeats], axis=1)
                pad = step.until.pad(name) if step.until is not None else 0
                full = np.full((stacked.shape[0], step.repeat) + stacked.shape[2:], pad,
                               stacked.dtype)
                full[:, :stacked.shape[1]] = stacked
                if lengths is not None:
                    full[np.arange(step.repeat)[None, :] >= lengths[:, None]] = pad
                results[name] = full
        if lengths is not None:
            results.setdefault("length", lengths)
        return results

    def _source(self, kind: str, ref, batch, named: dict, made: list, step: Step) -> np.ndarray:
        if kind == "batch":
            return batch[ref]
        if kind == "output":
            return self._fed(named, ref, step)
        index, output = ref
        return self._made(made, index, output, f"[[steps]] {step.name} inputs")

    def _made(self, made: list, index: int, output: str, where: str) -> np.ndarray:
        if output not in made[index]:
            raise BackendError(f"{where} takes {self.steps[index].name}.{output}, but that step "
                               f"gave {', '.join(made[index])}")
        return made[index][output]

    def _reference(self, source: str, where: str) -> tuple[int, str]:
        """(step index, output name) of "STEP.OUTPUT", checked against what the graph declares."""
        step, output = step_reference(source)
        index = self._index[step]  # the job's parser checked the step's name and order
        if self._declared_output(index, output) is None and \
                self.sessions[self.steps[index].graph].outputs():
            graph = self.steps[index].graph
            outputs = self._output_names(index)
            raise BackendError(f'{where} = "{source}": graph {graph} ({self.paths[graph]}) has '
                               f"no output {output!r}; its outputs: {', '.join(outputs)}")
        return index, output

    def _output_names(self, index: int, length: bool = True) -> list[str]:
        """The names a step's outputs go by (and its "length", with `until`, unless not asked)."""
        declared = self.sessions[self.steps[index].graph].outputs()
        names = [f"output{i}" for i in range(len(declared))] + [d.name for d in declared]
        if length and self.steps[index].until is not None:
            names.append("length")
        return list(dict.fromkeys(names))

    def _declared_output(self, index: int, output: str) -> TensorInfo | None:
        """What the graph declares of a step's output (None if it does not), as the step
        gives it: stacked along axis 1 when collected; "length" for a step with `until`."""
        step = self.steps[index]
        declared = self.sessions[step.graph].outputs()
        for i, tensor in enumerate(declared):
            if output in (tensor.name, f"output{i}"):
                if not step.collect:
                    return tensor
                shape = None if tensor.shape is None else \
                    (tensor.shape[0], step.repeat) + tuple(tensor.shape[1:])
                return TensorInfo(tensor.name, shape, tensor.dtype)
        if output == "length" and step.until is not None and declared:
            return TensorInfo("length", (None,), np.dtype(np.int32))
        return None

    def _check_until(self, index: int) -> None:
        """A stop condition must name an output the step's graph declares (when it declares)."""
        step = self.steps[index]
        names = self._output_names(index, length=False)
        if self.sessions[step.graph].outputs() and step.until.output not in names:
            raise BackendError(f"[[steps]] {step.name} until output {step.until.output!r}: graph "
                               f"{step.graph} ({self.paths[step.graph]}) has no such output; its "
                               f"outputs: {', '.join(names)}")

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
        feed, chosen = dict(step.feed), dict(step.inputs)
        if not declared:  # the slice does not say: the whole batch, in order
            if feed or chosen:
                key = "feed" if feed else "inputs"
                raise BackendError(f"[[steps]] {step.name} (graph {step.graph}): {key} needs input "
                                   f"names, and {path} does not declare them")
            return [("batch", i) for i in range(len(batch or ()))]
        unknown = [name for name in [*feed, *chosen] if name not in {d.name for d in declared}]
        if unknown:
            key = "feed" if unknown[0] in feed else "inputs"
            raise BackendError(f"[[steps]] {step.name} (graph {step.graph}): {key} names input "
                               f"{unknown[0]!r}, but {path} has inputs "
                               f"{', '.join(d.name for d in declared)}")
        if chosen:
            return [("output", feed[d.name]) if d.name in feed else
                    self._chosen(step, d, chosen.get(d.name), batch, path) for d in declared]
        order = iter(bind_inputs([d for d in declared if d.name not in feed], batch, path,
                                 self.notes))
        return [("output", feed[d.name]) if d.name in feed else ("batch", next(order))
                for d in declared]

    def _chosen(self, step: Step, tensor: TensorInfo, source: str | None,
                batch: Sequence[InputField] | None, path: Path) -> Source:
        """The source a step's `inputs` names for one graph input."""
        where = f"[[steps]] {step.name} inputs {tensor.name}"
        if source is None:
            raise BackendError(f"[[steps]] {step.name} (graph {step.graph}): input {tensor.name!r} "
                               f"of {path} comes from nowhere: name it in inputs (or feed)")
        if step_reference(source) is not None:
            return ("step", self._reference(source, where))
        names = [field.name for field in batch or ()]
        if batch is None or source not in names:
            given = ", ".join(names) if batch is not None else "the unnamed outputs of a stage"
            raise BackendError(f'{where} = "{source}": the batch has no field {source!r}; '
                               f"it has {given or 'none'}")
        index = names.index(source)
        bind_inputs([tensor], [batch[index]], path)  # dtype and row shape must fit
        return ("batch", index)


def bind_inputs(declared: list[TensorInfo], fields: Sequence[InputField] | None,
                path: Path, notes: list[str] | None = None) -> list[int]:
    """For each declared input in order, the index of the batch array that feeds it.

    Names match when the job names exactly these inputs; otherwise positional, and a line
    saying so goes to `notes`. Dtypes and row shapes must fit where the slice declares them:
    casting is never silent. With `fields` None (the unnamed outputs of a previous stage),
    position decides.
    """
    if fields is None:
        return list(range(len(declared)))
    names = [f.name for f in fields]
    if not declared:
        return list(range(len(fields)))
    made_by = fields[0].made_by if fields else ""
    given = f"[input] preprocess {made_by} returns" if made_by else "[input.datasets] names"
    if len(declared) != len(fields):
        raise BackendError(f"{given} {len(fields)} input(s) ({', '.join(names)}) but "
                           f"slice {path} takes {len(declared)} from the batch: "
                           f"{', '.join(str(d) for d in declared)}")
    if sorted(d.name for d in declared) == sorted(names):
        order = [names.index(d.name) for d in declared]
    else:
        order = list(range(len(fields)))
        if notes is not None and any(named(d.name) for d in declared):
            notes.append(f"{given} {', '.join(names)} but slice {path} declares "
                         f"inputs {', '.join(d.name for d in declared)}: bound by position ("
                         + ", ".join(f"{n} -> {d.name}" for n, d in zip(names, declared)) + ")")
    for tensor, index in zip(declared, order):
        field = fields[index]
        dtype_ok = tensor.dtype is None or tensor.dtype == np.dtype(field.dtype)
        shape_ok = tensor.shape is None or (
            len(tensor.shape) == len(field.row_shape) + 1 and
            all(d is None or d == s for d, s in zip(tensor.shape[1:], field.row_shape)))
        if not (dtype_ok and shape_ok):
            where = "[input] preprocess output" if made_by else "[input.datasets]"
            where = f"{where} {field.name}"
            raise DataError(f"{where}: {field.describe()} does not fit model "
                            f"input {tensor} of slice {path} (casting is never silent)")
    return order


def named(name: str) -> bool:
    """Whether a declared input or output name was given by a person: exporters number the
    ones nobody named (MindIR's output0, output1; MindSpore's ONNX export, node numbers)."""
    return not (name.isdigit() or re.fullmatch(r"output\d+", name))


def output_note(declared: list[TensorInfo], names: list[str], path: Path) -> str | None:
    """A line to log when the job's output names differ from the names the slice gives its
    outputs: outputs are always written by position."""
    given = [d.name for d in declared]
    if len(given) != len(names) or given == names or not any(named(n) for n in given):
        return None
    return (f"[output.datasets] names {', '.join(names)} but slice {path} declares outputs "
            f"{', '.join(given)}: written by position ("
            + ", ".join(f"{g} -> {n}" for g, n in zip(given, names)) + ")")


def check_output_count(declared: list[TensorInfo], names: list[str], path: Path) -> None:
    if declared and len(declared) != len(names):
        raise BackendError(f"[output.datasets] names {len(names)} output(s) ({', '.join(names)}) but "
                           f"slice {path} declares {len(declared)}: "
                           f"{', '.join(str(d) for d in declared)}")
