"""MindSpore's own runtime: `mindspore.load` + `nn.GraphCell`, the default on CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BackendError
from . import Placement, TensorInfo

# MindIR's TensorProto.DataType names -> numpy; BFLOAT16 has no numpy dtype.
_DTYPES = {"FLOAT": np.float32, "FLOAT16": np.float16, "DOUBLE": np.float64, "FLOAT64": np.float64,
           "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
           "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
           "BOOL": np.bool_, "COMPLEX64": np.complex64, "COMPLEX128": np.complex128}
_TARGETS = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}


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
            if placement.device_id is None:
                mindspore.set_device(device)
            else:
                mindspore.set_device(device, placement.device_id)
            mindspore.set_context(runtime_num_threads=placement.threads)
        except (RuntimeError, ValueError) as exc:
            where = device if placement.device_id is None else f"{device} device {placement.device_id}"
            raise BackendError(f"MindSpore {self.version} cannot run on {where}: "
                               f"{str(exc).strip().splitlines()[0]}") from None
        self._inputs, self._outputs = read_signature(path)
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
        result = self._cell(*(self._tensor.from_numpy(a) for a in arrays))
        if isinstance(result, (tuple, list)):
            return [r.asnumpy() for r in result]
        return [result.asnumpy()]


def read_signature(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Inputs and outputs a MindIR file declares, read from its protobuf graph."""
    from mindspore.train import mind_ir_pb2

    model = mind_ir_pb2.ModelProto()
    try:
        model.ParseFromString(Path(path).read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError, not exported stably
        raise BackendError(f"{path}: not a readable MindIR file ({type(exc).__name__}: {exc})") from None
    names = mind_ir_pb2.TensorProto.DataType.Name

    def info(value, index: int, prefix: str) -> TensorInfo:
        tensor = value.tensor[0] if value.tensor else None
        name = value.name.rsplit(":", 1)[-1] if prefix == "input" else f"output{index}"
        if tensor is None:
            return TensorInfo(name, None, None)
        shape = tuple(None if d < 0 else int(d) for d in tensor.dims)
        dtype = _DTYPES.get(names(tensor.data_type))
        return TensorInfo(name, shape, None if dtype is None else np.dtype(dtype))

    inputs = [info(v, i, "input") for i, v in enumerate(model.graph.input)]
    outputs = [info(v, i, "output") for i, v in enumerate(model.graph.output)]
    if any(o.shape is None for o in outputs):
        outputs = []  # a tuple output: MindIR does not declare its members here
    return inputs, outputs
