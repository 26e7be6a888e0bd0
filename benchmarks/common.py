"""Shared pieces of the benchmarks: export slices, write data, run spmdinfer, take medians."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import tomli_w

MPIEXEC = next((str(p) for p in [Path(sys.executable).parent / "mpiexec"] if p.exists()), "mpiexec")
RATE = re.compile(r"([0-9.]+) rows/s")
RUN_TIMEOUT = 600   # seconds for one benchmark run under mpiexec: a hang must not stall a suite
DISTURBED = 0.10    # a share of the CPU taken by others above this disturbs timings


def workdir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"spmdinfer-bench-{name}-"))


def add_run_options(parser, quick: str) -> None:
    """The options every paired benchmark takes: --repeats, --quick (`quick`: what it does),
    --wait-idle."""
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternating runs per case (default 5; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--wait-idle", type=float, default=10.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to leave "
                             "the CPU idle (default 10; 0 = do not wait)")


def repeats_of(args) -> int:
    return args.repeats or (1 if args.quick else 5)


def progress_printer(began: float):
    """progress(text): `text` on stderr after the seconds since `began`."""
    def progress(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {text}", file=sys.stderr, flush=True)

    return progress


@contextlib.contextmanager
def scratch(name: str, keep: bool = False):
    """A temporary folder for a benchmark's slices and data, removed afterwards unless `keep`."""
    folder = workdir(name)
    try:
        yield folder
    finally:
        if keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


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


def launcher(n: int, launch: list[str] | None = None) -> list[str]:
    """`mpiexec -n N`, or the launcher command `launch` (which sets its own rank count)."""
    return launch or [MPIEXEC, "-n", str(n)]


def run_spmdinfer_metrics(job: Path, n: int, launch: list[str] | None = None) -> dict:
    """One run under mpiexec (or `launch`) with --metrics; the metrics JSON (rows_per_second,
    per-rank seconds per activity and peak_rss_bytes)."""
    metrics = job.with_name(f"{job.stem}.metrics.json")
    command = [*launcher(n, launch), sys.executable, "-m", "spmdinfer", "run", str(job),
               "--overwrite", "--no-progress", "--metrics", str(metrics)]
    _run(command)
    return json.loads(metrics.read_text())


def run_mpi_json(script: Path, args: list[str], n: int, launch: list[str] | None = None) -> dict:
    """One run of a Python script under mpiexec (or `launch`); the JSON object it prints last
    (rank 0)."""
    command = [*launcher(n, launch), sys.executable, str(script), *map(str, args)]
    lines = [line for line in _run(command).splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{' '.join(command)} printed no JSON result")
    return json.loads(lines[-1])


def _run(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                                env={**os.environ, "GLOG_v": "3"})
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{' '.join(command)} did not finish in {RUN_TIMEOUT} s") from None
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {result.returncode}):\n"
                         f"{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return result.stdout


def alternate_samples(cases: dict, repeats: int) -> dict:
    """Run every case `repeats` times, alternating; every case's results, in run order."""
    samples = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            samples[name].append(run())
    return samples


def alternate(cases: dict, repeats: int) -> dict:
    """Run every case `repeats` times, alternating, and return each case's median."""
    samples = alternate_samples(cases, repeats)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine() -> str:
    """One line: cores, CPU, memory, Python, MPI library."""
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.initialize = False  # the library's version needs no MPI_Init
    from mpi4py import MPI

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    mpi = MPI.Get_library_version().strip().splitlines()[0].strip()
    return (f"{cores} cores ({cpu}), {memory:.1f} GiB memory, Python {platform.python_version()}, "
            f"{' '.join(mpi.split())}, mpi4py {mpi4py.__version__}, "
            f"{platform.machine()} {platform.system()} {platform.release()}")


def code_state() -> str:
    """The spmdinfer measured: version, git commit, and files under spmdinfer/ that differ
    from it (the numbers belong to the working tree, not to the commit alone)."""
    import spmdinfer

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = (git("diff", "--name-only", "HEAD", "--", "spmdinfer").splitlines()
               + git("ls-files", "--others", "--exclude-standard", "--", "spmdinfer").splitlines())
    dirty = ", ".join(sorted(changed))
    return (f"spmdinfer {spmdinfer.__version__} at git {commit}"
            + (f" + uncommitted changes to {dirty}" if dirty else ""))


def print_footer(watch, began: float) -> None:
    """The lines every benchmark ends with: the machine, the code measured, how quiet the
    machine was (`watch`: a CpuWatch), and the wall time since `began` (time.monotonic)."""
    import time

    print(f"\nmachine: {machine()}")
    print(f"code: {code_state()}")
    print(f"quiet: {watch.report()}")
    print(f"wall time: {time.monotonic() - began:.0f} s")


class CpuWatch:
    """How much of the machine's CPU went to other work while the benchmarks ran.

    Busy CPU time from /proc/stat minus the CPU time of this process and of every child
    it has waited for (mpiexec waits for its ranks, so they count as this suite's), and
    the time the hypervisor stole (steal). Both disturb timings on a small machine.
    """

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float, float]:
        import resource

        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        tick = os.sysconf("SC_CLK_TCK")
        own = sum(getattr(resource.getrusage(who), field)
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for field in ("ru_utime", "ru_stime"))
        busy = (user + nice + system + irq + softirq) / tick
        total = (user + nice + system + idle + iowait + irq + softirq + steal) / tick
        return busy, own, steal / tick, total

    def usage(self) -> tuple[float, float, float]:
        """Core-seconds since this watch started: (other processes, steal, all the cores')."""
        busy, own, steal, total = (b - a for a, b in zip(self._start, self._sample()))
        return max(0.0, busy - own), steal, total

    def share(self) -> float:
        """The share of the machine's CPU that other processes or the hypervisor took."""
        other, steal, total = self.usage()
        return (other + steal) / total if total else 0.0

    def report(self) -> str:
        other, steal, total = self.usage()
        share = (other + steal) / total if total else 0.0
        return (f"other processes used {other:.0f} of {total:.0f} core-seconds while the suite "
                f"ran, the hypervisor stole {steal:.0f}"
                + ("; timings are disturbed" if share > DISTURBED else ""))


def wait_for_idle(limit: float, window: float = 1.0) -> float:
    """Wait, up to `limit` seconds, until other processes take under DISTURBED of the CPU
    over `window`; the seconds waited."""
    import time

    began = time.monotonic()
    while time.monotonic() - began < limit:
        watch = CpuWatch()
        time.sleep(window)
        if watch.share() < DISTURBED:
            break
    return time.monotonic() - began
