"""The performance suite: spmdinfer against a hand-written mpi4py loop, on this machine, in one go.

    python benchmarks/suite.py [--repeats 5] [--quick] [--keep]

Builds its own slices and HDF5 inputs in a temporary folder, then runs, alternating, spmdinfer
(`mpiexec -n N python -m spmdinfer run JOB --metrics FILE`) and benchmarks/plain_loop.py (the
same job file, slices, data, batch size, threads per rank and backend) and prints medians:

- I/O-bound: a small model (256 -> 16 MatMul, column slices) on ~100 MB of float32, 2 ranks;
  spmdinfer rows/s / plain rows/s, target >= 1.25.
- compute-bound: an MLP 1024-4096-1024, row-parallel in 2 (each rank half the hidden units,
  combine "sum"), 2 ranks; target >= 0.98.
- oversubscribed: the small model in 8 slices, 8 ranks on this machine's cores; target >= 2.
- memory: rank 0's peak RSS with a 1 GiB input minus with the ~100 MB one; target <= 64 MiB.
  The 1 GiB runs' rows/s are shown too, as a steadier I/O-bound row (target >= 1.25).
- broadcast: spmdinfer.comm.Channel.bcast_packet vs a raw comm.Bcast of the same buffer,
  16 MiB, 256 MiB and 2.5 GiB, 2 ranks; bandwidth ratio, target >= 0.9.

Every rank runs 1 CPU thread (`[device] threads = 1`). The model cases run with both
backends, the same cells exported twice: ONNX Runtime (intra-op threads 1, no spinning, in
both loops) and MindSpore's own CPU runtime on MindIR slices (the default backend; the plain
loop sets `runtime_num_threads`, as a user would, which MindSpore does not keep to: see
benchmarks/threads.py). MindSpore's targets: I/O-bound (1 GiB) >= 1.4, compute-bound >= 1.05,
oversubscribed >= 2.5, memory <= 64 MiB. `--backend` runs one of them only.
Each input file is read once before every run, so both loops find it in the page cache.
Then it prints where each rank's time goes (spmdinfer's --metrics seconds and the plain
loop's own clock), a machine line, the code measured, and how much CPU other processes
took meanwhile (they disturb timings on a small machine; before each run the suite waits
up to --wait-idle seconds for the CPU to be idle). --quick: one repeat, smaller compute and
oversubscribed inputs, no 2.5 GiB broadcast.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (DISTURBED, CpuWatch, add_run_options, alternate_samples,  # noqa: E402
                    code_state, export, export_onnx, machine, progress_printer, repeats_of, run_mpi_json,
                    run_spmdinfer_metrics, scratch, wait_for_idle, write_input, write_job)

MiB = 2 ** 20
GiB = 2 ** 30
SMALL_IN, SMALL_OUT = 256, 16            # the small model: y = x @ W, W (256, 16)
MLP = (1024, 4096, 1024)                 # the compute-bound MLP
IO_ROWS = 102_400                        # 100 MiB of float32 at 256 columns
MEMORY_ROWS = GiB // (SMALL_IN * 4)      # 1 GiB
SMALL_BATCH = 1024                       # rows per batch for the small model (1 MiB)
MLP_BATCH = 256                          # rows per batch for the MLP (1 MiB)
BCAST_SIZES = (16 * MiB, 256 * MiB, 2560 * MiB)
MARK = 7.0                               # the broadcast's last element, checked on arrival
ACTIVITIES = ("load", "read", "bcast", "predict", "combine", "write", "wait")
BACKENDS = ("onnxruntime", "mindspore")
# Per backend and row; None: shown without a target (MindSpore's is on the steadier 1 GiB row).
TARGETS = {
    "onnxruntime": {"I/O-bound": 1.25, "I/O-bound, 1 GiB input": 1.25, "compute-bound": 0.98,
                    "oversubscribed": 2.0},
    "mindspore": {"I/O-bound": None, "I/O-bound, 1 GiB input": 1.4, "compute-bound": 1.05,
                  "oversubscribed": 2.5},
}
BCAST_TARGET = 0.9
MEMORY_TARGET = 64 * MiB


def build(folder: Path, quick: bool, backend: str = "onnxruntime") -> dict:
    """Export the slices for `backend` (ONNX, or MindIR for mindspore) and write the inputs
    (once for both); return each case's input file, job file, ranks and a line saying what
    it runs."""
    from mindspore import Parameter, Tensor, nn, ops

    class MatMul(nn.Cell):
        def __init__(self, weight):
            super().__init__()
            self.weight = Parameter(Tensor(weight), name="w")
            self.matmul = ops.MatMul()

        def construct(self, x):
            return self.matmul(x, self.weight)

    class HalfMLP(nn.Cell):
        """relu(x @ W1[:, h] + b1[h]) @ W2[h, :] for this rank's hidden units h: the ranks'
        outputs sum to the whole MLP's."""

        def __init__(self, w1, b1, w2):
            super().__init__()
            self.w1 = Parameter(Tensor(w1), name="w1")
            self.b1 = Parameter(Tensor(b1), name="b1")
            self.w2 = Parameter(Tensor(w2), name="w2")
            self.matmul = ops.MatMul()

        def construct(self, x):
            return self.matmul(ops.relu(self.matmul(x, self.w1) + self.b1), self.w2)

    suffix = ".onnx" if backend == "onnxruntime" else ".mindir"

    def save(cell, row_shape, name):
        (export_onnx if backend == "onnxruntime" else export)(cell, row_shape, folder / (name + suffix))

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((SMALL_IN, SMALL_OUT)).astype(np.float32)
    for ranks in (2, 8):
        width = SMALL_OUT // ranks
        for r in range(ranks):
            part = np.ascontiguousarray(weight[:, r * width:(r + 1) * width])
            save(MatMul(part), [SMALL_IN], f"small{ranks}_{r}")
    d_in, hidden, d_out = MLP
    w1 = (rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hidden, d_out)) / np.sqrt(hidden)).astype(np.float32)
    half = hidden // 2
    for r in range(2):
        units = slice(r * half, (r + 1) * half)
        cell = HalfMLP(np.ascontiguousarray(w1[:, units]), b1[units].copy(),
                       np.ascontiguousarray(w2[units]))
        save(cell, [d_in], f"mlp2_{r}")

    mlp_rows = 4096 if quick else 16384
    over_rows = 32768 if quick else IO_ROWS
    inputs = [("small_100m.h5", IO_ROWS, SMALL_IN), ("small_1g.h5", MEMORY_ROWS, SMALL_IN),
              ("mlp.h5", mlp_rows, d_in)] + [("small_over.h5", over_rows, SMALL_IN)] * \
        (over_rows != IO_ROWS)
    for name, count, width in inputs:
        if not (folder / name).exists():
            write_input(folder / name, count, width)
    tag = "" if backend == "onnxruntime" else "-ms"

    def case(name, files, ranks, data, batch, combine, setup):
        files = files.replace(".onnx", suffix)
        name += tag
        job = write_job(folder, name, {
            "model": {"files": files, "ranks": ranks, "backend": backend},
            "device": {"threads": 1},
            "input": {"file": data, "batch_size": batch, "datasets": {"x": "/x"}},
            "output": {"file": f"out/{name}.h5", "datasets": {"y": "/y"},
                       "combine": {"y": combine}},
        })
        return {"data": folder / data, "job": job, "ranks": ranks, "setup": setup}

    def rows(count, width):
        return f"{count:,} rows x {width} float32 ({count * width * 4 / MiB:,.0f} MiB)"

    small = f"MatMul {SMALL_IN}->{SMALL_OUT}"
    return {
        "I/O-bound": case("io", "small2_{rank}.onnx", 2, "small_100m.h5", SMALL_BATCH, "concat:-1",
                          f"{small} in 2 column slices (concat:-1), {rows(IO_ROWS, SMALL_IN)}, "
                          f"batch {SMALL_BATCH}"),
        "compute-bound": case("compute", "mlp2_{rank}.onnx", 2, "mlp.h5", MLP_BATCH, "sum",
                              f"MLP {'-'.join(map(str, MLP))} in 2 row-parallel slices (sum), "
                              f"{rows(mlp_rows, d_in)}, batch {MLP_BATCH}"),
        "oversubscribed": case("over", "small8_{rank}.onnx", 8,
                               "small_100m.h5" if over_rows == IO_ROWS else "small_over.h5",
                               SMALL_BATCH, "concat:-1",
                               f"{small} in 8 column slices (concat:-1), "
                               f"{rows(over_rows, SMALL_IN)}, batch {SMALL_BATCH}"),
        "memory": case("memory", "small2_{rank}.onnx", 2, "small_1g.h5", SMALL_BATCH, "concat:-1",
                       f"the I/O-bound job on {rows(MEMORY_ROWS, SMALL_IN)}; rank 0 peak RSS "
                       "minus the I/O-bound runs'"),
    }


