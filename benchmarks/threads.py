"""MindSpore's CPU threads against `[device] threads`: what each knob does, and what spmdinfer gets.

    python benchmarks/threads.py [--repeats 5] [--quick] [--wait-idle SECONDS]

On this machine's cores, with the MindSpore backend (MindIR, MindSpore's own CPU runtime):

- knobs: one process predicts a 1024-4096-1024 MLP on 256 rows for 3 s under each of
  MindSpore's thread settings, and under spmdinfer's budget (the backend with threads = 1):
  milliseconds per call, cores used (getrusage CPU seconds per wall second) and the threads
  that did the work (from /proc/self/task; a thread counts above 10% of the busiest).
- budget: `mpiexec -n 1 spmdinfer run` of that MLP with `[device] threads = 1`: the cores the
  rank used while scoring (`--metrics` loop_cpu_seconds over the loop's seconds);
  target <= 1.2.
- replicas: the same job (threads = 1) as one replica (`-n 1`) and as two (`-n 2`),
  alternating: two replicas' rows/s over one's; target >= 1.7 (benchmarks/layouts.py
  measures the same with two-layer slices).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (CpuWatch, add_run_options, alternate_samples, export, print_footer,  # noqa: E402
                    progress_printer, repeats_of, run_spmdinfer_metrics, scratch,
                    wait_for_idle, write_input, write_job)
from suite import MLP, MLP_BATCH, cell, rate, spread, warm  # noqa: E402

BUDGET_TARGET = 1.2
REPLICA_TARGET = 1.7
KNOBS = {
    "MindSpore's defaults": [],
    "set_context(runtime_num_threads=1)": ["runtime_num_threads"],
    "+ device_context.cpu.op_tuning.threads_num(1)": ["runtime_num_threads", "kernel_threads"],
    "+ runtime.dispatch_threads_num(1)": ["runtime_num_threads", "dispatch_threads"],
    "+ runtime.set_cpu_affinity(True, ['0-0'])": ["runtime_num_threads", "set_cpu_affinity"],
    "process bound to 1 core (sched_setaffinity)": ["runtime_num_threads", "bound"],
    "spmdinfer's backend, threads = 1": ["spmdinfer"],
}

# One knob, in a fresh process (MindSpore makes its pool once per process).
PROBE = r"""
import json, os, resource, sys, time
from pathlib import Path
import numpy as np
path, knobs = Path(sys.argv[1]), sys.argv[2:]
os.environ.setdefault("GLOG_v", "3")
if "bound" in knobs:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
if "spmdinfer" in knobs:
    from spmdinfer.backends import Placement, open_session
    session = open_session("mindspore", path, Placement("cpu", None, 0, 1), {})
    predict = lambda x: session.predict([x])[0]
else:
    import mindspore
    from mindspore import nn
    mindspore.set_device("CPU")
    if "runtime_num_threads" in knobs:
        mindspore.set_context(runtime_num_threads=1)
    if "kernel_threads" in knobs:
        mindspore.device_context.cpu.op_tuning.threads_num(1)
    if "dispatch_threads" in knobs:
        mindspore.runtime.dispatch_threads_num(1)
    if "set_cpu_affinity" in knobs:
        mindspore.runtime.set_cpu_affinity(True, affinity_cpu_list=["0-0"])
    graph = nn.GraphCell(mindspore.load(str(path)))
    predict = lambda x: graph(mindspore.Tensor.from_numpy(x)).asnumpy()
tick = os.sysconf("SC_CLK_TCK")

def per_thread():
    times = {}
    for task in os.listdir("/proc/self/task"):
        fields = open(f"/proc/self/task/{task}/stat").read().rsplit(")", 1)[1].split()
        times[task] = (int(fields[11]) + int(fields[12])) / tick
    return times

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

x = np.ones((256, 1024), np.float32)
predict(x)
threads, began, c0, calls = per_thread(), time.perf_counter(), cpu(), 0
while time.perf_counter() - began < 3.0:
    predict(x)
    calls += 1
