"""ONNX Runtime: `.onnx` slices on CPU, or on CUDA with CPU as the fallback for unsupported ops."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BackendError
from . import Placement, TensorInfo, predict_in_fixed_batches

# ORT's type strings -> numpy; bfloat16 and strings have no numpy dtype the runner can check.
_DTYPES = {"float": np.float32, "float16": np.float16, "double": np.float64,
           "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
           "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
           "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128}
_OPTIMIZATION_LEVELS = {"disable_all": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                        "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
# The [backend.onnxruntime] options: name -> (check of the value, what the user may write).
OPTIONS = {
    "graph_optimization_level": (lambda v: isinstance(v, str) and v in _OPTIMIZATION_LEVELS,
                                 " or ".join(repr(k) for k in _OPTIMIZATION_LEVELS)),
    "enable_mem_pattern": (lambda v: isinstance(v, bool), "true or false"),
    "enable_cpu_mem_arena": (lambda v: isinstance(v, bool), "true or false"),
    "log_severity_level": (lambda v: type(v) is int and 0 <= v <= 4, "0 (verbose) to 4 (fatal)"),
    "session_config": (lambda t: isinstance(t, dict) and all(type(v) is str for v in t.values()),
                       "a table of string = string session config entries"),
}
# Ranks share the node's cores: a spinning pool would burn the cores the other ranks need.
_NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
# MindSpore's ONNX exporter declares static output shapes even for a free batch, and ORT
# warns about that on every run; errors only, unless the job asks for more.
_LOG_ERRORS = 3


def open_session(path: Path, placement: Placement, options: dict) -> "OnnxRuntimeSession":
    return OnnxRuntimeSession(path, placement, options)


class OnnxRuntimeSession:
    """An ONNX slice in an ORT InferenceSession for this rank's device and threads."""

    def __init__(self, path: Path, placement: Placement, options: dict):
        import onnxruntime as ort

        self.version = ort.__version__
        so = _session_options(ort, placement, options)
        providers = _providers(ort, placement)
        try:
            self._session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # ORT's pybind errors derive from Exception only
            raise BackendError(f"{path}: ONNX Runtime cannot load this slice: "
                               f"{_first_line(exc)}") from None
        cuda_missing = "CUDAExecutionProvider" not in self._session.get_providers()
        if placement.target == "gpu" and cuda_missing:
            raise BackendError(f"{path}: ONNX Runtime could not start CUDA on device "
                               f"{placement.device_id}; it would silently run on the CPU")
        self.options = self._session.get_session_options()  # what ORT holds, for logs and tests
        self._inputs = [_info(arg) for arg in self._session.get_inputs()]
        self._outputs = [_info(arg) for arg in self._session.get_outputs()]
        self._names = [t.name for t in self._inputs]
        first = self._inputs[0].shape if self._inputs else None
        self._fixed_batch = first[0] if first else None

    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    def outputs(self) -> list[TensorInfo]:
        return self._outputs

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._fixed_batch is not None and len(arrays[0]) != self._fixed_batch:
            return predict_in_fixed_batches(self._run, arrays, self._fixed_batch)
        return self._run(arrays)

    def _run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self._session.run(None, dict(zip(self._names, arrays)))


def _session_options(ort, placement: Placement, options: dict):
    """ORT SessionOptions for this rank: its threads, no spinning, then the job's options."""
    for key, value in options.items():
        if key not in OPTIONS:
            raise BackendError(f"[backend.onnxruntime] {key}: unknown option; valid options: "
                               f"{', '.join(OPTIONS)}")
        valid, expected = OPTIONS[key]
        if not valid(value):
            raise BackendError(f"[backend.onnxruntime] {key} must be {expected}, got {value!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = placement.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = options.get("log_severity_level", _LOG_ERRORS)
    level = options.get("graph_optimization_level", "all")
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPTIMIZATION_LEVELS[level])
    for key in ("enable_mem_pattern", "enable_cpu_mem_arena"):
        if key in options:
            setattr(so, key, options[key])
    config = {**_NO_SPINNING, **options.get("session_config", {})}
    for key, value in config.items():
        try:
            so.add_session_config_entry(key, value)
        except Exception as exc:
            raise BackendError(f"[backend.onnxruntime.session_config] {key}: "
                               f"{_first_line(exc)}") from None
    return so


def _providers(ort, placement: Placement) -> list:
    if placement.provider:
        raise BackendError(f"[device] provider = {placement.provider!r} is not supported by the "
                           "onnxruntime backend; leave it out")
    if placement.target == "cpu":
        return ["CPUExecutionProvider"]
    if placement.target != "gpu":
        raise BackendError(f"[device] target = {placement.target!r}: the onnxruntime backend "
                           "runs on \"cpu\" or \"gpu\"")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendError(f"[device] target = \"gpu\" needs ONNX Runtime's CUDAExecutionProvider, "
                           f"which this onnxruntime {ort.__version__} build lacks (it has "
                           f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
    return [("CUDAExecutionProvider", {"device_id": placement.device_id}),
            "CPUExecutionProvider"]


def _info(arg) -> TensorInfo:
    """A TensorInfo from ORT's NodeArg: symbolic or unknown dims become None, and so does the
    shape of a tensor of unknown rank (ORT reports it as [], like a scalar, which no batch
    of rows could feed anyway), as spmdinfer.onnxfile reads it from the file."""
    if not arg.type.startswith("tensor("):
        return TensorInfo(arg.name, None, None)  # a sequence or map: nothing the runner can check
    dtype = _DTYPES.get(arg.type[len("tensor("):-1])
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape) if arg.shape else None
    return TensorInfo(arg.name, shape, None if dtype is None else np.dtype(dtype))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
