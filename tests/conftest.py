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

REPO = Path(__file__).resolve().parents[1]
MPI_TIMEOUT = 300
# Open MPI's launcher and a Python beside it (.ci/run makes this environment).
OPENMPI_BIN = REPO / ".venv-openmpi" / "bin"
# SPMDINFER_TEST_MPI=openmpi runs the tests' MPI jobs under Open MPI's mpirun, with that
# environment's Python (its mpi4py loads Open MPI); .ci/run does so for the MPI tier.
UNDER_OPENMPI = os.environ.get("SPMDINFER_TEST_MPI") == "openmpi"
if UNDER_OPENMPI:
    PYTHON = str(OPENMPI_BIN / "python")
    MPIEXEC = str(OPENMPI_BIN / "mpirun")
    LAUNCH_FLAGS = ["--oversubscribe"]
    LAUNCH_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                  "OMPI_MCA_osc": "^ucx", "PATH": f"{OPENMPI_BIN}{os.pathsep}{os.environ['PATH']}"}
else:
    PYTHON = sys.executable
    # The mpiexec installed beside this Python (pip's mpich), else the one on PATH.
    MPIEXEC = next((str(p) for p in [Path(sys.executable).parent / "mpiexec"] if p.exists()),
                   shutil.which("mpiexec") or "mpiexec")
    LAUNCH_FLAGS, LAUNCH_ENV = [], {}


def mpi_command(n: int) -> list[str]:
    """The launcher's command line for `n` ranks (append the program)."""
    return [MPIEXEC, *LAUNCH_FLAGS, "-n", str(n)]


def mpi_env(**variables) -> dict:
    """The environment of a test's MPI job."""
    return {**os.environ, "GLOG_v": "3", **LAUNCH_ENV, **variables}


def run_cli(*args, n: int | None = None, timeout: float = MPI_TIMEOUT, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m spmdinfer ARGS`, under the MPI launcher with `n` ranks when `n` is given."""
    command = [PYTHON, "-m", "spmdinfer", *map(str, args)]
    if n is not None:
        command = [*mpi_command(n), *command]
    full_env = mpi_env(**(env or {}))
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or REPO, stdin=subprocess.DEVNULL)


def rank_pids(job: Path) -> dict[int, int]:
    """rank -> pid of the spmdinfer processes running `job` (read from the rank variable
    their launcher set: MPICH's PMI_RANK, Open MPI's OMPI_COMM_WORLD_RANK)."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or str(job) not in (proc / "cmdline").read_text():
                continue
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0")
                       if "=" in item)
        except (OSError, ValueError):
            continue
        rank = env.get("PMI_RANK", env.get("OMPI_COMM_WORLD_RANK"))
        if rank is not None and "spmdinfer" in (proc / "cmdline").read_text():
            pids[int(rank)] = int(proc.name)
    return pids


@contextlib.contextmanager
def held(pids, until_pending: signal.Signals | None = None, timeout: float = 30):
    """The processes `pids` stopped (SIGSTOP) while the body runs, then continued (SIGCONT).

    Tests that stop, kill or lock out a run mid-way hold its ranks first: a fast machine
    finishes a short job before a signal sent through mpiexec or Slurm reaches them. With
    `until_pending`, leaving first waits until that signal is pending on every rank still
    stopped (a stopped process takes it when continued), so it lands mid-run, always."""
    pids = list(pids)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        # kill() returns before the process stops; a signal sent in between would be taken.
        deadline = time.monotonic() + timeout
        while not all(map(_stopped_or_gone, pids)):
            assert time.monotonic() < deadline, f"processes {pids} did not stop"
            time.sleep(0.005)
        yield
        waiting, deadline = set(pids), time.monotonic() + timeout
        while until_pending and waiting:
            waiting = {pid for pid in waiting if _stopped_without(pid, until_pending)}
            assert time.monotonic() < deadline, (
                f"{until_pending.name} never reached processes {sorted(waiting)}")
            time.sleep(0.02)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _stopped_or_gone(pid: int) -> bool:
    """Whether every thread of process `pid` is stopped, or the process is gone."""
    try:
        states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                  for task in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return True
    return all(state in "TZX" for state in states)


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


def matmul_job(folder: Path, template: Path, ranks: int = 8, batch_size: int = 96,
               **tables) -> dict:
    """A job dict for the matmul slices; `tables` override whole tables."""
    doc = {
        "model": {"files": str(template), "ranks": ranks, "backend": "mindspore"},
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
