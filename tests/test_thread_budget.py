"""`[device] threads` holds with MindSpore on CPU: its kernels run on at most that many cores.

MindSpore sizes its CPU pool from the process's CPU mask at its first graph run, whatever
`runtime_num_threads` says, and the thread that calls a graph works beside its pool
(spmdinfer.backends.mindspore._on_cores). These tests run the backend in a fresh process
(the pool is made once per process) and read, from /proc/self/task, the CPU masks of the
threads that did the predicting: masks, not speeds, so a busy machine does not change the
verdict (the one figure, CPU seconds per wall second, a busy machine can only lower).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from .conftest import export_mindir, matmul_job, run_cli, write_h5, write_job

PROBE = r"""
import json, os, resource, sys, threading, time
from pathlib import Path
import numpy as np
from spmdinfer.backends import Placement, open_session

tick = os.sysconf("SC_CLK_TCK")

def per_thread():
    times = {}
    for task in os.listdir("/proc/self/task"):
        fields = open(f"/proc/self/task/{task}/stat").read().rsplit(")", 1)[1].split()
        times[int(task)] = (int(fields[11]) + int(fields[12])) / tick
    return times

def process_cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

def mask(task):
    return sorted(os.sched_getaffinity(task))

before = sorted(os.sched_getaffinity(0))
session = open_session("mindspore", Path(sys.argv[1]),
                       Placement("cpu", None, 0, int(sys.argv[2])), {})
loaded = sorted(os.sched_getaffinity(0))
existing = set(per_thread())
x = np.ones((256, 512), np.float32)
first = session.predict([x])[0]
start, began, wall = per_thread(), process_cpu(), time.monotonic()
while process_cpu() - began < 1.5:  # enough CPU time for the 10 ms ticks to tell threads apart
    session.predict([x])
used = (process_cpu() - began) / (time.monotonic() - wall)
end = per_thread()
busy = {t: end[t] - start.get(t, 0.0) for t in end}
caller = threading.get_native_id()
print(json.dumps({
    "before": before,
    "loaded": loaded,
    "caller": mask(caller),
    "existing": sorted({tuple(mask(t)) for t in existing if t != caller and t in end}),
    "workers": [mask(t) for t in end if t != caller and busy[t] > 0.1 * max(busy.values())],
    "pool": [mask(t) for t in end if t != caller and t not in existing],
    "used": used,
    "sum": float(first.sum()),
}))
"""


@pytest.fixture(scope="session")
def wide_mlp(tmp_path_factory):
    """An MLP slice with enough work per call for MindSpore to spread it over its pool."""
    from mindspore import Parameter, Tensor, nn, ops

    class MLP(nn.Cell):
        def __init__(self, w1, w2):
            super().__init__()
            self.w1, self.w2 = Parameter(Tensor(w1), name="w1"), Parameter(Tensor(w2), name="w2")
            self.matmul = ops.MatMul()

        def construct(self, x):
            return self.matmul(ops.relu(self.matmul(x, self.w1)), self.w2)

    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((512, 2048)) * 0.05).astype(np.float32)
    w2 = (rng.standard_normal((2048, 512)) * 0.05).astype(np.float32)
    path = export_mindir(MLP(w1, w2), [Tensor(np.zeros((256, 512), np.float32))],
                         tmp_path_factory.mktemp("budget") / "mlp.mindir")
    return path, np.maximum(np.ones((256, 512), np.float32) @ w1, 0) @ w2


def probe(path, threads: int) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, str(path), str(threads)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "GLOG_v": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_one_thread_predicts_on_one_core_at_a_time(wide_mlp):
    """threads = 1 on a 2-core mask: MindSpore's threads, and any thread that does the
    predicting, stay on one core (without the budget its pool spreads each call over both,
    and so does the calling thread, which helps with the kernels), the calling thread has
    its whole mask again between runs, and the threads that were there before (the
    runner's) keep theirs (spmdinfer.backends.mindspore._on_cores)."""
    path, expected = wide_mlp
    seen = probe(path, 1)
    assert len(seen["before"]) >= 2, f"this test needs 2 cores or more: {seen['before']}"
    budget = seen["before"][:1]
    # The pool MindSpore made at the first run, whether or not it did the work: on some CPUs
    # (an AVX-512 EPYC, 2026-12-06) the calling thread ran nearly every kernel itself and
    # the pool's threads 1% of them, where elsewhere the pool did most.
    assert seen["pool"] and all(mask == budget for mask in seen["pool"]), seen
    assert all(mask == budget for mask in seen["workers"]), seen
    assert seen["caller"] == seen["loaded"] == seen["before"], seen
    assert seen["existing"] == [seen["before"]], seen
    # CPU seconds per wall second while predicting: a busy machine can only lower it.
    assert seen["used"] <= 1.2, seen
    assert np.isclose(seen["sum"], float(expected.sum()), rtol=1e-4)


HELPER_HOOKS = '''
import json, os, threading
from spmdinfer.topology import launcher_rank

def _note(kind):
    path = os.path.join(os.path.dirname(__file__), f"{kind}-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"rank": launcher_rank(),
                   "thread": threading.current_thread().name,
                   "mask": sorted(os.sched_getaffinity(0))}, f)

def pre(batch):
    _note("pre")
    return batch

def post(batch):
    _note("post")
    return batch
'''


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 2])
def test_prefetch_and_commit_threads_keep_off_the_predicting_cores(tmp_path, onnx_matmul_slices, n):
    """`threads = 1` with MPICH's unbound ranks: the prefetch thread (which runs the
    preprocess) and the commit thread (which runs the postprocess) of a replica's leader run
    on the cores the node's ranks do not predict on (1 rank on 2 cores: the second core;
    without the pinning they may take any core of the mask), and keep the rank's whole mask
    where no core is left over (2 ranks on 2 cores; topology.helper_cores says why)."""
    template, _ = onnx_matmul_slices
    mask = sorted(os.sched_getaffinity(0))
    assert len(mask) >= 2, f"this test needs 2 cores or more: {mask}"
    (tmp_path / "where.py").write_text(HELPER_HOOKS)
    write_h5(tmp_path / "in.h5", {"x": np.ones((40, 96), np.float32)})
    doc = matmul_job(tmp_path, template, ranks=1, batch_size=10, device={"threads": 1})
    doc["input"]["preprocess"] = "where:pre"
    doc["output"]["postprocess"] = "where:post"
    result = run_cli("run", write_job(tmp_path, doc), "--no-progress", n=n)
    assert result.returncode == 0, result.stderr
    seen = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*-*.json"))]
    spare = mask[n:]                                  # the ranks predict on mask[:n]
    for note in seen:
        assert note["mask"] == (spare or mask), (note, mask)
    assert {(n["rank"], n["thread"]) for n in seen} == \
        {(r, "spmdinfer-prefetch") for r in range(n)} | {(0, "spmdinfer-commit")}, seen
