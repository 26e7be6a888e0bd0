"""spmdinfer over two hosts against the plain loop and raw mpi4py, on hosts emulated here.

    python benchmarks/hosts.py [--repeats 5] [--quick] [--wait-idle SECONDS]

Needs root and MPICH's mpiexec (the `mpich` extra). One rank on each of two hosts, n1 and n2,
emulated on this machine as the tests do (tests/emulated-host: each host a UTS namespace of
its own, so MPI sees two nodes; every byte on loopback; UCX between the hosts without
cross-memory attach, UCX_TLS=^cma, see tests/emulated_hosts.py), alternating:

- the suite's I/O-bound and compute-bound jobs (benchmarks/suite.py: ONNX Runtime, 1 thread
  per rank): spmdinfer's rows/s over the plain mpi4py loop's (benchmarks/plain_loop.py), both
  across the two hosts; target >= 1.0. Across hosts a group exchanges its batches by
  message (its ranks share no memory), which is what this measures.
- broadcast: spmdinfer's Channel.bcast_packet against a raw comm.Bcast of the same buffer
  between the hosts, 16 MiB and 256 MiB.

The same jobs on one host (shared memory) are shown for scale. The emulated hosts are one
machine: messages between them go through UCX's shared-memory transports, not a network, so
the figures say what the runner adds to MPI's own costs, not what a real network gives.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from common import (CpuWatch, MPIEXEC, add_run_options, alternate_samples, print_footer,  # noqa: E402
                    progress_printer, repeats_of, run_mpi_json, scratch, wait_for_idle)
from suite import (MiB, build, cell, others, plain_sample, rate, size_name,  # noqa: E402
                   spmdinfer_sample, spread)
from tests.emulated_hosts import hosts_command  # noqa: E402

TARGET = 1.0
SIZES = (16 * MiB, 256 * MiB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser, quick="one repeat, smaller inputs")
    args = parser.parse_args()
    os.environ.setdefault("UCX_NET_DEVICES", "lo")  # MPICH's UCX on loopback, as in the tests
    began = time.monotonic()
    with scratch("hosts") as folder:
        report(folder, repeats_of(args), args.quick, args.wait_idle, began)


def report(folder: Path, repeats: int, quick: bool, idle: float, began: float) -> None:
    progress = progress_printer(began)
    watch = CpuWatch()
    progress(f"building slices and inputs in {folder}")
    jobs = build(folder, quick)
    hosts = hosts_command(MPIEXEC, 1, 1)
    samples = {}
    for case in ("I/O-bound", "compute-bound"):
        data, job, n = (jobs[case][k] for k in ("data", "job", "ranks"))
        progress(f"{case}: {repeats} alternating runs of each loop, over two hosts and on one")
        samples[case] = alternate_samples({
            "spmdinfer": lambda: spmdinfer_sample(data, job, n, idle, hosts),
            "plain": lambda: plain_sample(data, job, n, idle, hosts),
            "spmdinfer, one host": lambda: spmdinfer_sample(data, job, n, idle),
            "plain, one host": lambda: plain_sample(data, job, n, idle),
        }, repeats)
    progress(f"broadcast between the hosts: {', '.join(size_name(s) for s in SIZES)}")
    wait_for_idle(idle)
    bcast = run_mpi_json(HERE / "suite.py", ["--bcast-worker", "--repeats", repeats,
                                             "--sizes", *SIZES], 2, hosts)
    progress("done")

    print(f"\nspmdinfer over two emulated hosts (1 rank each): medians of {repeats} alternating "
          f"run(s); ratio: the median of the back-to-back pairs' ratios\n")
    header = f"{'case':<28} {'spmdinfer':>34}  {'plain loop':>34}  {'ratio':>6}  {'target':>7}  " \
             f"{'verdict':<7}  others"
    print(header)
    print("-" * len(header))
    for case in ("I/O-bound", "compute-bound"):
        for where, ours, plain in (("two hosts", "spmdinfer", "plain"),
                                   ("one host", "spmdinfer, one host", "plain, one host")):
            a = [s["rate"] for s in samples[case][ours]]
            b = [s["rate"] for s in samples[case][plain]]
            ratio = statistics.median(x / y for x, y in zip(a, b))
            verdict = ("PASS" if ratio >= TARGET else "BELOW") if where == "two hosts" else ""
            target = f">= {TARGET:.2f}" if where == "two hosts" else ""
            print(f"{case + ', ' + where:<28} {cell(rate(statistics.median(a)), spread(a)):>34}  "
                  f"{cell(rate(statistics.median(b)), spread(b)):>34}  {ratio:>5.2f}x  "
                  f"{target:>7}  {verdict:<7}  {others(samples[case])}")
    for size in SIZES:
        bandwidth = {k: [size / t / 2 ** 30 for t in v] for k, v in bcast[str(size)].items()}
        packet, raw = (statistics.median(bandwidth[k]) for k in ("packet", "raw"))
        print(f"{'broadcast ' + size_name(size) + ', two hosts':<28} "
              f"{cell(f'{packet:.2f} GiB/s', spread(bandwidth['packet'], '', 2)):>34}  "
              f"{cell(f'{raw:.2f} GiB/s', spread(bandwidth['raw'], '', 2)):>34}  "
              f"{packet / raw:>5.2f}x  (raw comm.Bcast)")
    print("\nsetup:")
    for case in ("I/O-bound", "compute-bound"):
        print(f"  {case:<14} {jobs[case]['setup']}")
    print(f"  launcher       {' '.join(hosts)}")
    print_footer(watch, began)


if __name__ == "__main__":
    main()
