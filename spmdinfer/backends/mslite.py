"""MindSpore Lite: MindIR slices built by `mindspore_lite.Model` for this rank's CPU, GPU or Ascend.

Written against the Python API of the mindspore-lite 2.0.0 wheel and the later releases'
additions (`ascend.rank_id`, `ascend.provider`, `Model.get_outputs`), which are used only
where the installed Lite has them.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BackendError
from ..log import log
from . import Placement, TensorInfo, predict_in_fixed_batches, share_of_mask

# Lite's DataType names -> numpy; UNKNOWN, INVALID (and BFLOAT16 in later releases) have none.
_DTYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
           "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
           "UINT64": np.uint64, "FLOAT16": np.float16, "FLOAT32": np.float32,
           "FLOAT64": np.float64}
# The providers each target accepts; Lite's GPU backend is TensorRT, so "tensorrt" selects nothing.
_PROVIDERS = {"cpu": ("",), "gpu": ("", "tensorrt"), "ascend": ("", "ge")}
OPTIONS: tuple[str, ...] = ()  # [backend.mslite]: none until one can be tested on a Lite host
_LIBMPI = re.compile(r"libmpi\.so")  # the C library only: MPICH, Open MPI, Intel MPI, MVAPICH
_LITE_ERRORS = (RuntimeError, TypeError, ValueError)


def open_session(path: Path, placement: Placement, options: dict) -> "MsliteSession":
    return MsliteSession(path, placement, options)


class MsliteSession:
    """A MindIR slice in a MindSpore Lite Model built for this rank's device."""

    def __init__(self, path: Path, placement: Placement, options: dict):
        unknown = [key for key in options if key not in OPTIONS]
        if unknown:
            raise BackendError(f"unknown option {unknown[0]!r} in [backend.mslite]; valid options: "
                               f"{', '.join(OPTIONS) or 'none'}")
        import mindspore_lite as mslite

        self.version = mslite.__version__
        self._path = path
        if placement.target == "gpu":
            problem = mpi_mismatch(Path(mslite.__file__).parent / "lib")
            if problem:
                log.warning("%s", problem)
        try:
            context = build_context(mslite, placement)
            self._model = mslite.Model()
            config = "" if placement.config_file is None else str(placement.config_file)
            self._model.build_from_file(str(path), mslite.ModelType.MINDIR, context, config)
            # Lite resizes these very tensors in place, so they are fetched once.
            self._tensors = self._model.get_inputs()
            declared = self._model.get_outputs() if hasattr(self._model, "get_outputs") else []
        except _LITE_ERRORS as exc:
            raise BackendError(f"{path}: MindSpore Lite cannot build this slice for "
                               f"{_where(placement)}: {_first_line(exc)}") from None
        self._inputs = [_info(t) for t in self._tensors]
        self._outputs = [_info(t) for t in declared]
        self._shapes = [list(t.shape) for t in self._tensors]
        self._fixed_batch: int | None = None  # set once Lite refuses to resize

    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    def outputs(self) -> list[TensorInfo]:
        return self._outputs

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._fixed_batch is not None:
            return predict_in_fixed_batches(self._run, arrays, self._fixed_batch)
        shapes = [list(a.shape) for a in arrays]
        if shapes != self._shapes:
            try:
                self._model.resize(self._tensors, shapes)
            except RuntimeError as exc:
                self._fixed_batch = self._batch_after_refusal(exc)
                return predict_in_fixed_batches(self._run, arrays, self._fixed_batch)
            self._shapes = shapes
        return self._run(arrays)

    def _run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        try:
            for tensor, array in zip(self._tensors, arrays):
                tensor.set_data_from_numpy(np.ascontiguousarray(array))
            return [o.get_data_to_numpy() for o in self._model.predict(self._tensors)]
        except _LITE_ERRORS as exc:
            raise BackendError(f"{self._path}: MindSpore Lite predict failed: "
                               f"{_first_line(exc)}") from None

    def _batch_after_refusal(self, exc: Exception) -> int:
        """The batch to pad to once Lite refuses to resize: the one the tensors still have."""
        batch = self._shapes[0][0] if self._shapes and self._shapes[0] else -1
        if batch < 1:
            raise BackendError(f"{self._path}: MindSpore Lite cannot resize this slice's inputs "
                               f"and they have no fixed batch to pad to: {_first_line(exc)}")
        log.warning("%s: MindSpore Lite cannot resize the inputs (%s); padding every batch to "
                    "%d rows", self._path, _first_line(exc), batch)
        return batch


