"""Shared pieces of the benchmarks: export slices, write data, run spmdinfer, take medians."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import tomli_w

MPIEXEC = next((str(p) for p in [Path(sys.executable).parent / "mpiexec"] if p.exists()), "mpiexec")
RATE = re.compile(r"([0-9.]+) rows/s")


def workdir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"spmdinfer-bench-{name}-"))


def export(cell, row_shape, path: Path) -> Path:
    import mindspore

    path.parent.mkdir(parents=True, exist_ok=True)
    spec = mindspore.Tensor(shape=[None, *row_shape], dtype=mindspore.float32)
    mindspore.export(cell, spec, file_name=str(path.with_suffix("")), file_format="MINDIR")
    return path


def export_onnx(cell, row_shape, path: Path) -> Path:
    """ONNX with a free batch dimension (MindSpore frees it only through dynamic_axes)."""
    import mindspore
    from mindspore import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    example = mindspore.Tensor(np.zeros((4, *row_shape), np.float32))
    onnx.export(cell, example, file_name=str(path), input_names=["x"],
                dynamic_axes={"x": {0: "batch"}})
    return path


def write_input(path: Path, rows: int, columns: int, chunk_rows: int = 256) -> Path:
    with h5py.File(path, "w") as f:
        data = f.create_dataset("x", (rows, columns), dtype=np.float32,
                                chunks=(min(chunk_rows, rows), columns))
        rng = np.random.default_rng(0)
        for start in range(0, rows, 8192):
            stop = min(start + 8192, rows)
            data[start:stop] = rng.standard_normal((stop - start, columns), dtype=np.float32)
    return path


def write_job(folder: Path, name: str, doc: dict) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def run_spmdinfer(job: Path, n: int) -> float:
    """One run under mpiexec; the scoring loop's rows/s from the summary line."""
    command = [MPIEXEC, "-n", str(n), sys.executable, "-m", "spmdinfer", "run", str(job),
               "--overwrite", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "GLOG_v": "3"})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return float(RATE.findall(result.stdout)[-1])


def alternate(cases: dict, repeats: int) -> dict:
    """Run every case `repeats` times, alternating, and return each case's median."""
    samples = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            samples[name].append(run())
    return {name: statistics.median(values) for name, values in samples.items()}
