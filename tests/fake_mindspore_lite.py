"""A stand-in, not MindSpore Lite: the part of the `mindspore_lite` API that spmdinfer uses.

MindSpore Lite cannot be installed here (PyPI has only the 2.0.0 wheel, for Python 3.7), so
tests put this module in sys.modules["mindspore_lite"]. Names, signatures, type and value
checks and exception types are copied from the 2.0.0 wheel (mindspore_lite/context.py,
model.py, tensor.py, _checkparam.py); `use_api("later")` adds what later releases added and
spmdinfer uses: the `ascend.rank_id` and `ascend.provider` setters and `Model.get_outputs`.

Where it differs from Lite: every call is recorded in CALLS; a "model" is a numpy function
that a test registers for the model's path (`register`); and the device-info objects refuse
attributes the real API does not define, where the real ones would keep them unread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import numpy as np

__version__ = "2.0.0"
CALLS: list[tuple[str, object]] = []  # (call or "device.attribute", its arguments or value)
MODELS: dict[str, "Slice"] = {}       # real path of a model file -> what "running" it does
_API = "2.0.0"


@dataclass
class Slice:
    """A registered model: its inputs and outputs as (name, shape, numpy dtype), and its function."""

    function: Callable[..., object]
    inputs: list[tuple[str, list[int], type]]
    outputs: list[tuple[str, list[int], type]] = field(default_factory=list)
    resizable: bool = True


def register(path, function, inputs, outputs=(), resizable: bool = True) -> None:
    """Make `path` a model that computes `function(*input arrays)`; optionally refuse resize."""
    MODELS[os.path.realpath(path)] = Slice(function, [(n, list(s), d) for n, s, d in inputs],
                                           [(n, list(s), d) for n, s, d in outputs], resizable)


def use_api(version: str) -> None:
    """Mirror the 2.0.0 wheel ("2.0.0", the default) or add the later releases' API ("later")."""
    global _API, Model, __version__
    if version not in ("2.0.0", "later"):
        raise ValueError(f"no such stand-in API: {version!r}")
    _API = version
    Model = _LaterModel if version == "later" else _Model
    __version__ = "2.0.0" if version == "2.0.0" else "later (stand-in)"


def _record(name: str, value) -> None:
    CALLS.append((name, value))


def _tensor(name: str, shape, numpy_type, data=None) -> "Tensor":
    """A tensor as Lite's C++ side would hand it out (the public constructor makes empty ones)."""
    tensor = Tensor()
    tensor._name, tensor._shape = name, list(shape)
    tensor._dtype, tensor._data = _NUMPY_TYPES[np.dtype(numpy_type).type], data
    return tensor


# Copied from mindspore_lite/_checkparam.py (2.0.0).
def check_isinstance(arg_name, arg_value, classes):
    if not isinstance(arg_value, classes):
        raise TypeError(f"{arg_name} must be {classes.__name__}, but got {format(type(arg_value))}.")
    return arg_value


def check_list_of_element(arg_name, arg_value, ele_classes):
    if not isinstance(arg_value, list):
        raise TypeError(f"{arg_name} must be list, but got {format(type(arg_value))}.")
    for i, element in enumerate(arg_value):
        if not isinstance(element, ele_classes):
            raise TypeError(f"{arg_name} element must be {ele_classes.__name__}, but got "
                            f"{type(element)} at index {i}.")
    return arg_value


class DataType(Enum):
    UNKNOWN = 0
    BOOL = 30
    INT8 = 32
    INT16 = 33
    INT32 = 34
    INT64 = 35
    UINT8 = 37
    UINT16 = 38
    UINT32 = 39
    UINT64 = 40
    FLOAT16 = 42
    FLOAT32 = 43
    FLOAT64 = 44
    INVALID = 2147483647


class ModelType(Enum):
    MINDIR = 0
    MINDIR_LITE = 4


_NUMPY_TYPES = {np.bool_: DataType.BOOL, np.int8: DataType.INT8, np.int16: DataType.INT16,
                np.int32: DataType.INT32, np.int64: DataType.INT64, np.uint8: DataType.UINT8,
                np.uint16: DataType.UINT16, np.uint32: DataType.UINT32, np.uint64: DataType.UINT64,
                np.float16: DataType.FLOAT16, np.float32: DataType.FLOAT32,
                np.float64: DataType.FLOAT64}


