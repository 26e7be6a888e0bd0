"""Combining one stage's outputs across its ranks on the stage's first rank: "rank0" takes
rank 0's, "concat:AXIS" joins every rank's in rank order, "sum" adds them elementwise.

On the first batch every rank gathers every rank's output layouts and reaches the same
verdict, so a layout that cannot be combined fails on all ranks at once instead of
hanging a collective. Later batches must keep those layouts (dtype and row shape); each
rank checks its own, and a rank whose outputs change fails with a message (its failure
notice stops the others), so no batch after the first pays for a layout exchange.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .comm import Channel
from .errors import BackendError
from .spec import Combine


class Combiner:
    """Combines one group's outputs batch after batch, on the group's root.

    `shared`: the group's shared.SharedBatches, or None. With it, every batch ends with
    `shared.settle` (the root's input slot is free again), and after the first batch the
    outputs travel through the ranks' shared segments instead of messages.
    """

    def __init__(self, group: Channel, modes: Sequence[Combine], names: Sequence[str],
                 shared=None):
        self.group = group
        self.modes = list(modes)
        self.names = list(names)
        self.shared = shared
        self.exchanges = any(m.mode != "rank0" for m in self.modes)
        self.layouts: list[list[tuple[np.dtype, tuple]]] | None = None  # per rank, per output

    def combine(self, outputs: Sequence[np.ndarray], rows: int,
                sequence: int = 0) -> list[np.ndarray | None]:
        """Combine each output across the group on its root (None elsewhere); `sequence`:
        the batch's number in `shared` (the root may have posted the next one already)."""
        outputs = [np.asarray(o) for o in outputs]
        if len(outputs) != len(self.names):
            raise BackendError(f"the slice returned {len(outputs)} outputs, [output.datasets] "
                               f"names {len(self.names)}")
        if self.layouts is None:
            self.layouts = self._agreed(outputs)
            self._check_all(outputs, rows)
            results = self._by_messages(outputs, rows)
            if self.shared is not None:
                if self.exchanges:
                    self.shared.open_outputs(self.layouts)
                self.shared.settle(None, rows, sequence)
            return results
        self._check_own(outputs, rows)
        if self.shared is not None and self.shared.has_outputs:
            parts = self.shared.settle(outputs, rows, sequence)
            return self._from_parts(outputs, parts) if self.group.is_root else [None] * len(outputs)
        results = self._by_messages(outputs, rows)
        if self.shared is not None:
            self.shared.settle(None, rows, sequence)
        return results

    def _agreed(self, outputs) -> list[list[tuple[np.dtype, tuple]]]:
        """Every rank's (dtype, shape) per output; gathered only when outputs are exchanged."""
        if not self.exchanges:
            return [[(o.dtype, o.shape) for o in outputs]] * self.group.size
        return self.group.allgather_layouts(outputs)

    def _check_all(self, outputs: Sequence[np.ndarray], rows: int) -> None:
        """The first batch: every rank checks every rank's layouts and reaches one verdict."""
        for k, (output, mode, name) in enumerate(zip(outputs, self.modes, self.names)):
            if mode.mode == "rank0":
                check_rows(name, 0, output.shape, rows)
            else:
                check_layout(name, mode, [layout[k][1] for layout in self.layouts],
                             [layout[k][0] for layout in self.layouts], rows)

    def _check_own(self, outputs: Sequence[np.ndarray], rows: int) -> None:
        for output, (dtype, shape), name in zip(outputs, self.layouts[self.group.rank], self.names):
            if output.dtype != dtype or output.shape[1:] != tuple(shape[1:]) or \
                    not output.shape or output.shape[0] != rows:
                raise BackendError(
                    f"output {name}: rank {self.group.rank} returned {output.dtype} "
                    f"{tuple(output.shape)} for a batch of {rows} rows, after "
                    f"{np.dtype(dtype)} (rows, {', '.join(map(str, shape[1:]))}) on the first "
                    "batch; outputs must keep their dtype and row shape")

    def _by_messages(self, outputs, rows: int) -> list[np.ndarray | None]:
        results = []
        for k, (output, mode) in enumerate(zip(outputs, self.modes)):
            if mode.mode == "rank0":
                results.append(output)
                continue
            shapes = [(rows,) + tuple(layout[k][1][1:]) for layout in self.layouts]
            parts = self.group.gather(output, shapes)
            results.append(None if parts is None else joined(mode, parts))
        return results

    def _from_parts(self, outputs, parts) -> list[np.ndarray]:
        """The root's combine from every rank's shared segment (its own outputs at hand)."""
        return [output if mode.mode == "rank0" else joined(mode, [output] + [p[k] for p in parts[1:]])
                for k, (output, mode) in enumerate(zip(outputs, self.modes))]


def joined(combine: Combine, parts: Sequence[np.ndarray]) -> np.ndarray:
    """Every rank's part (rank order) of one output, combined. A sum adds them one by one in
    rank order, never as MPI's reduction trees do (their order follows the ranks' placement
    on nodes): so the same job gives the same bits on one node or many, by message or
    through shared memory."""
    if combine.mode == "concat":
        return np.concatenate(parts, axis=combine.axis)
    first = parts[0]
    total = first if first.flags.writeable and first.flags.owndata else first.copy()
    for part in parts[1:]:
        total += part
    return total


def check_rows(name: str, rank: int, shape: tuple, rows: int) -> None:
    if not shape or shape[0] != rows:
        raise BackendError(f"output {name}: rank {rank} returned shape {tuple(shape)} for a batch "
                           f"of {rows} rows; outputs must keep the batch's rows on axis 0")


def check_layout(name: str, combine: Combine, shapes: list[tuple], dtypes: list[np.dtype],
                 rows: int) -> None:
    """Check that every rank's output `name` can be combined; every rank reaches the same verdict."""
    for rank, shape in enumerate(shapes):
        check_rows(name, rank, shape, rows)
    if len(set(dtypes)) > 1:
        raise BackendError(f"output {name}: ranks returned different dtypes "
                           f"({', '.join(sorted({str(d) for d in dtypes}))}), cannot {combine}")
    if combine.mode == "sum" and len(set(shapes)) > 1:
        raise BackendError(f"output {name}: ranks returned shapes {shapes}; sum needs equal shapes")
    if combine.mode == "concat":
        ndim = len(shapes[0])
        axis = combine.axis
        if not -ndim <= axis < ndim or axis % ndim == 0:
            raise BackendError(f"output {name}: {combine} does not fit output shape {shapes[0]}")
        rest = {s[:axis % ndim] + s[axis % ndim + 1:] for s in shapes}
        if len(rest) > 1 or len({len(s) for s in shapes}) > 1:
            raise BackendError(f"output {name}: ranks returned shapes {shapes}, which {combine} "
                               "cannot join")
