"""jobs/gpt's generation loop as a user would write it by hand with mpi4py, MindSpore and h5py:
the baseline of benchmarks/generation.py.

    mpiexec -n 2 python benchmarks/generation_loop.py JOB.toml

It reads the job's files, prompts dataset and step settings (jobs/gpt/job.toml's shape) and
does the obvious thing: every rank joins one MindSpore cluster (spmdinfer.cluster.join_world,
the helper export scripts use) and loads its init and step graphs; rank 0 reads each batch
of prompts and `comm.Bcast`s it; every rank runs init, then step up to `repeat` times, each
time on the outputs of the one before, stopping once every row has given the end token; rank
0 writes the tokens (the end token after each row's end) and lengths into preallocated h5py
datasets of `OUTPUT.plain.h5`. Both graphs run once on a row of zeros before the clock
starts; MindSpore's settings are its defaults. Rank 0 prints one JSON line: the loop's
seconds (first batch to the file closed, after loading), rows/s and tokens/s (generated
tokens, to each row's end).
"""

from __future__ import annotations

import json
import os
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

from spmdinfer.cluster import join_world


def main() -> None:
    job_path = Path(sys.argv[1]).resolve()
    job, here = tomllib.loads(job_path.read_text()), job_path.parent
    os.environ.setdefault("GLOG_v", "3")
    rank, ranks = join_world("cpu")
    import h5py
    import mindspore
    from mindspore import Tensor, nn
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    init, step = (nn.GraphCell(mindspore.load(str(here / f.format(rank=rank))))
                  for f in job["model"]["files"])
    repeat = job["steps"][1]["repeat"]
    end = job["steps"][1]["until"]["equals"]
    batch_size = job["input"]["batch_size"]

    source = target = None
    if rank == 0:
        source = h5py.File(here / job["input"]["file"], "r")
        prompts = source[job["input"]["datasets"]["prompt"]]
        shape = prompts.shape
        out = here / job["output"]["file"]
        out.parent.mkdir(parents=True, exist_ok=True)
        target = h5py.File(out.with_name(out.name + ".plain.h5"), "w")
        tokens = target.create_dataset("tokens", (shape[0], repeat), dtype=np.int32)
        lengths = target.create_dataset("length", (shape[0],), dtype=np.int32)
    rows, width = comm.bcast(shape if rank == 0 else None)
    buffer = np.empty((batch_size, width), np.int32)
    step(*init(Tensor.from_numpy(buffer[:1] * 0)))  # both graphs run once before the clock starts
    comm.Barrier()

    began = time.perf_counter()
    generated = 0
    for start in range(0, rows, batch_size):
        batch = buffer[:min(batch_size, rows - start)]
        if rank == 0:
            prompts.read_direct(batch, np.s_[start:start + len(batch)])
        comm.Bcast(batch, root=0)
        state = init(Tensor.from_numpy(batch))
        made = np.full((len(batch), repeat), end, np.int32)
        length = np.full(len(batch), repeat, np.int32)
        for i in range(repeat):
            state = step(*state)
            token = state[0].asnumpy()
            made[:, i] = token
            length[(token == end) & (length == repeat)] = i + 1
            if (length <= i + 1).all():
                break
        made[np.arange(repeat)[None, :] >= length[:, None]] = end
        if rank == 0:
            tokens[start:start + len(batch)] = made
            lengths[start:start + len(batch)] = length
            generated += int(length.sum())
    if rank == 0:
        target.close()
        source.close()
    elapsed = time.perf_counter() - began
    if rank == 0:
        print(json.dumps({"rows": rows, "tokens": generated, "loop_seconds": round(elapsed, 6),
                          "rows_per_second": rows / elapsed,
                          "tokens_per_second": generated / elapsed}), flush=True)


if __name__ == "__main__":
    main()