class Tensor:
    """A Lite tensor: name, shape, dtype and data, with the 2.0.0 checks on setting data."""

    def __init__(self, tensor=None):
        if tensor is not None:
            raise TypeError(f"tensor must be MindSpore Lite's Tensor._tensor, but got {type(tensor)}.")
        self._name, self._shape, self._dtype, self._data = "", [], DataType.FLOAT32, None

    @property
    def name(self):
        return self._name

    @property
    def shape(self):
        return list(self._shape)

    @property
    def dtype(self):
        return self._dtype

    @property
    def element_num(self):
        return 0 if any(d < 0 for d in self._shape) else int(np.prod(self._shape, dtype=np.int64))

    @property
    def data_size(self):
        numpy_type = next(t for t, d in _NUMPY_TYPES.items() if d is self._dtype)
        return self.element_num * np.dtype(numpy_type).itemsize

    def get_data_to_numpy(self):
        return self._data.copy()

    def set_data_from_numpy(self, numpy_obj):
        if not isinstance(numpy_obj, np.ndarray):
            raise TypeError(f"numpy_obj must be numpy.ndarray, but got {type(numpy_obj)}.")
        if _NUMPY_TYPES.get(numpy_obj.dtype.type) != self.dtype:
            raise RuntimeError(f"data type not equal! Numpy type: {numpy_obj.dtype.type}, "
                               f"Tensor type: {self.dtype}")
        if numpy_obj.nbytes != self.data_size:
            raise RuntimeError(f"data size not equal! Numpy size: {numpy_obj.nbytes}, "
                               f"Tensor size: {self.data_size}")
        _record("set_data_from_numpy", (self._name, list(numpy_obj.shape)))
        self._data = np.array(numpy_obj).reshape(self._shape)


class _Target:
    __slots__ = ("_values",)
    KIND = ""

    def __init__(self):
        self._values = {"device_id": 0, "rank_id": 0, "group_size": 1, "provider": "",
                        "thread_num": 0, "thread_affinity_core_list": []}

    def _set(self, name: str, value) -> None:
        _record(f"{self.KIND}.{name}", value)
        self._values[name] = value


class _CPU(_Target):
    __slots__ = ()
    KIND = "cpu"

    @property
    def thread_num(self):
        return self._values["thread_num"]

    @thread_num.setter
    def thread_num(self, cpu_thread_num):
        check_isinstance("cpu_thread_num", cpu_thread_num, int)
        if cpu_thread_num < 0:
            raise ValueError("cpu_thread_num must be a non-negative int.")
        self._set("thread_num", cpu_thread_num)

    @property
    def thread_affinity_core_list(self):
        return self._values["thread_affinity_core_list"]

    @thread_affinity_core_list.setter
    def thread_affinity_core_list(self, cpu_thread_affinity_core_list):
        check_list_of_element("cpu_thread_affinity_core_list", cpu_thread_affinity_core_list, int)
        self._set("thread_affinity_core_list", cpu_thread_affinity_core_list)


class _GPU(_Target):
    __slots__ = ()
    KIND = "gpu"

    @property
    def device_id(self):
        return self._values["device_id"]

    @device_id.setter
    def device_id(self, gpu_device_id):
        check_isinstance("gpu_device_id", gpu_device_id, int)
        if gpu_device_id < 0:
            raise ValueError("gpu_device_id must be a non-negative int.")
        self._set("device_id", gpu_device_id)

    @property
    def provider(self):
        return self._values["provider"]

    @provider.setter
    def provider(self, gpu_provider):
        # Real _GPU has no such property and no __slots__, so Python accepts any assignment;
        # the stand-in records it and checks the type the tutorial's value has.
        check_isinstance("gpu_provider", gpu_provider, str)
        self._set("provider", gpu_provider)

    @property
    def rank_id(self):  # get only: Lite takes it from MPI
        return self._values["rank_id"]

    @property
    def group_size(self):  # get only
        return self._values["group_size"]


class _Ascend(_Target):
    __slots__ = ()
    KIND = "ascend"

    @property
    def device_id(self):
        return self._values["device_id"]

    @device_id.setter
    def device_id(self, ascend_device_id):
        check_isinstance("ascend_device_id", ascend_device_id, int)
        if ascend_device_id < 0:
            raise ValueError("ascend_device_id must be a non-negative int.")
        self._set("device_id", ascend_device_id)