def warm(path: Path) -> None:
    """Read `path` once, so every run finds its input in the page cache (this VM pages out
    cold file pages, and the first run of a pair would otherwise read from disk)."""
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


# One run of each loop, reduced to what the report needs.

def spmdinfer_sample(data: Path, job: Path, n: int, idle: float, launch=None) -> dict:
    remove_output(job, "")
    return measured(data, idle, lambda: run_spmdinfer_metrics(job, n, launch),
                    lambda m: m["wall_seconds"] - m["load_seconds"])


def plain_sample(data: Path, job: Path, n: int, idle: float, launch=None) -> dict:
    remove_output(job, ".plain.h5")
    return measured(data, idle, lambda: run_mpi_json(HERE / "plain_loop.py", [job], n, launch),
                    lambda m: m["loop_seconds"])


def remove_output(job: Path, suffix: str) -> None:
    """Remove the output the previous run of this loop left: neither loop's time should
    include freeing the last result (the plain loop truncates its file before its clock
    starts; spmdinfer replaces its output only once the new one is complete)."""
    import tomllib

    output = job.parent / tomllib.loads(job.read_text())["output"]["file"]
    output.with_name(output.name + suffix).unlink(missing_ok=True)


def measured(data: Path, idle: float, run, loop_seconds) -> dict:
    """One run on a warm input and (up to `idle` s) an idle machine: rows/s, loop seconds,
    rank 0's peak RSS, every rank's seconds per activity, and the CPU share others took."""
    warm(data)
    wait_for_idle(idle)
    watch = CpuWatch()
    result = run()
    return {"other": watch.share(), "rate": result["rows_per_second"],
            "loop": loop_seconds(result), "rss0": result["ranks"][0]["peak_rss_bytes"],
            "seconds": [r["seconds"] for r in result["ranks"]]}


