"""Replicas and pipeline stages on this machine, measured in one run.

    python benchmarks/layouts.py [--repeats 3]

Prints, from alternating runs of the same slices and data:
- replicas: rows/s of 2 replicas of a compute-bound MLP vs 1 replica (target >= 1.6x);
- pipeline: rows/s of the MLP's two layers as 2 streaming stages on 2 ranks vs the same two
  graphs run back to back by one rank as a 2-step program (target > 1x).
Every rank uses one CPU thread, so the comparisons hold the work per core equal. Both
backends run: ONNX Runtime (no spinning threads) shows what the runner's layouts give;
MindSpore's own runtime keeps an actor and a kernel thread spinning while it predicts, so one
MindSpore rank already occupies both cores of this machine and replicas cannot add much.
"""

from __future__ import annotations

import argparse

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from common import alternate, export, export_onnx, run_spmdinfer, workdir, write_input, write_job

HIDDEN = 2048
WIDTH = 512


class Layer(nn.Cell):
    def __init__(self, weight):
        super().__init__()
        self.weight = Parameter(Tensor(weight), name="w")
        self.matmul = ops.MatMul()

    def construct(self, x):
        return ops.relu(self.matmul(x, self.weight))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=16384)
    args = parser.parse_args()

    folder = workdir("layouts")
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((WIDTH, HIDDEN)) / np.sqrt(WIDTH)).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, WIDTH)) / np.sqrt(HIDDEN)).astype(np.float32)
    for suffix, save in ((".mindir", export), (".onnx", export_onnx)):
        save(Layer(w1), [WIDTH], folder / f"layer_0{suffix}")
        save(Layer(w2), [HIDDEN], folder / f"layer_1{suffix}")
    write_input(folder / "in.h5", args.rows, WIDTH)

    def job(name, backend, files, ranks, stages=1, steps=None):
        doc = {"model": {"files": files, "ranks": ranks, "stages": stages, "backend": backend},
               "device": {"threads": 1},
               "input": {"file": "in.h5", "batch_size": 256, "datasets": {"x": "/x"}},
               "output": {"file": f"out_{name}.h5", "datasets": {"y": "/y"}}}
        if steps:
            doc["steps"] = steps
        return write_job(folder, name, doc)

    for backend, suffix in (("onnxruntime", ".onnx"), ("mindspore", ".mindir")):
        graphs = [str(folder / f"layer_0{suffix}"), str(folder / f"layer_1{suffix}")]
        program = job(f"program_{backend}", backend, graphs, 1,
                      steps=[{"graph": 0}, {"graph": 1, "feed": {"x": "output0"}}])
        pipeline = job(f"pipeline_{backend}", backend, str(folder / f"layer_{{rank}}{suffix}"), 2,
                       stages=2)
        medians = alternate({
            "1 replica": lambda: run_spmdinfer(program, 1),
            "2 replicas": lambda: run_spmdinfer(program, 2),
            "2 stages, streaming": lambda: run_spmdinfer(pipeline, 2),
        }, args.repeats)
        print(f"[{backend}]")
        for name, rate in medians.items():
            print(f"  {name:>20}: {rate:10.1f} rows/s (median of {args.repeats})")
        replicas = medians["2 replicas"] / medians["1 replica"]
        streaming = medians["2 stages, streaming"] / medians["1 replica"]
        print(f"  replicas: 2 vs 1 replica: {replicas:.2f}x (target >= 1.60)")
        print(f"  pipeline: 2 streaming stages vs the same graphs back to back: {streaming:.2f}x "
              "(target > 1.00)")


if __name__ == "__main__":
    main()
