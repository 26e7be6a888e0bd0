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
from . import Placement, TensorInfo, predict_in_fixed_batches

_TARGETS = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}
_joined: tuple[str, int | None] | None = None   # (target, device id) of the cluster this process joined
_give_back: frozenset[int] | None = None  # the cores to give back after the first graph run
_pool_sized = False                       # MindSpore has run a graph: its CPU pool is made


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
        self._budget = (placement.threads, placement.rank_id) if placement.target == "cpu" else None

    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    def outputs(self) -> list[TensorInfo]:
        return self._outputs

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._fixed_batch is not None and arrays and len(arrays[0]) != self._fixed_batch:
            return predict_in_fixed_batches(self._run, arrays, self._fixed_batch)
        return self._run(arrays)

    def _run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not _pool_sized and self._budget is not None:
            _budget_threads(*self._budget)
        try:
            result = self._cell(*(self._tensor.from_numpy(a) for a in arrays))
            return [r.asnumpy() for r in result] if isinstance(result, (tuple, list)) else \
                [result.asnumpy()]
        finally:
            if not _pool_sized:
                _first_run_done()


def _budget_threads(threads: int, rank: int) -> None:
    """Keep MindSpore's CPU kernels to `threads` cores.

    MindSpore sizes its CPU thread pool from the cores the process may use when it runs its
    first graph; `runtime_num_threads`, `device_context.cpu.op_tuning.threads_num` and
    `runtime.dispatch_threads_num` do not bound it (docs/performance.md has the figures). So
    that first run happens with this thread's CPU mask cut to `threads` of its cores (from
    the `rank`-th share on, so that ranks sharing a mask are not all cut to the same cores),
    and `_first_run_done` then gives them back: the pool keeps its size, and the kernels run
    wherever the scheduler puts them, never on more than `threads` cores at once.

    Cut for that run only, not from the load on: in between, the ranks agree over MPI, and
    ranks cut to one core each wait for each other there (8 ranks on 2 cores under two CPU
    hogs: one agreement took up to 170 s).
    """
    global _give_back
    if _pool_sized or _give_back is not None:
        return
    try:
        mask = frozenset(os.sched_getaffinity(0))
        if threads < len(mask):
            cores = sorted(mask)
            first = rank * threads % len(cores)
            os.sched_setaffinity(0, (cores + cores)[first:first + threads])
            _give_back = mask
    except (AttributeError, OSError):
        pass  # no CPU masks here: MindSpore takes what it takes


def _first_run_done() -> None:
    """The pool is made: every thread of this process started while the mask was cut (its
    own, the runner's, MindSpore's) gets the cores back."""
    global _give_back, _pool_sized
    _pool_sized = True
    if _give_back is None:
        return
    cut = os.sched_getaffinity(0)
    for task in os.listdir("/proc/self/task"):
        try:
            if os.sched_getaffinity(int(task)) == cut:
                os.sched_setaffinity(int(task), _give_back)
        except OSError:
            pass  # a thread that has ended
    _give_back = None


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
