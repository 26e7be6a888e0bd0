"""MindSpore's own runtime: `mindspore.load` + `nn.GraphCell`, the default on CPU."""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BackendError
from ..mindir import read_signature
from . import Placement, TensorInfo, predict_in_fixed_batches, share_of_mask

_TARGETS = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}
MAX_SIGNATURES = 64   # input signatures whose compiled graph a session runs directly
_joined: tuple[str, int | None] | None = None   # (target, device id) of the cluster this process joined


def open_session(path: Path, placement: Placement, options: dict) -> "MindSporeSession":
    return MindSporeSession(path, placement, options)


class MindSporeSession:
    """A MindIR slice compiled by MindSpore for this rank's device."""

    def __init__(self, path: Path, placement: Placement, options: dict):
        direct = _direct_run_option(options)
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
        self._cores = _budget_cores(placement) if placement.target == "cpu" else None
        self._graph = _Graph(self._cell, _compiled_graphs() if direct else None)

    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    def outputs(self) -> list[TensorInfo]:
        return self._outputs

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._fixed_batch is not None and arrays and len(arrays[0]) != self._fixed_batch:
            return predict_in_fixed_batches(self._run, arrays, self._fixed_batch)
        return self._run(arrays)

    def _run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        tensors = tuple(self._tensor.from_numpy(a) for a in arrays)
        signature = tuple((a.shape, a.dtype.str) for a in arrays)
        with _on_cores(self._cores):
            result = self._graph(tensors, signature)
        return [r.asnumpy() for r in result] if isinstance(result, (tuple, list)) else \
            [result.asnumpy()]


def _direct_run_option(options: dict) -> bool:
    unknown = sorted(set(options) - {"direct_run"})
    if unknown:
        raise BackendError(f"[backend.mindspore] {unknown[0]}: unknown option; valid options: "
                           "direct_run")
    direct = options.get("direct_run", True)
    if not isinstance(direct, bool):
        raise BackendError(f"[backend.mindspore] direct_run: expected true or false, got {direct!r}")
    return direct


class _Graph:
    """A GraphCell's runs: the first of each input signature (shapes and dtypes) through the
    cell, which compiles the graph for it, and the later ones straight to the compiled graph.

    `GraphCell.__call__` works out, in Python, on every call, which compiled graph the
    arguments need (their key, the auto-parallel context, the JIT settings): about 0.4 ms a
    call on this machine, more than the small MatMul of the suite's I/O-bound case costs
    itself. The graph it settles on for a signature never changes, so it is remembered here
    and run with MindSpore's graph executor, which is what the cell calls in the end.
    `compiled` is None where that executor cannot be reached (another MindSpore version, or
    `[backend.mindspore] direct_run = false`): every run then goes through the cell. Like the
    cell, not for use from two threads at once (the phase is read back from the cell).
    """

    def __init__(self, cell, compiled):
        self._cell = cell
        self._phases: dict[tuple, str] = {}   # signature -> the compiled graph's phase
        self._direct = compiled is not None
        if self._direct:
            self._executor, self._convert, default = compiled
            self._jit_config = getattr(cell, "jit_config_dict", None) or default  # as the cell sets it

    def __call__(self, tensors: tuple, signature: tuple):
        phase = self._phases.get(signature)
        if phase is not None:
            self._executor.set_jit_config(self._jit_config)
            return self._convert(self._executor(tensors, phase))
        result = self._cell(*tensors)
        if self._direct and len(self._phases) < MAX_SIGNATURES:
            phase = getattr(self._cell, "compile_phase", None)
            if isinstance(phase, str) and self._executor.has_compiled(phase):
                self._phases[signature] = phase
        return result


def _compiled_graphs():
    """MindSpore's graph executor, the conversion of its results and the default JIT settings
    (private to MindSpore: `mindspore.graph.api` in 2.10, `mindspore.common.api` in older
    releases), or None."""
    for module in ("mindspore.graph.api", "mindspore.common.api"):
        try:
            api = __import__(module, fromlist=["_cell_graph_executor"])
            executor = api._cell_graph_executor._graph_executor
            convert = api._convert_python_data
            jit_config = api._DEFAULT_JIT_CONFIG  # what the cell sets before each run
        except (ImportError, AttributeError):
            continue
        if callable(executor) and hasattr(executor, "has_compiled") and \
                hasattr(executor, "set_jit_config") and callable(convert):
            return executor, convert, jit_config
    return None


def _budget_cores(placement: Placement) -> frozenset[int] | None:
    """The cores this rank's graphs run on (the placement's, else the first `threads` of this
    thread's CPU mask), or None where that is the whole mask.

    MindSpore sizes its CPU thread pool from the cores the process may use when it runs its
    first graph; `runtime_num_threads`, `device_context.cpu.op_tuning.threads_num` and
    `runtime.dispatch_threads_num` do not bound it (docs/performance.md has the figures).
    And the thread that calls a graph works on its kernels beside the pool's threads.
    """
    return share_of_mask(placement.cores, placement.threads)


@contextlib.contextmanager
def _on_cores(cores: frozenset[int] | None):
    """The calling thread on `cores` while the body runs a graph, then on its own mask again.

    The threads MindSpore starts in the first run inherit the cut mask and keep it (its pool
    is then `len(cores)` threads, and they never leave those cores); the caller, which helps
    with the kernels, is cut for each run only, so that between runs the rank's other work,
    its agreements over MPI and the threads it starts (the runner's prefetch and commit) may
    use every core of its mask. Three system calls a batch, microseconds.
    """
    if cores is None:
        yield
        return
    whole = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, whole)


exit_hooks: list = []  # what MindSpore registered with atexit while spmdinfer watched


def preload() -> float:
    """Import MindSpore now (before its cluster's variables are set: it reads them only in
    `communication.init()`); return the seconds it took."""
    began = time.monotonic()
    os.environ.setdefault("GLOG_v", "3")
    with _recording_exit_hooks():
        import mindspore  # noqa: F401

    return time.monotonic() - began


@contextlib.contextmanager
def _recording_exit_hooks():
    """Note the atexit hooks registered meanwhile (MindSpore's C++ one calls atexit.register
    through the module, as Python code does), so that a cluster worker can leave without them
    (spmdinfer.cluster.leave)."""
    register = atexit.register

    def recording(function, *args, **kwargs):
        exit_hooks.append(function)
        return register(function, *args, **kwargs)

    atexit.register = recording
    try:
        yield
    finally:
        atexit.register = register


def join_cluster(target: str, device_id: int | None) -> tuple[int, int]:
    """Join the MindSpore cluster the MS_* variables describe (spmdinfer.cluster sets them);
    return this worker's rank and the cluster's size."""
    os.environ.setdefault("GLOG_v", "3")
    import mindspore
    from mindspore import communication

    global _joined
    try:
        _set_device(mindspore, _TARGETS[target], device_id)
        with _recording_exit_hooks():
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
