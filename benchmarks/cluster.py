"""How long forming a MindSpore collective cluster takes, and what it is made of.

    python benchmarks/cluster.py [-n 8] [--repeats 5]

Runs `mpiexec -n N spmdinfer run jobs/matmul_allgather/job.toml` (8 AllGather slices, so
every rank joins one cluster) with SPMDINFER_LOG_LEVEL=INFO and reads each rank's
"joined MindSpore cluster" line. Per run it reports the cluster phase as the slowest rank
saw it (from the phase's start until every worker has joined), and its parts: importing
MindSpore (each rank; the scheduler imports it at the same time), waiting for the scheduler
to listen, and MindSpore's init(). A plain `import mindspore` is part of every MindSpore
job, so "formed" also reports the phase less the import: what the cluster itself adds.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "matmul_allgather" / "job.toml"
LINE = re.compile(r"joined MindSpore cluster \d+ as worker (\d+) of \d+ in ([\d.]+) s: import "
                  r"mindspore ([\d.]+) s, then waited ([\d.]+) s for the scheduler .*init\(\) "
                  r"([\d.]+) s")


def mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else "mpiexec"


def one_run(n: int) -> dict:
    env = {**os.environ, "SPMDINFER_LOG_LEVEL": "INFO", "GLOG_v": "3"}
    began = time.monotonic()
    result = subprocess.run([mpiexec(), "-n", str(n), sys.executable, "-m", "spmdinfer", "run",
                             str(JOB), "--overwrite", "--no-progress"], capture_output=True,
                            text=True, env=env, cwd=REPO, check=False)
    wall = time.monotonic() - began
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    rows = [tuple(map(float, m.groups()[1:])) for m in LINE.finditer(result.stderr)]
    if len(rows) != n:
        raise SystemExit(f"expected {n} joined lines, got {len(rows)}:\n{result.stderr[-2000:]}")
    phase = max(r[0] for r in rows)
    return {"phase": phase, "import": max(r[1] for r in rows), "scheduler": max(r[2] for r in rows),
            "init": max(r[3] for r in rows),
            "formed": max(r[0] - r[1] for r in rows), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=8, help="ranks (the job has 8 slices: 8)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs = [one_run(args.n) for _ in range(args.repeats)]
    print(f"{args.n} ranks, {args.repeats} runs (median [min, max], seconds; load average "
          f"{os.getloadavg()[0]:.2f} at the end)")
    for key, what in [("phase", "cluster phase (slowest rank)"),
                      ("formed", "  of which the cluster itself (phase less import)"),
                      ("import", "  import mindspore (slowest rank)"),
                      ("scheduler", "  then waiting for the scheduler"),
                      ("init", "  MindSpore init() (slowest rank)"),
                      ("wall", "whole job, mpiexec to exit")]:
        values = [r[key] for r in runs]
        print(f"{what:52s} {statistics.median(values):6.2f}  [{min(values):.2f}, {max(values):.2f}]")


if __name__ == "__main__":
    main()
