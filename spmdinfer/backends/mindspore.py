"""MindSpore's own runtime: `mindspore.load` + `nn.GraphCell`, the default on CPU."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BackendError
from ..mindir import read_signature
from . import Placement, TensorInfo, predict_in_fixed_batches

_TARGETS = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}
_joined: tuple[str, int | None] | None = None   # (target, device id) of the cluster this process joined


def open_session(path: Path, placement: Placement, options: dict) -> "MindSporeSession":
    return MindSporeSession(path, placement, options)


class MindSporeSession:
    """A MindIR slice compiled by MindSpore for this rank's device."""

    def __init__(self, path: Path, placement: Placement, options: dict):
        if options:
            raise BackendError(f"[backend.mindspore] has no options; got {', '.join(options)}")
        os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ log: errors only unless asked
        import mindspore
        from mindspore import nn

        self._tensor = mindspore.Tensor
        self.version = mindspore.__version__
        device = _TARGETS[placement.target]
        try:
            if _joined is None:  # joining a cluster set the device already, for good
                _set_device(mindspore, device, placement.device_id)
            mindspore.set_context(runtime_num_threads=placement.threads)
        except (RuntimeError, ValueError) as exc:
            where = device if placement.device_id is None else f"{device} device {placement.device_id}"
            raise BackendError(f"MindSpore {self.version} cannot run on {where}: "
                               f"{str(exc).strip().splitlines()[0]}") from None
        self._inputs, self._outputs = read_signature(path)
        first = self._inputs[0].shape if self._inputs and self._inputs[0].shape else None
        # A graph exported for one batch size (a fixed first dimension) runs only that size:
        # a short last batch is padded to it and trimmed, on every rank alike.
        self._fixed_batch = first[0] if first else None
        try:
            self._cell = nn.GraphCell(mindspore.load(str(path)))
        except (RuntimeError, ValueError, OSError) as exc:
            raise BackendError(f"{path}: MindSpore cannot load this MindIR slice: "
                               f"{str(exc).splitlines()[0]}") from None

    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    def outputs(self) -> list[TensorInfo]:
        return self._outputs

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._fixed_batch is not None and arrays and len(arrays[0]) != self._fixed_batch:
            return predict_in_fixed_batches(self._run, arrays, self._fixed_batch)
        return self._run(arrays)

    def _run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        result = self._cell(*(self._tensor.from_numpy(a) for a in arrays))
        if isinstance(result, (tuple, list)):
            return [r.asnumpy() for r in result]
        return [result.asnumpy()]


def preload() -> float:
    """Import MindSpore now (before its cluster's variables are set: it reads them only in
    `communication.init()`); return the seconds it took."""
    began = time.monotonic()
    os.environ.setdefault("GLOG_v", "3")
    import mindspore  # noqa: F401

    return time.monotonic() - began


def join_cluster(target: str, device_id: int | None) -> tuple[int, int]:
    """Join the MindSpore cluster the MS_* variables describe (spmdinfer.cluster sets them);
    return this worker's rank and the cluster's size."""
    os.environ.setdefault("GLOG_v", "3")
    import mindspore
    from mindspore import communication

    global _joined
    try:
        _set_device(mindspore, _TARGETS[target], device_id)
        communication.init()
        _joined = (target, device_id)
        return communication.get_rank(), communication.get_group_size()
    except (RuntimeError, ValueError) as exc:
        raise BackendError(f"MindSpore {mindspore.__version__} could not join its collective "
                           f"cluster: {str(exc).strip().splitlines()[0]}") from None


def _set_device(mindspore, device: str, device_id: int | None) -> None:
    if device_id is None:
        mindspore.set_device(device)
    else:
        mindspore.set_device(device, device_id)