wall, used, after = time.perf_counter() - began, cpu() - c0, per_thread()
busy = sorted((after[t] - threads.get(t, 0.0) for t in after), reverse=True)
print(json.dumps({"ms": wall / calls * 1e3, "cores": used / wall,
                  "threads": sum(1 for b in busy if b > 0.1 * busy[0])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser, quick="one repeat, a smaller input")
    args = parser.parse_args()
    began = time.monotonic()
    with scratch("threads") as folder:
        report(folder, repeats_of(args), args.quick, args.wait_idle, began)


def build(folder: Path, quick: bool) -> tuple[Path, Path, Path]:
    """The whole MLP as a 1-rank MindIR slice, its input, and its job (threads = 1)."""
    from mindspore import Parameter, Tensor, nn, ops

    class Whole(nn.Cell):
        def __init__(self, w1, b1, w2):
            super().__init__()
            self.w1 = Parameter(Tensor(w1), name="w1")
            self.b1 = Parameter(Tensor(b1), name="b1")
            self.w2 = Parameter(Tensor(w2), name="w2")
            self.matmul = ops.MatMul()

        def construct(self, x):
            return self.matmul(ops.relu(self.matmul(x, self.w1) + self.b1), self.w2)

    d_in, hidden, d_out = MLP
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hidden, d_out)) / np.sqrt(hidden)).astype(np.float32)
    slice_path = export(Whole(w1, b1, w2), [d_in], folder / "mlp.mindir")
    data = write_input(folder / "mlp.h5", 4096 if quick else 16384, d_in)
    job = write_job(folder, "budget", {
        "model": {"files": "mlp.mindir", "ranks": 1, "backend": "mindspore"},
        "device": {"threads": 1},
        "input": {"file": "mlp.h5", "batch_size": MLP_BATCH, "datasets": {"x": "/x"}},
        "output": {"file": "out/budget.h5", "datasets": {"y": "/y"}},
    })
    return slice_path, data, job


def knob(path: Path, knobs: list[str], idle: float) -> dict:
    wait_for_idle(idle)
    result = subprocess.run([sys.executable, "-c", PROBE, str(path), *knobs], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "GLOG_v": "3"})
    if result.returncode != 0:
        raise SystemExit(f"probe {knobs} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def scored(job: Path, data: Path, n: int, idle: float) -> dict:
    """One `spmdinfer run` of `job` on `n` ranks: rows/s and rank 0's cores while scoring."""
    warm(data)
    wait_for_idle(idle)
    metrics = run_spmdinfer_metrics(job, n)
    loop = metrics["wall_seconds"] - metrics["load_seconds"]
    return {"rate": metrics["rows_per_second"],
            "cores": metrics["ranks"][0]["loop_cpu_seconds"] / loop}


def report(folder: Path, repeats: int, quick: bool, idle: float, began: float) -> None:
    progress = progress_printer(began)
    watch = CpuWatch()
    progress(f"building the MLP slice and its input in {folder}")
    slice_path, data, job = build(folder, quick)
    progress(f"knobs: {len(KNOBS)} settings, {repeats} alternating probe(s) of 3 s each")
    knobs = alternate_samples({name: (lambda k=k: knob(slice_path, k, idle))
                               for name, k in KNOBS.items()}, repeats)
    progress(f"budget and replicas: {repeats} alternating runs")
    runs = alternate_samples({
        "one replica": lambda: scored(job, data, 1, idle),
        "two replicas": lambda: scored(job, data, 2, idle),
    }, repeats)
    progress("done")

    print(f"\nMindSpore's CPU threads ({repeats} alternating run(s), medians; MLP "
          f"{'-'.join(map(str, MLP))}, 256 rows a call)\n")
    header = f"{'setting':<48} {'ms/call':>8}  {'cores used':>10}  {'threads working':>15}"
    print(header)
    print("-" * len(header))
    for name, samples in knobs.items():
        print(f"{name:<48} {statistics.median(s['ms'] for s in samples):>8.1f}  "
              f"{statistics.median(s['cores'] for s in samples):>10.2f}  "
              f"{statistics.median(s['threads'] for s in samples):>15.0f}")

    cores = [s["cores"] for s in runs["one replica"]]
    used = statistics.median(cores)
    print(f"\nspmdinfer run, 1 rank, [device] threads = 1: {used:.2f} cores while scoring "
          f"({spread(cores, '', 2)}); target <= {BUDGET_TARGET}: "
          f"{'PASS' if used <= BUDGET_TARGET else 'BELOW'}")
    one = [s["rate"] for s in runs["one replica"]]
    two = [s["rate"] for s in runs["two replicas"]]
    ratio = statistics.median(b / a for a, b in zip(one, two))
    print(f"replicas, threads = 1: one {cell(rate(statistics.median(one)), spread(one))}, "
          f"two {cell(rate(statistics.median(two)), spread(two))}: {ratio:.2f}x; "
          f"target >= {REPLICA_TARGET}: {'PASS' if ratio >= REPLICA_TARGET else 'BELOW'}")
    print_footer(watch, began)


if __name__ == "__main__":
    main()