class _AscendLater(_Ascend):
    """The Ascend device info of later releases: rank_id and provider became settable."""

    __slots__ = ()

    @property
    def rank_id(self):
        return self._values["rank_id"]

    @rank_id.setter
    def rank_id(self, ascend_rank_id):
        check_isinstance("ascend_rank_id", ascend_rank_id, int)
        if ascend_rank_id < 0:
            raise ValueError("ascend_rank_id must be a non-negative int.")
        self._set("rank_id", ascend_rank_id)

    @property
    def provider(self):
        return self._values["provider"]

    @provider.setter
    def provider(self, ascend_provider):
        check_isinstance("ascend_provider", ascend_provider, str)
        self._set("provider", ascend_provider)


class Context:
    """The Lite context: one device-info object per target and the target list."""

    __slots__ = ("cpu", "gpu", "ascend", "_target")

    def __init__(self):
        self.cpu = _CPU()
        self.gpu = _GPU()
        self.ascend = _AscendLater() if _API == "later" else _Ascend()
        self._target = ["cpu"]

    @property
    def target(self):
        return self._target

    @target.setter
    def target(self, target):
        target = ["cpu"] if not target else target
        check_list_of_element("target", target, str)
        for ele in target:
            if ele.lower() not in ["cpu", "gpu", "ascend"]:
                raise ValueError(f"target elements must be in ['cpu', 'gpu', 'ascend'], but got {ele.lower()}.")
        _record("context.target", list(target))
        self._target = target


class _Model:
    """The 2.0.0 Model: build_from_file, get_inputs, resize and predict."""

    def __init__(self):
        self._slice: Slice | None = None
        self._inputs: list[Tensor] = []

    def build_from_file(self, model_path, model_type, context=None, config_path=""):
        check_isinstance("model_path", model_path, str)
        check_isinstance("model_type", model_type, ModelType)
        if context is None:
            context = Context()
        check_isinstance("context", context, Context)
        check_isinstance("config_path", config_path, str)
        if not os.path.exists(model_path):
            raise RuntimeError("build_from_file failed, model_path does not exist!")
        if config_path and not os.path.exists(config_path):
            raise RuntimeError("build_from_file failed, config_path does not exist!")
        _record("build_from_file", (model_path, model_type, context, config_path))
        self._slice = MODELS.get(os.path.realpath(model_path))
        if self._slice is None:
            raise RuntimeError("build_from_file failed! Error is Common error code. "
                               "(stand-in: no model registered for this path)")
        self._inputs = [_tensor(n, s, d) for n, s, d in self._slice.inputs]

    def get_inputs(self):
        return list(self._inputs)

    def resize(self, inputs, dims):
        if not isinstance(inputs, list):
            raise TypeError("inputs must be list, but got {}.".format(type(inputs)))
        if not isinstance(dims, list):
            raise TypeError("dims must be list, but got {}.".format(type(dims)))
        for i, element in enumerate(inputs):
            if not isinstance(element, Tensor):
                raise TypeError(f"inputs element must be Tensor, but got {type(element)} at index {i}.")
        for i, element in enumerate(dims):
            if not isinstance(element, list):
                raise TypeError(f"dims element must be list, but got {type(element)} at index {i}.")
            for j, dim in enumerate(element):
                if not isinstance(dim, int):
                    raise TypeError(f"dims element's element must be int, but got {type(dim)} at "
                                    f"{i}th dims element's {j}th element.")
        if len(inputs) != len(dims):
            raise ValueError(f"inputs' size does not match dims' size, but got inputs: {len(inputs)} "
                             f"and dims: {len(dims)}.")
        _record("resize", dims)
        if not self._slice.resizable or any(len(t._shape) != len(d) for t, d in zip(inputs, dims)):
            raise RuntimeError("resize failed! Error is Common error code.")
        for tensor, dim in zip(inputs, dims):
            tensor._shape, tensor._data = list(dim), None

    def predict(self, inputs):
        if not isinstance(inputs, list):
            raise TypeError("inputs must be list, but got {}.".format(type(inputs)))
        for i, element in enumerate(inputs):
            if not isinstance(element, Tensor):
                raise TypeError(f"inputs element must be Tensor, but got {type(element)} at index {i}.")
        _record("predict", [t.shape for t in inputs])
        if any(t._data is None for t in inputs):
            raise RuntimeError("predict failed!")
        result = self._slice.function(*(t._data for t in inputs))
        outputs = [result] if isinstance(result, np.ndarray) else list(result)
        return [_tensor(f"output{i}", np.shape(a), np.asarray(a).dtype, np.asarray(a))
                for i, a in enumerate(outputs)]


class _LaterModel(_Model):
    """The Model of later releases, which added get_outputs."""

    def get_outputs(self):
        return [_tensor(n, s, d) for n, s, d in self._slice.outputs]


Model = _Model
