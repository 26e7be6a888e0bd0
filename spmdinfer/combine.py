"""Combining one stage's outputs across its ranks on the stage's first rank: "rank0" takes
rank 0's, "concat:AXIS" joins every rank's in rank order, "sum" adds them elementwise.

Every rank gathers every rank's output layouts first and reaches the same verdict, so a
layout that cannot be combined fails on all ranks at once instead of hanging a collective.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .comm import Channel
from .errors import BackendError
from .spec import Combine


def combine_outputs(group: Channel, outputs: Sequence[np.ndarray], modes: Sequence[Combine],
                    names: Sequence[str], rows: int) -> list[np.ndarray | None]:
    """Combine each output across the group on its root (None elsewhere)."""
    outputs = [np.asarray(o) for o in outputs]
    if len(outputs) != len(names):
        raise BackendError(f"the slice returned {len(outputs)} outputs, [output.datasets] names "
                           f"{len(names)}")
    layouts = group.allgather_layouts(outputs) if any(m.mode != "rank0" for m in modes) else None
    results = []
    for k, (output, mode, name) in enumerate(zip(outputs, modes, names)):
        if mode.mode == "rank0":
            check_rows(name, 0, output.shape, rows)
            results.append(output)
            continue
        shapes = [layout[k][1] for layout in layouts]
        check_layout(name, mode, shapes, [layout[k][0] for layout in layouts], rows)
        if mode.mode == "concat":
            results.append(group.gather_concat(output, shapes, mode.axis))
        else:
            results.append(group.reduce_sum(output))
    return results


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
