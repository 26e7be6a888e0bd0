"""What an ONNX slice file declares, read from its protobuf without loading it.

The graph's inputs and outputs are decoded by hand from the wire format (spmdinfer.protowire)
with the field numbers of onnx.proto, which are stable across ONNX versions: no `onnx`
package is needed, no session is made, and the initializers (the weights) are skipped
unread. What it gives equals what ONNX Runtime's session reports (tests/test_inspect.py):
inputs that an initializer provides are not inputs to feed, and symbolic or unknown
dimensions are None.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backends import TensorInfo
from .errors import BackendError
from .protowire import entries, mapped, varint

READ_WHOLE_BELOW = 1 << 20
# onnx.proto field numbers.
MODEL_GRAPH = 7
GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_SPARSE_INITIALIZER = 5, 11, 12, 15
TENSOR_NAME = 8                       # TensorProto.name
SPARSE_VALUES = 1                     # SparseTensorProto.values (a TensorProto)
VALUE_NAME, VALUE_TYPE = 1, 2         # ValueInfoProto
TYPE_TENSOR = 1                       # TypeProto.tensor_type
TENSOR_ELEM_TYPE, TENSOR_SHAPE = 1, 2  # TypeProto.Tensor
SHAPE_DIM = 1                         # TensorShapeProto.dim
DIM_VALUE = 1                         # TensorShapeProto.Dimension.dim_value
# TensorProto.DataType -> numpy (BFLOAT16 and the 8-bit floats have none).
DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
          7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32,
          13: np.uint64, 14: np.complex64, 15: np.complex128}


def read_signature(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The inputs (those an initializer does not provide) and outputs the file declares."""
    try:
        with mapped(path, READ_WHOLE_BELOW) as data:
            return _signature(data)
    except OSError as exc:
        raise BackendError(f"{path}: cannot read the ONNX file ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackendError(f"{path}: not a readable ONNX file ({exc})") from None


def _signature(data) -> tuple[list[TensorInfo], list[TensorInfo]]:
    graph = next(((payload, end) for number, wire, _, end, payload in entries(data, 0, len(data))
                  if number == MODEL_GRAPH and wire == 2), None)
    if graph is None:
        raise ValueError("no graph in the file")
    inputs, outputs, provided = [], [], set()
    for number, wire, _, end, payload in entries(data, *graph):
        if wire != 2:
            continue
        if number == GRAPH_INPUT:
            inputs.append(_value_info(data, payload, end))
        elif number == GRAPH_OUTPUT:
            outputs.append(_value_info(data, payload, end))
        elif number == GRAPH_INITIALIZER:
            provided.add(_string(data, payload, end, TENSOR_NAME))
        elif number == GRAPH_SPARSE_INITIALIZER:
            values = _field(data, payload, end, SPARSE_VALUES)
            if values is not None:
                provided.add(_string(data, *values, TENSOR_NAME))
    return [i for i in inputs if i.name not in provided], outputs


def _field(data, start: int, end: int, wanted: int) -> tuple[int, int] | None:
    """(payload start, end) of the first length-delimited field `wanted` of a message."""
    for number, wire, _, stop, payload in entries(data, start, end):
        if number == wanted and wire == 2:
            return payload, stop
    return None


def _string(data, start: int, end: int, wanted: int) -> str:
    found = _field(data, start, end, wanted)
    return "" if found is None else bytes(data[found[0]:found[1]]).decode("utf-8")


def _value_info(data, start: int, end: int) -> TensorInfo:
    name = _string(data, start, end, VALUE_NAME)
    kind = _field(data, start, end, VALUE_TYPE)
    tensor = None if kind is None else _field(data, *kind, TYPE_TENSOR)
    if tensor is None:
        return TensorInfo(name, None, None)  # a sequence, a map, or no type: nothing to check
    elem, shape = 0, None
    for number, wire, _, stop, payload in entries(data, *tensor):
        if number == TENSOR_ELEM_TYPE and wire == 0:
            elem = varint(data, payload, stop)[0]
        elif number == TENSOR_SHAPE and wire == 2:
            shape = tuple(_dimension(data, p, e) for n, w, _, e, p in entries(data, payload, stop)
                          if n == SHAPE_DIM and w == 2)
    dtype = DTYPES.get(elem)
    return TensorInfo(name, shape, None if dtype is None else np.dtype(dtype))


def _dimension(data, start: int, end: int) -> int | None:
    """A fixed dimension, or None for a symbolic (dim_param) or unknown one."""
    for number, wire, _, stop, payload in entries(data, start, end):
        if number == DIM_VALUE and wire == 0:
            value = varint(data, payload, stop)[0]
            return value if value < 1 << 63 else None  # a negative int64: not a size
    return None
