"""What a slice file declares: its format, inputs and outputs, read without MPI or a run."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path

from .backends import PACKAGES, TensorInfo
from .errors import BackendError

# File suffix -> (format, backend that reads it).
FORMATS = {".mindir": ("mindir", "mindspore"), ".onnx": ("onnx", "onnxruntime")}


def inspect_slice(path: str | Path) -> dict:
    """Format, reading backend and declared inputs and outputs of one slice file, and for
    MindIR the collectives inside its graph (op, group, rank_size; empty for a graph that
    does not communicate).

    `outputs` is None where the file does not declare them (MindIR tuple outputs).
    """
    path = Path(path)
    fmt, backend = FORMATS.get(path.suffix.lower(), (None, None))
    inputs, outputs, version = declared(path)
    report = {"file": str(path), "format": fmt, "backend": backend, "backend_version": version,
              "inputs": [_tensor(t) for t in inputs],
              "outputs": [_tensor(t) for t in outputs] if outputs else None}
    if fmt == "mindir":
        from .mindir import read_collectives

        report["collectives"] = [{"op": c.op, "group": c.group, "rank_size": c.rank_size}
                                 for c in read_collectives(path)]
    return report


def declared(path: Path) -> tuple[list[TensorInfo], list[TensorInfo], str]:
    """The inputs and outputs a slice file declares, and the version of what read it."""
    if path.suffix.lower() not in FORMATS:
        raise BackendError(f"{path}: unknown slice format {path.suffix!r}; "
                           f"known: {', '.join(FORMATS)}")
    if not path.is_file():
        raise BackendError(f"{path}: slice file not found")
    fmt, backend = FORMATS[path.suffix.lower()]
    if importlib.util.find_spec(PACKAGES[backend]) is None:
        raise BackendError(f"{path}: reading {fmt} files needs the Python package "
                           f"{PACKAGES[backend]!r}, which is not installed")
    if fmt == "mindir":
        from .mindir import read_signature

        # Only the protobuf is parsed: no graph is compiled, so any MindIR reads on any host.
        inputs, outputs = read_signature(path)
        return inputs, outputs, _version("mindspore")
    from .onnxfile import read_signature

    # Only the protobuf's graph is read (not its weights): no session is made.
    inputs, outputs = read_signature(path)
    return inputs, outputs, _version("onnxruntime")


@functools.lru_cache(maxsize=None)
def _version(package: str) -> str:
    """The installed version of a package, whatever its distribution is called
    (onnxruntime-gpu, mindspore-ascend, ...); "?" where none says."""
    for distribution in importlib.metadata.packages_distributions().get(package, [package]):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "?"


def format_report(report: dict) -> str:
    """The human-readable table of an inspect_slice report."""
    lines = [f"{report['file']}: {report['format']}, read with "
             f"{report['backend']} {report['backend_version']}"]
    for kind in ("inputs", "outputs"):
        tensors = report[kind]
        if tensors is None:
            lines.append(f"{kind}: not declared in the file")
            continue
        rows = [(t["name"], t["dtype"] or "?", _shape(t["shape"])) for t in tensors]
        widths = [max(len(r[i]) for r in rows + [("name", "dtype", "shape")]) for i in range(3)]
        lines.append(f"{kind}:")
        for row in [("name", "dtype", "shape")] + rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if "collectives" in report:
        found = report["collectives"]
        lines.append("collectives: " + ("none (an independent graph: ranks' outputs are combined "
                                        "on the host)" if not found else
                                        "inside the graph (spmdinfer forms a collective cluster)"))
        for c in found:
            lines.append(f"  {c['op']}  group={c['group'] or '?'}  rank_size="
                         f"{'?' if c['rank_size'] is None else c['rank_size']}")
    return "\n".join(lines)


def _tensor(info: TensorInfo) -> dict:
    return {"name": info.name,
            "shape": None if info.shape is None else list(info.shape),
            "dtype": None if info.dtype is None else str(info.dtype)}


def _shape(shape: list | None) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
