"""What a MindIR slice file says about itself, read from its protobuf without running it.

MindSpore's protobuf module (`mindspore/train/mind_ir_pb2.py`) is loaded from its file
alone, so reading a slice never imports the `mindspore` package: a collective cluster's
variables must be set before that import (see spmdinfer.cluster), and `inspect` and
`validate` stay quick.

The signature and the collectives are read from the file's skeleton (`skeleton`): the
protobuf's entries are walked in a memory map, and the graph's parameters (the weights,
nearly all of a slice's bytes) are skipped without being read, so reading a slice of
gigabytes costs what reading its graph costs.
"""

from __future__ import annotations

import functools
import importlib.util
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import TensorInfo
from .errors import BackendError
from .protowire import entries, mapped, varint_bytes

# MindIR's TensorProto.DataType names -> numpy; BFLOAT16 has no numpy dtype.
_DTYPES = {"FLOAT": np.float32, "FLOAT16": np.float16, "DOUBLE": np.float64, "FLOAT64": np.float64,
           "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
           "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
           "BOOL": np.bool_, "COMPLEX64": np.complex64, "COMPLEX128": np.complex128}

# Primitives that communicate with other ranks from inside the graph.
COMMUNICATING_OPS = ("AllGather", "AllReduce", "Broadcast", "ReduceScatter", "AlltoAll",
                     "AllToAll", "AlltoAllV", "NeighborExchange", "NeighborExchangeV2",
                     "Send", "Receive", "Reduce", "CollectiveGather", "CollectiveScatter",
                     "BatchISendIRecv", "Barrier", "MicroStepAllGather", "MiniStepAllGather")
# The world group each device's collective library names.
WORLD_GROUPS = {"cpu": "mccl_world_group", "gpu": "nccl_world_group", "ascend": "hccl_world_group"}


@dataclass(frozen=True)
class Collective:
    """One communicating primitive of a slice: its op and the group it talks in."""

    op: str
    group: str | None        # None where the primitive names none
    rank_size: int | None    # the group's size as exported (AllGather, ReduceScatter, AlltoAll
                             # record it; AllReduce, Broadcast, Send and Receive do not)
    reduce: str | None = None   # AllReduce's and Reduce's operation: "sum", "max", ...

    def __str__(self) -> str:
        size = "?" if self.rank_size is None else self.rank_size
        return f"{self.op}(group={self.group or '?'}, rank_size={size})"


@functools.lru_cache(maxsize=1)
def _protobuf():
    """MindSpore's mind_ir_pb2 module, loaded from its file without importing mindspore."""
    spec = importlib.util.find_spec("mindspore")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("reading MindIR files needs the Python package 'mindspore', "
                           "which is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "train" / "mind_ir_pb2.py"
    module_spec = importlib.util.spec_from_file_location("_spmdinfer_mind_ir_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def read_model(path: Path):
    """The parsed ModelProto of a MindIR file (weights included: not kept)."""
    model = _protobuf().ModelProto()
    try:
        model.ParseFromString(Path(path).read_bytes())
    except OSError as exc:
        raise BackendError(f"{path}: cannot read the MindIR file ({exc.strerror})") from None
    except Exception as exc:  # protobuf raises its own DecodeError, not exported stably
        raise BackendError(f"{path}: not a readable MindIR file ({type(exc).__name__}: {exc})") from None
    return model


def read_skeleton(path: Path):
    """The ModelProto of a MindIR file without its graphs' parameters (see `skeleton`)."""
    model = _protobuf().ModelProto()
    try:
        with mapped(path, SKIM_ABOVE) as data:
            model.ParseFromString(skeleton(data) if isinstance(data, mmap.mmap) else data)
    except OSError as exc:
        raise BackendError(f"{path}: cannot read the MindIR file ({exc.strerror})") from None
    except Exception as exc:  # protobuf raises its own DecodeError, not exported stably
        raise BackendError(f"{path}: not a readable MindIR file ({type(exc).__name__}: {exc})") from None
    return model


SKIM_ABOVE = 1 << 20   # smaller files are parsed whole
_GRAPH_FIELDS = (7, 8)   # ModelProto.graph, ModelProto.functions: GraphProto
_WEIGHT_FIELDS = (3, 10)  # GraphProto.parameter, GraphProto.map_parameter


def skeleton(data) -> bytes:
    """A serialized ModelProto (bytes or a memory map) without its graphs' parameters: the
    entries of the model and of each graph are walked by their tags and lengths, and a
    parameter's bytes are never read."""
    out = bytearray()
    for number, wire, entry, end, payload in entries(data, 0, len(data)):
        if wire != 2 or number not in _GRAPH_FIELDS:
            out += data[entry:end]
            continue
        graph = bytearray()
        for inner, inner_wire, start, stop, _ in entries(data, payload, end):
            if not (inner_wire == 2 and inner in _WEIGHT_FIELDS):
                graph += data[start:stop]
        out += varint_bytes(number << 3 | 2) + varint_bytes(len(graph)) + graph
    return bytes(out)


def read_signature(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Inputs and outputs a MindIR file declares, read from its protobuf graph."""
    inputs, outputs, _ = _summary(*_version(path))
    return list(inputs), list(outputs)


def read_collectives(path: Path) -> list[Collective]:
    """Every communicating primitive in the file, once per distinct (op, group, rank_size)."""
    return list(_summary(*_version(path))[2])


def _version(path: Path) -> tuple[Path, int, float]:
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise BackendError(f"{path}: cannot read the MindIR file ({exc.strerror})") from None
    return path, stat.st_size, stat.st_mtime


@functools.lru_cache(maxsize=64)
def _summary(path: Path, size: int, mtime: float) -> tuple[tuple, tuple, tuple]:
    """(inputs, outputs, collectives) of one version of a file: start-up asks twice (the
    cluster phase, then the backend), and the file's skeleton is parsed once (its weights
    never are) and not kept."""
    model = read_skeleton(path)
    return (*_signature(model), _collectives(model))


def _signature(model) -> tuple[tuple, tuple]:
    names = _protobuf().TensorProto.DataType.Name

    def info(value, index: int, prefix: str) -> TensorInfo:
        tensor = value.tensor[0] if value.tensor else None
        name = value.name.rsplit(":", 1)[-1] if prefix == "input" else f"output{index}"
        if tensor is None:
            return TensorInfo(name, None, None)
        shape = tuple(None if d < 0 else int(d) for d in tensor.dims)
        dtype = _DTYPES.get(names(tensor.data_type))
        return TensorInfo(name, shape, None if dtype is None else np.dtype(dtype))

    inputs = tuple(info(v, i, "input") for i, v in enumerate(model.graph.input))
    outputs = tuple(info(v, i, "output") for i, v in enumerate(model.graph.output))
    if any(o.shape is None for o in outputs):
        outputs = ()  # a tuple output: MindIR does not declare its members here
    return inputs, outputs


def _collectives(model) -> tuple[Collective, ...]:
    found: dict[tuple, Collective] = {}
    for primitive in model.primitives:
        op = primitive.op_type.rsplit("::", 1)[-1]
        if op not in COMMUNICATING_OPS:
            continue
        attributes = {a.name: a for a in primitive.attribute}
        group = attributes["group"].s.decode() if "group" in attributes else None
        size = int(attributes["rank_size"].i) if "rank_size" in attributes else None
        reduce = attributes["op"].s.decode() if "op" in attributes else None
        found.setdefault((op, group, size, reduce),
                         Collective(op, group or None, size or None, reduce or None))
    return tuple(found.values())