def median_run(samples: list[dict]) -> dict:
    """The run whose rows/s is the median (the lower one of the middle two for even counts)."""
    ordered = sorted(samples, key=lambda s: s["rate"])
    return ordered[(len(ordered) - 1) // 2]


# The broadcast benchmark: this file again, under mpiexec -n 2.

def bcast_worker(sizes: list[int], repeats: int) -> None:
    """Under mpiexec: time every size (see `time_bcast`) and print the seconds as JSON."""
    from mpi4py import MPI

    from spmdinfer.comm import Channel, Peers

    comm = MPI.COMM_WORLD
    peers = Peers(comm)
    channel = Channel(comm, peers)
    try:
        results = {size: time_bcast(comm, channel, size, repeats) for size in sizes}
    finally:
        channel.close()
        peers.close()
    if comm.rank == 0:
        print(json.dumps(results), flush=True)


def time_bcast(comm, channel, size: int, repeats: int) -> dict[str, list[float]]:
    """Rank 0 broadcasts a float32 (rows, 256) array of `size` bytes, alternating the runner's
    packet broadcast, a raw comm.Bcast into a preallocated buffer, and (to tell allocation
    from protocol) a raw comm.Bcast into a buffer allocated for each transfer; seconds per
    transfer, timed between two barriers, `repeats` times each."""
    from mpi4py import MPI

    from spmdinfer.comm import GO

    rows = size // (SMALL_IN * 4)
    array = np.zeros((rows, SMALL_IN), np.float32)  # every page touched before timing
    if comm.rank == 0:
        array[-1, -1] = MARK
    transfers = max(1, (256 * MiB) // size)  # at least 256 MiB per timing

    def packet():
        if comm.rank == 0:
            channel.bcast_packet(GO, 0, rows, [array])
        else:
            _, _, got, received = channel.bcast_packet()
            assert got == rows and received[0][-1, -1] == MARK

    def raw():
        comm.Bcast(array, root=0)
        assert array[-1, -1] == MARK

    def raw_fresh():
        if comm.rank == 0:
            comm.Bcast(array, root=0)
        else:
            received = np.empty((rows, SMALL_IN), np.float32)
            comm.Bcast(received, root=0)
            assert received[-1, -1] == MARK
            del received  # freed inside this transfer's time, not the next one's

    packet(), raw()  # warm-up: first touch of the pages, MPI connections
    times = {"packet": [], "raw": [], "raw_fresh": []}
    for _ in range(repeats):
        for name, transfer in (("packet", packet), ("raw", raw), ("raw_fresh", raw_fresh)):
            comm.Barrier()
            began = MPI.Wtime()
            for _ in range(transfers):
                transfer()
            comm.Barrier()
            times[name].append((MPI.Wtime() - began) / transfers)
    return times


# The report.

def rate(value: float) -> str:
    return f"{value:,.0f} rows/s"


def spread(samples: list[float], unit: str = "", digits: int = 0) -> str:
    if len(samples) < 2:
        return ""
    return f"{min(samples):,.{digits}f}-{max(samples):,.{digits}f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser, quick="a fast smoke run: one repeat, smaller inputs, no 2.5 GiB "
                                  "broadcast")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--backend", choices=BACKENDS, action="append",
                        help="run the model cases with this backend only (default: both)")
    parser.add_argument("--bcast-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = repeats_of(args)
    if args.bcast_worker:
        return bcast_worker(args.sizes, repeats)

    began = time.monotonic()
    with scratch("suite", args.keep) as folder:
        report(folder, repeats, args.quick, args.wait_idle, began, args.backend or BACKENDS)


CASES = ("I/O-bound", "compute-bound", "oversubscribed", "memory")


def report(folder: Path, repeats: int, quick: bool, idle: float, began: float,
           backends=BACKENDS) -> None:
    progress = progress_printer(began)
    watch = CpuWatch()
    progress(f"building slices and inputs in {folder}")
    jobs = {backend: build(folder, quick, backend) for backend in backends}
    samples = {}
    for backend in backends:
        for case in CASES:
            data, job, n = (jobs[backend][case][k] for k in ("data", "job", "ranks"))
            progress(f"{case}, {backend}: {repeats} alternating runs of spmdinfer and the plain "
                     f"loop, {n} ranks")
            samples[backend, case] = alternate_samples({
                "spmdinfer": lambda: spmdinfer_sample(data, job, n, idle),
                "plain": lambda: plain_sample(data, job, n, idle),
            }, repeats)
    sizes = [s for s in BCAST_SIZES if not (quick and s > GiB)]
    progress(f"broadcast: {', '.join(size_name(s) for s in sizes)}, {repeats} alternating timings")
    wait_for_idle(idle)
    bcast_watch = CpuWatch()
    bcast = run_mpi_json(Path(__file__), ["--bcast-worker", "--repeats", repeats,
                                          "--sizes", *sizes], 2)
    bcast_other = bcast_watch.share()
    progress("done")

    print(f"\nspmdinfer performance suite: medians of {repeats} alternating run(s) per case "
          f"(spread min-max in brackets); ratio: the median of the {repeats} back-to-back pairs' "
          f"ratios; 1 CPU thread per rank\n")
    header = f"{'case':<24} {'backend':<12} {'ranks':>5}  {'spmdinfer':>34}  {'plain loop':>34}  " \
             f"{'ratio':>6}  {'target':>9}  {'verdict':<7}  others"
    print(header)
    print("-" * len(header))
    rows = (("I/O-bound", "I/O-bound"), ("I/O-bound, 1 GiB input", "memory"),
            ("compute-bound", "compute-bound"), ("oversubscribed", "oversubscribed"))
    rss = {}
    for backend in backends:
        for label, case in rows:
            runs = samples[backend, case]
            ours = [s["rate"] for s in runs["spmdinfer"]]
            plain = [s["rate"] for s in runs["plain"]]
            # Each spmdinfer run is paired with the plain run right after it: the two share the
            # machine's state of the moment (this VM has slow spells that hit both loops).
            ratio = statistics.median(a / b for a, b in zip(ours, plain))
            target = TARGETS[backend][label]
            verdict = "" if target is None else "PASS" if ratio >= target else "BELOW"
            print(f"{label:<24} {backend:<12} {jobs[backend][case]['ranks']:>5}  "
                  f"{cell(rate(statistics.median(ours)), spread(ours)):>34}  "
                  f"{cell(rate(statistics.median(plain)), spread(plain)):>34}  "
                  f"{ratio:>5.2f}x  {'' if target is None else '>= ' + format(target, '.2f'):>9}  "
                  f"{verdict:<7}  {others(runs)}")
        for name in ("spmdinfer", "plain"):
            big = statistics.median(s["rss0"] for s in samples[backend, "memory"][name])
            small = statistics.median(s["rss0"] for s in samples[backend, "I/O-bound"][name])
            rss[backend, name] = (big, small, big - small)
        delta = rss[backend, "spmdinfer"][2]
        print(f"{'memory (rank 0 RSS)':<24} {backend:<12} {2:>5}  {mib(delta, sign=True):>34}  "
              f"{mib(rss[backend, 'plain'][2], sign=True):>34}  {'':>6}  {'<= 64 MiB':>9}  "
              f"{'PASS' if delta <= MEMORY_TARGET else 'BELOW':<7}  "
              f"{others(samples[backend, 'memory'])}")

    fresh = {}
    for size in sizes:
        times = bcast[str(size)]
        bandwidth = {k: [size / t / GiB for t in v] for k, v in times.items()}
        packet, raw = (statistics.median(bandwidth[k]) for k in ("packet", "raw"))
        fresh[size] = statistics.median(bandwidth["raw_fresh"])
        ratio = packet / raw
        print(f"{'broadcast ' + size_name(size):<24} {'mpi4py':<12} {2:>5}  "
              f"{cell(f'{packet:.2f} GiB/s', spread(bandwidth['packet'], '', 2)):>34}  "
              f"{cell(f'{raw:.2f} GiB/s', spread(bandwidth['raw'], '', 2)):>34}  "
              f"{ratio:>5.2f}x  {'>= 0.90':>9}  "
              f"{'PASS' if ratio >= BCAST_TARGET else 'BELOW':<7}  {flag(bcast_other)}")
    for backend in backends:
        print(f"\nmemory, {backend}: rank 0 peak RSS with the 1 GiB input minus with the ~100 MB "
              f"one (medians): spmdinfer {mib(rss[backend, 'spmdinfer'][0])} - "
              f"{mib(rss[backend, 'spmdinfer'][1])}, plain {mib(rss[backend, 'plain'][0])} - "
              f"{mib(rss[backend, 'plain'][1])}")
    print("broadcast: spmdinfer = Channel.bcast_packet (root) / bcast_packet() (others); "
          "plain = comm.Bcast into a preallocated buffer; for reference, comm.Bcast into a "
          "buffer allocated per transfer: "
          + ", ".join(f"{size_name(s)} {fresh[s]:.2f} GiB/s" for s in sizes))

    print(f"others: the largest share of the CPU that other processes took during one run of the "
          f"case (above {DISTURBED:.0%}, the timings are disturbed; see --wait-idle)")
    print("I/O-bound, 1 GiB input: the memory case's runs, the same job on 10x the rows (longer "
          "loops, so steadier than the ~100 MB case)")
    print("\nsetup (every rank 1 CPU thread; each input file is read once before every run, "
          "so both loops read it from the page cache):")
    for case, spec in jobs[backends[0]].items():
        print(f"  {case:<16} {spec['ranks']} ranks: {spec['setup']}")
    print(f"  {'backends':<16} {', '.join(backends)} (the same cells, exported as ONNX and as "
          "MindIR)")
    print(f"  {'broadcast':<16} 2 ranks: float32 (rows, {SMALL_IN}) arrays, "
          f"{'; '.join(size_name(s) for s in sizes)}, alternating, timed between two barriers")

    print("\nwhere the time goes (seconds in the median run; spmdinfer from --metrics, "
          "'wait' is inside bcast/combine; plain from its own clock):")
    print(f"  {'case':<16} {'backend':<12} {'loop':<10} {'rank':>4}  {'loop s':>7}  "
          + "  ".join(f"{a:>7}" for a in ACTIVITIES))
    for backend in backends:
        for case in CASES:
            for name in ("spmdinfer", "plain"):
                run = median_run(samples[backend, case][name])
                ranks = [0, 1] if len(run["seconds"]) <= 2 else [0, 1, len(run["seconds"]) - 1]
                for r in ranks:
                    seconds = run["seconds"][r]
                    values = "  ".join(f"{seconds[a]:7.3f}" if a in seconds else f"{'-':>7}"
                                       for a in ACTIVITIES)
                    print(f"  {case:<16} {backend:<12} {name:<10} {r:>4}  {run['loop']:7.3f}  "
                          f"{values}")
    print(f"\nmachine: {machine()}")
    print(f"code: {code_state()}")
    print(f"quiet: {watch.report()}")
    print(f"suite wall time: {time.monotonic() - began:.0f} s")


def others(runs: dict) -> str:
    """The largest share of the CPU other processes took during any run of a case."""
    return flag(max(s["other"] for samples in runs.values() for s in samples))


def flag(share: float) -> str:
    return f"{share:.0%}" + (" disturbed" if share > DISTURBED else "")


def cell(value: str, extra: str) -> str:
    return f"{value} ({extra})" if extra else value


def mib(count: float, sign: bool = False) -> str:
    return f"{count / MiB:{'+' if sign else ''}.1f} MiB"


def size_name(size: int) -> str:
    return f"{size / GiB:g} GiB" if size >= GiB else f"{size // MiB} MiB"


if __name__ == "__main__":
    main()