def build_context(mslite, placement: Placement):
    """The Lite Context for this rank: its target, device, rank and CPU threads."""
    target = placement.target
    if placement.provider not in _PROVIDERS[target]:
        raise BackendError(f"[device] provider = {placement.provider!r} does not fit target "
                           f"{target!r} with MindSpore Lite; expected one of "
                           f"{', '.join(repr(p) for p in _PROVIDERS[target])}")
    context = mslite.Context()
    context.target = [target]
    # Lite keeps the CPU as the fallback of gpu and ascend too: the node's ranks share its cores.
    context.cpu.thread_num = placement.threads
    # Lite's CPU threads keep to the rank's share of its node's cores, on every target, where
    # that is fewer than this process may use; else Lite's default (no binding).
    cores = share_of_mask(placement.cores)
    if cores:
        context.cpu.thread_affinity_core_list = sorted(cores)
    device = getattr(context, target) if target != "cpu" else None
    if device is not None and placement.device_id is not None:
        device.device_id = placement.device_id
    if target == "gpu" and placement.provider:
        # As Lite's distributed-inference tutorial does. The Lite sources read (2.0.0 and the
        # current context.py) define no gpu.provider property, so there it is an unread attribute.
        device.provider = placement.provider
    if target == "ascend":
        # ascend.rank_id and ascend.provider came after the 2.0.0 wheel.
        _set_if_settable(mslite, device, "rank_id", placement.rank_id, needed=placement.rank_id != 0)
        if placement.provider:
            _set_if_settable(mslite, device, "provider", placement.provider, needed=True)
    return context


def _set_if_settable(mslite, device, name: str, value, needed: bool) -> None:
    """Set a device property the installed Lite defines; fail where it lacks one the job needs."""
    prop = getattr(type(device), name, None)
    if isinstance(prop, property) and prop.fset is not None:
        setattr(device, name, value)
    elif needed:
        raise BackendError(f"MindSpore Lite {mslite.__version__} cannot set context.ascend.{name} "
                           f"(= {value!r}); distributed Ascend inference needs a Lite release "
                           "that has it")


def mpi_mismatch(lite_lib: Path, maps: str | None = None) -> str | None:
    """Why Lite's libraries in `lite_lib` and mpi4py would use different libmpi, or None.

    Compares the libmpi sonames Lite's libraries link (ELF DT_NEEDED) with the sonames of
    the libmpi files mapped into this process (`maps`: /proc/self/maps when None).
    """
    needed: dict[str, str] = {}
    libraries = sorted(lite_lib.glob("*.so*")) if lite_lib.is_dir() else []
    for library in libraries:
        for soname in elf_dynamic(library).get("NEEDED", []):
            if _LIBMPI.match(soname):
                needed.setdefault(soname, library.name)
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            maps = ""
    loaded: dict[str, str] = {}
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and _LIBMPI.match(Path(fields[5]).name):
            path = Path(fields[5].strip())
            for soname in elf_dynamic(path).get("SONAME") or [path.name]:
                loaded[soname] = str(path)
    missing = sorted(set(needed) - set(loaded))
    if not loaded or not missing:
        return None
    found = ", ".join(f"{path} ({soname})" for soname, path in sorted(loaded.items()))
    return (f"MindSpore Lite's {needed[missing[0]]} links {missing[0]} but mpi4py loaded {found}: "
            "Lite's GPU distributed mode and mpi4py must use the same MPI library; "
            "build mpi4py against the MPI that Lite links")


def elf_dynamic(path: Path) -> dict[str, list[str]]:
    """The NEEDED and SONAME entries of an ELF shared library; empty if it is not one."""
    try:
        with open(path, "rb") as f:
            def read(offset: int, size: int) -> bytes:
                f.seek(offset)
                return f.read(size)

            ident = read(0, 16)
            if ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
                return {}
            end, wide = ("<" if ident[5] == 1 else ">"), ident[4] == 2
            header = end + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH")
            fields = struct.unpack(header, read(16, struct.calcsize(header)))
            shoff, shentsize, shnum = fields[5], fields[10], fields[11]
            table = read(shoff, shentsize * shnum)
            layout = end + ("IIQQQQIIQQ" if wide else "IIIIIIIIII")
            sections = [struct.unpack_from(layout, table, i * shentsize) for i in range(shnum)]
            result: dict[str, list[str]] = {}
            for _, kind, _, _, offset, size, link, *_ in sections:
                if kind != 6:  # SHT_DYNAMIC; its sh_link is the index of its string table
                    continue
                strings = read(sections[link][4], sections[link][5])
                for tag, value in struct.iter_unpack(end + ("qQ" if wide else "iI"), read(offset, size)):
                    if tag == 0:  # DT_NULL ends the table
                        break
                    if tag in (1, 14):  # DT_NEEDED, DT_SONAME
                        name = strings[value:strings.index(b"\0", value)].decode(errors="replace")
                        result.setdefault("NEEDED" if tag == 1 else "SONAME", []).append(name)
            return result
    except (OSError, struct.error, ValueError, IndexError):
        return {}


def _info(tensor) -> TensorInfo:
    dtype = _DTYPES.get(getattr(tensor.dtype, "name", ""))
    shape = tuple(None if d < 0 else int(d) for d in tensor.shape)
    return TensorInfo(tensor.name, shape, None if dtype is None else np.dtype(dtype))


def _where(placement: Placement) -> str:
    device = "" if placement.device_id is None else f" device {placement.device_id}"
    return f"{placement.target}{device} (model rank {placement.rank_id})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
