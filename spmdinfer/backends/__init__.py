"""Backends: one module each behind a name -> factory registry and a tiny protocol.

A backend module is imported only when a job uses it, so `import spmdinfer`
never pulls in a deep-learning framework.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from ..errors import BackendError

# name -> "module:factory"; the factory takes (path, placement, options) and returns a Session.
REGISTRY = {
    "mindspore": "spmdinfer.backends.mindspore:open_session",
    "mslite": "spmdinfer.backends.mslite:open_session",
    "onnxruntime": "spmdinfer.backends.onnxruntime:open_session",
}
# The Python package each backend needs, for `auto` and for clear errors.
PACKAGES = {"mindspore": "mindspore", "mslite": "mindspore_lite", "onnxruntime": "onnxruntime"}


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as the slice declares it; None where the slice does not say."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: np.dtype | None

    def __str__(self) -> str:
        shape = "?" if self.shape is None else "(" + ", ".join(
            "?" if d is None else str(d) for d in self.shape) + ")"
        return f"{self.name} {self.dtype if self.dtype is not None else '?'} {shape}"


@dataclass(frozen=True)
class Placement:
    """What a backend needs to know about the rank it runs on."""

    target: str
    device_id: int | None
    rank_id: int
    threads: int
    provider: str = ""
    config_file: Path | None = None
    cores: frozenset[int] | None = None   # where CPU kernels run; None: `threads` of the mask


def share_of_mask(cores: frozenset[int] | None, threads: int = 0) -> frozenset[int] | None:
    """The cores a backend keeps this rank's CPU kernels to: `cores` (`Placement.cores`; else
    the first `threads` of the mask) within this process's CPU mask, where that is fewer
    than the mask; None where it is the whole mask or nothing, or where there are no masks."""
    try:
        mask = frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    share = (cores or frozenset(sorted(mask)[:threads])) & mask
    return share if share and share != mask else None


class Session(Protocol):
    """One loaded model slice, ready to predict."""

    version: str

    def inputs(self) -> list[TensorInfo]:
        """The inputs the slice declares, in order."""

    def outputs(self) -> list[TensorInfo]:
        """The outputs the slice declares, in order."""

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one batch (inputs in declared order) and return the outputs as numpy arrays."""


def resolve(name: str, path: Path) -> str:
    """The backend to use: `name`, or for "auto" the one that fits the slice's file type."""
    if name != "auto":
        return name
    if path.suffix.lower() == ".onnx":
        return "onnxruntime"
    if importlib.util.find_spec(PACKAGES["mslite"]) is not None:
        return "mslite"
    return "mindspore"


def factory(name: str) -> Callable[..., Session]:
    """The session factory of backend `name`, importing its module now."""
    if name not in REGISTRY:
        raise BackendError(f"[model] backend = {name!r} is not available in this version; "
                           f"available: {', '.join(REGISTRY)}")
    if importlib.util.find_spec(PACKAGES[name]) is None:
        raise BackendError(f"[model] backend = {name!r} needs the Python package "
                           f"{PACKAGES[name]!r}, which is not installed")
    module_name, _, attr = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def open_session(name: str, path: Path, placement: Placement, options: dict) -> Session:
    """Load one slice with backend `name` (already resolved, not "auto")."""
    return factory(name)(path, placement, options)


def predict_in_fixed_batches(predict: Callable[[list[np.ndarray]], list[np.ndarray]],
                             arrays: Sequence[np.ndarray], batch: int) -> list[np.ndarray]:
    """Run `predict` on pieces of exactly `batch` rows, zero-padding the last piece, and
    join the outputs trimmed back to the input's rows: for slices whose batch is fixed."""
    rows = len(arrays[0])
    if rows == batch:
        return predict(list(arrays))
    pieces = []
    for start in range(0, rows, batch):
        part = [a[start:start + batch] for a in arrays]
        valid = len(part[0])
        if valid < batch:
            part = [np.concatenate([p, np.zeros((batch - valid,) + p.shape[1:], p.dtype)])
                    for p in part]
        pieces.append([np.asarray(o)[:valid] for o in predict(part)])
    return [np.concatenate(outputs) for outputs in zip(*pieces)]
