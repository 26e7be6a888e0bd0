"""Where an 8-rank start goes, against the floor of loading the slices by hand.

    python benchmarks/startup.py [--repeats 5] [--quick] [--wait-idle SECONDS] [--ranks 8]
                                 [--case independent|collective]

Two cases, MindSpore's own runtime on MindIR slices, each run alternating (wall time of the
whole `mpiexec`, from its start to its exit):

- independent slices: the seed's MatMul y = -(x @ W), W (96, 16), in 8 column slices;
  the floor is `mpiexec -n 8 python -c "import mindspore; load this rank's slice; predict
  8 rows once"` (MindSpore compiles a graph on its first run, which scoring cannot skip).
- a collective cluster: the AllGather slices of tests/export_collectives.py (exported under
  a real MindSpore cluster); the floor joins the cluster as a user's script would
  (spmdinfer.cluster.join_world), loads the slice, predicts once and leaves as spmdinfer
  does (spmdinfer.cluster.leave: MindSpore's own teardown at exit ends the job with a signal).

spmdinfer runs `spmdinfer run` on 8 rows (one batch), so its time is its start-up plus one
tiny batch and the output file. Target: spmdinfer's wall time <= 1.10x the floor's. The
phases (`--metrics` startup_seconds, the slowest rank's) show where its time goes.
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
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import (CpuWatch, RUN_TIMEOUT, add_run_options, alternate_samples, export,  # noqa: E402
                    launcher, print_footer, progress_printer, repeats_of, scratch,
                    wait_for_idle, write_input, write_job)

TARGET = 1.10
CASES = {"independent slices": "independent", "a collective cluster": "collective"}
FLOOR = r"""
import os, sys
import numpy as np
rank = int(os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
os.environ.setdefault("GLOG_v", "3")
import mindspore
from mindspore import nn
if sys.argv[2] == "cluster":
    from spmdinfer.cluster import join_world
    join_world("cpu")  # sets the device
else:
    mindspore.set_device("CPU")
graph = nn.GraphCell(mindspore.load(sys.argv[1].format(rank=rank)))
graph(mindspore.Tensor(np.ones((8, 96), np.float32))).asnumpy()  # compiled on its first run
if sys.argv[2] == "cluster":  # the cluster's scheduler lives in rank 0: leave together
    from spmdinfer.cluster import leave  # MindSpore's own exit kills the launcher's job
    leave(0)
"""
PHASES = ("launch", "discover", "preflight", "check_devices", "form_cluster", "load", "schedule",
          "start_collector", "assemble")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser, quick="one repeat")
    parser.add_argument("--ranks", type=int, default=8, help="ranks per job (default 8)")
    parser.add_argument("--case", choices=list(CASES.values()), action="append",
                        help="run this case only (repeatable; default: both)")
    args = parser.parse_args()
    began = time.monotonic()
    with scratch("startup") as folder:
        report(folder, repeats_of(args), args.ranks, args.wait_idle, began,
               args.case or list(CASES.values()))


def build(folder: Path, ranks: int) -> dict:
    """The slices, an 8-row input and a job per case."""
    from mindspore import Parameter, Tensor, nn, ops

    class MatMulNeg(nn.Cell):
        def __init__(self, weight):
            super().__init__()
            self.weight = Parameter(Tensor(weight), name="w")
            self.matmul = ops.MatMul()

        def construct(self, x):
            return -self.matmul(x, self.weight)

    weight = np.full((96, 16), 0.5, np.float32)
    width = 16 // ranks
    for r in range(ranks):
        export(MatMulNeg(np.ascontiguousarray(weight[:, r * width:(r + 1) * width])), [96],
               folder / f"matmul{r}.mindir")
    env = {**os.environ, "GLOG_v": "3", "PYTHONPATH": str(REPO)}
    result = subprocess.run([*launcher(ranks), sys.executable, "-m", "tests.export_collectives",
                             str(folder)], cwd=REPO, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"exporting the collective slices failed:\n{result.stderr[-3000:]}")
    write_input(folder / "in.h5", 8, 96)
    cases = {}
    for case, files, mode in (("independent slices", "matmul{rank}.mindir", "plain"),
                              ("a collective cluster", "allgather{rank}.mindir", "cluster")):
        job = write_job(folder, mode, {
            "model": {"files": files, "ranks": ranks, "backend": "mindspore"},
            "input": {"file": "in.h5", "batch_size": 8, "datasets": {"x": "/x"}},
            "output": {"file": f"out/{mode}.h5", "datasets": {"y": "/y"},
                       "combine": {"y": "concat:-1" if mode == "plain" else "rank0"}},
        })
        cases[case] = {"job": job, "slices": str(folder / files), "mode": mode}
    return cases


def timed(command: list[str]) -> float:
    began = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                            env={**os.environ, "GLOG_v": "3"}, cwd=REPO)
    seconds = time.monotonic() - began
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {result.returncode}):\n"
                         f"{result.stdout[-1000:]}{result.stderr[-3000:]}")
    return seconds


# Floor runs that failed and were run again. The collective floor ends with exit 15 now and
# then (hydra: a rank's "EXIT CODE: 9", the rest "Terminated"), at spmdinfer's commit
# 294d158 too; spmdinfer's own runs are never run again.
floor_failures: list[str] = []


def floor_run(case: dict, ranks: int, idle: float) -> dict:
    command = [*launcher(ranks), sys.executable, "-c", FLOOR, case["slices"], case["mode"]]
    for attempt in (1, 2):
        wait_for_idle(idle)
        try:
            return {"wall": timed(command)}
        except SystemExit as exc:
            if attempt == 2:
                raise
            said = [line.strip(" =") for line in str(exc).splitlines()
                    if "failed (exit" in line or "EXIT" in line]
            floor_failures.append(f"{case['mode']}: {' / '.join(said)}")


def spmdinfer_run(case: dict, ranks: int, idle: float) -> dict:
    wait_for_idle(idle)
    metrics = case["job"].with_name(case["job"].stem + ".metrics.json")
    wall = timed([*launcher(ranks), sys.executable, "-m", "spmdinfer", "run", str(case["job"]),
                  "--overwrite", "--no-progress", "--metrics", str(metrics)])
    seen = json.loads(metrics.read_text())
    phases = {p: max(r["startup_seconds"].get(p, 0.0) for r in seen["ranks"]) for p in PHASES}
    phases["batch and finish"] = seen["wall_seconds"] - seen["load_seconds"]
    # The rest: mpiexec starting the ranks before they start, rank 0's metrics, MPI_Finalize
    # and the interpreters' exit (MindSpore's teardown), on rank 0's clock.
    phases["exit and the rest"] = wall - rank0_launch(seen) - seen["wall_seconds"]
    return {"wall": wall, "phases": phases}


def rank0_launch(metrics: dict) -> float:
    return metrics["ranks"][0]["startup_seconds"]["launch"]


def report(folder: Path, repeats: int, ranks: int, idle: float, began: float,
           chosen: list[str]) -> None:
    progress = progress_printer(began)
    watch = CpuWatch()
    progress(f"exporting {ranks} independent and {ranks} collective slices in {folder}")
    cases = build(folder, ranks)
    samples = {}
    for name, case in cases.items():
        if CASES[name] not in chosen:
            continue
        progress(f"{name}: {repeats} alternating runs of the floor and spmdinfer, {ranks} ranks")
        samples[name] = alternate_samples({
            "floor": lambda: floor_run(case, ranks, idle),
            "spmdinfer": lambda: spmdinfer_run(case, ranks, idle),
        }, repeats)
    progress("done")

    print(f"\nstart-up of {ranks} ranks, MindSpore on CPU: medians of {repeats} alternating run(s), "
          "wall seconds from mpiexec's start to its exit\n")
    header = f"{'case':<22} {'floor s':>8}  {'spmdinfer s':>11}  {'ratio':>6}  {'target':>7}  verdict"
    print(header)
    print("-" * len(header))
    for name, runs in samples.items():
        floor = [s["wall"] for s in runs["floor"]]
        ours = [s["wall"] for s in runs["spmdinfer"]]
        ratio = statistics.median(b / a for a, b in zip(floor, ours))
        print(f"{name:<22} {statistics.median(floor):>8.2f}  {statistics.median(ours):>11.2f}  "
              f"{ratio:>5.2f}x  {'<= ' + format(TARGET, '.2f'):>7}  "
              f"{'PASS' if ratio <= TARGET else 'ABOVE'}")
    print("\nspmdinfer's phases (seconds, medians; each start-up phase the slowest rank's; launch "
          "= process start to run_job: interpreter, imports, MPI_Init; batch and finish: the "
          "one batch, the output file, the final agreement; exit and the rest: the wall time "
          "left, mpiexec's start of the ranks, MPI_Finalize and the interpreters' exit):")
    columns = [*PHASES, "batch and finish", "exit and the rest"]
    for name, runs in samples.items():
        print(f"  {name}:")
        for column in columns:
            print(f"    {column:<18} {statistics.median(s['phases'][column] for s in runs['spmdinfer']):7.3f}")
    if floor_failures:
        print(f"\nfloor runs that failed and were run again: {len(floor_failures)}")
        for failure in floor_failures:
            print(f"  {failure}")
    print_footer(watch, began)


if __name__ == "__main__":
    main()
