"""The scoring loop a user would write by hand with mpi4py and h5py: the baseline of suite.py.

    mpiexec -n N python benchmarks/plain_loop.py job.toml

It reads the same job file as `spmdinfer run` (one input dataset, one output dataset, one
slice per rank, no replicas or stages) and does the obvious thing, with no overlap: rank 0
reads each batch with an h5py row slice into a reused buffer, `comm.Bcast`s it (shape and
dtype are broadcast once up front), every rank predicts its slice with the job's backend and
thread count, rank 0 `comm.Gather`s (concat) or `comm.Reduce`s (sum) the outputs and writes
them into a preallocated h5py dataset. Rank 0 prints one JSON line: rows/s of the loop after
loading (first batch to the output file closed, as spmdinfer's summary counts it), seconds
per activity on every rank, and every rank's peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import tomllib
import traceback
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI


def open_model(backend: str, path: Path, threads: int):
    """predict(batch) -> the slice's first output, with the settings spmdinfer uses."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: batch})[0]
    if backend == "mindspore":
        os.environ.setdefault("GLOG_v", "3")
        import mindspore
        from mindspore import nn

        mindspore.set_device("CPU")
        mindspore.set_context(runtime_num_threads=threads)
        cell = nn.GraphCell(mindspore.load(str(path)))
        return lambda batch: cell(mindspore.Tensor.from_numpy(batch)).asnumpy()
    raise SystemExit(f"plain_loop: backend {backend!r}: expected onnxruntime or mindspore")


def main() -> None:
    job_path = Path(sys.argv[1]).resolve()
    job = tomllib.loads(job_path.read_text())
    here = job_path.parent
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    if job["model"].get("ranks", 1) != size:
        raise SystemExit(f"plain_loop: launch with mpiexec -n {job['model']['ranks']}")
    batch_size = job["input"]["batch_size"]
    (in_path,) = job["input"]["datasets"].values()
    (out_name, out_path), = job["output"]["datasets"].items()
    mode = job["output"].get("combine", {}).get(out_name, "rank0")
    if mode not in ("concat:-1", "sum", "rank0"):
        raise SystemExit(f"plain_loop: combine {mode!r}: expected concat:-1, sum or rank0")

    predict = open_model(job["model"]["backend"], here / job["model"]["files"].format(rank=rank),
                         job["device"]["threads"])

    source = dataset = None
    if rank == 0:
        source = h5py.File(here / job["input"]["file"], "r")
        dataset = source[in_path]
        layout = (dataset.shape[0], dataset.shape[1:], dataset.dtype.str)
    rows, row_shape, dtype = comm.bcast(layout if rank == 0 else None, root=0)
    buffer = np.empty((min(batch_size, rows),) + tuple(row_shape), dtype=np.dtype(dtype))
    sample = predict(buffer[:1] * 0)  # the output's row shape and dtype, before the clock starts
    width = sample.shape[1:]
    if mode == "concat:-1":
        width = width[:-1] + (width[-1] * size,)

    target = output = None
    if rank == 0:
        out_file = here / job["output"]["file"]
        out_file.parent.mkdir(parents=True, exist_ok=True)
        target = h5py.File(out_file.with_name(out_file.name + ".plain.h5"), "w")
        output = target.create_dataset(out_path.lstrip("/"), (rows,) + width, dtype=sample.dtype)
    seconds = dict.fromkeys(("read", "bcast", "predict", "combine", "write"), 0.0)
    comm.Barrier()

    began = time.perf_counter()
    for start in range(0, rows, batch_size):
        stop = min(start + batch_size, rows)
        batch = buffer[:stop - start]
        t = time.perf_counter()
        if rank == 0:
            dataset.read_direct(batch, np.s_[start:stop], np.s_[0:stop - start])
        t, seconds["read"] = time.perf_counter(), seconds["read"] + time.perf_counter() - t
        comm.Bcast(batch, root=0)
        t, seconds["bcast"] = time.perf_counter(), seconds["bcast"] + time.perf_counter() - t
        result = np.ascontiguousarray(predict(batch))
        t, seconds["predict"] = time.perf_counter(), seconds["predict"] + time.perf_counter() - t
        if mode == "concat:-1":
            parts = np.empty((size,) + result.shape, result.dtype) if rank == 0 else None
            comm.Gather(result, parts, root=0)
            combined = np.concatenate(list(parts), axis=-1) if rank == 0 else None
        elif mode == "sum":
            combined = np.empty_like(result) if rank == 0 else None
            comm.Reduce(result, combined, op=MPI.SUM, root=0)
        else:
            combined = result
        t, seconds["combine"] = time.perf_counter(), seconds["combine"] + time.perf_counter() - t
        if rank == 0:
            output[start:stop] = combined
        seconds["write"] += time.perf_counter() - t
    if rank == 0:
        t = time.perf_counter()
        target.close()
        source.close()
        seconds["write"] += time.perf_counter() - t
    elapsed = time.perf_counter() - began

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reports = comm.gather({"rank": rank, "seconds": {k: round(v, 6) for k, v in seconds.items()},
                           "peak_rss_bytes": peak}, root=0)
    if rank == 0:
        print(json.dumps({"rows": rows, "loop_seconds": round(elapsed, 6),
                          "rows_per_second": rows / elapsed, "ranks": reports}), flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        # A hand-written loop would hang the other ranks in Bcast; end them all instead.
        traceback.print_exc()
        sys.stderr.flush()
        if MPI.COMM_WORLD.size > 1:
            MPI.COMM_WORLD.Abort(1)
        raise
