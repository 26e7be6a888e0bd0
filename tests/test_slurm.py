"""The slurm/ scripts under a real Slurm: sbatch them, compare with numpy.

The cluster (tests/slurm_cluster.py) is Debian's slurmctld, slurmd and munged, started here
as root, with 8 CPUs declared per node: on this machine's one node, and (for the multi-node
script with --nodes=2) on two nodes emulated here, n1 and n2, each slurmd in a UTS
namespace of its own, so that the ranks Slurm starts on n2 see host n2 and talk to n1's
over MPI's inter-node path (on loopback).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from spmdinfer.journal import committed_batches
from tests.conftest import (LOOPBACK_ENV, OPENMPI_BIN, REPO, dynamic, export_mindir, held, rank_pids,
                            read_h5, resume, run_cli, run_until, step_until_gone, stop,
                            wait_pending, write_h5, write_job)
from tests.slurm_cluster import SlurmCluster, SlurmError

SCRIPTS = REPO / "slurm"
VENV_BIN = Path(sys.executable).parent
DEMO_WEIGHT = np.full((96, 16), 0.5, np.float32)   # jobs/matmul/export.py


def running(cluster: SlurmCluster):
    """`cluster` started for the tests that use it, stopped after them."""
    try:
        try:
            cluster.start()
        except SlurmError as exc:
            pytest.fail(f"could not start the test Slurm: {exc}", pytrace=False)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A Slurm of one node: this host."""
    yield from running(SlurmCluster(tmp_path_factory.mktemp("slurm")))


@pytest.fixture(scope="session")
def slurm2(tmp_path_factory):
    """A Slurm of two emulated nodes, n1 and n2."""
    yield from running(SlurmCluster(tmp_path_factory.mktemp("slurm2"), nodes=("n1", "n2")))


# Between emulated nodes, MPICH's UCX would read a peer's memory in place (cross-memory
# attach), which real nodes cannot (tests/emulated_hosts.py); a MindSpore cluster
# over two nodes needs its scheduler's address (docs/multi-node.md); and hydra's proxies
# reach mpiexec at the address of its interface lo, as the emulated names resolve to none.
TWO_NODES_ENV = {"UCX_TLS": "^cma", "SPMDINFER_CLUSTER_HOST": "127.0.0.1", "HYDRA_IFACE": "lo"}


def job_env(**variables) -> dict:
    """The environment sbatch exports to the job: this Python's bin folder first on PATH,
    MPI on loopback."""
    return {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "GLOG_v": "3", **LOOPBACK_ENV,
            "SPMDINFER_LOG_LEVEL": "INFO", **variables}


def demo_tree(tmp_path: Path, rows: int, seed: int, demo: str = "matmul") -> tuple[Path, np.ndarray]:
    """A folder laid out like the repository (jobs/DEMO/) with random demo inputs."""
    root = tmp_path / "submit"
    shutil.copytree(REPO / "jobs" / demo, root / "jobs" / demo,
                    ignore=shutil.ignore_patterns("out", ".*"))
    x = np.random.default_rng(seed).standard_normal((rows, 96)).astype(np.float32)
    write_h5(root / "jobs" / demo / "inputs.h5", {"features": x})
    return root, x


def finished(slurm: SlurmCluster, job_id: str, log: Path, timeout: float = 900) -> str:
    """Wait for the job; assert it COMPLETED with exit code 0; return its log. `timeout` bounds
    a hung job, not a time a job must meet: the 8-rank MindSpore cluster over two emulated
    nodes once took 290 s to start (288 s of start-up, its cluster joined in 12 s) on an
    otherwise idle machine, where it takes 7 s."""
    try:
        records = slurm.wait(job_id, timeout=timeout)
    except SlurmError as exc:
        raise AssertionError(f"{exc}\n--- job log\n{_read(log)}") from None
    for record in records:
        state = (record["JobState"], record["ExitCode"])
        assert state == ("COMPLETED", "0:0"), (record, _read(log))
    return _read(log)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def local_ranks(log: str) -> list[tuple[int, int]]:
    """(node-local rank, ranks on the node) of every rank, from SPMDINFER_LOG_LEVEL=INFO lines."""
    return sorted((int(r), int(n)) for r, n in re.findall(r"\(local (\d+)/(\d+)\)", log))


def assert_demo_output(path: Path, x: np.ndarray) -> None:
    y = read_h5(path, "/y")
    assert y.shape == (len(x), 16) and y.dtype == np.float32
    np.testing.assert_allclose(y, -(x @ DEMO_WEIGHT), rtol=1e-5, atol=1e-4)


def test_single_node_script_word_for_word(slurm, tmp_path):
    # Submitted as docs/slurm.md says, from a folder laid out like the repository, with
    # none of the script's variables set: only PATH finds this Python's spmdinfer and mpiexec.
    root, x = demo_tree(tmp_path, rows=300, seed=10)
    job_id = slurm.sbatch(SCRIPTS / "single-node.sbatch", cwd=root, env=job_env())
    log = finished(slurm, job_id, root / f"spmdinfer-{job_id}.out")
    assert_demo_output(root / "jobs" / "matmul" / "out" / "result.h5", x)
    assert "spmdinfer: 300 rows, 3 batches," in log, log
    # Each rank sees its own node-local rank (its device), not hydra's SLURM_LOCALID=0.
    assert local_ranks(log) == [(r, 8) for r in range(8)], log


# LAUNCHER, the venv's bin folder (MPICH's or Open MPI's mpiexec first), the command it runs.
LAUNCHERS = {"srun": ("srun", VENV_BIN, "srun --mpi=pmi2"),
             "mpiexec": ("mpiexec", VENV_BIN, "mpiexec -launcher slurm"),
             "openmpi": ("mpiexec", OPENMPI_BIN, "mpiexec -n 8 env")}


# srun with both demos, and MPICH's mpiexec with jobs/matmul, run on two nodes below.
@pytest.mark.parametrize("launcher, demo", [("mpiexec", "matmul_allgather"), ("openmpi", "matmul"),
                                            ("openmpi", "matmul_allgather")],
                         ids=["mpiexec-matmul_allgather", "openmpi-matmul", "openmpi-matmul_allgather"])
def test_multi_node_script_on_one_node(slurm, tmp_path, launcher, demo):
    """The demos under MPICH's and Open MPI's mpiexec on one node (the other pairings run on
    two nodes below); in jobs/matmul_allgather the ranks form a MindSpore cluster."""
    root, x = demo_tree(tmp_path, rows=257, seed=11, demo=demo)
    job = root / "jobs" / demo / "job.toml"
    name, bin_folder, command = LAUNCHERS[launcher]
    job_id = slurm.sbatch(SCRIPTS / "multi-node.sbatch", "--nodes=1", "--ntasks-per-node=8",
                          cwd=root, env=job_env(JOB=str(job), VENV_BIN=str(bin_folder),
                                                LAUNCHER=name, OMPI_ALLOW_RUN_AS_ROOT="1",
                                                # the test node claims 8 CPUs on 2 cores
                                                PRTE_MCA_hwloc_default_binding_policy="none",
                                                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"))
    log = finished(slurm, job_id, root / f"spmdinfer-{job_id}.out")
    assert_demo_output(root / "jobs" / demo / "out" / "result.h5", x)
    assert f"1 node(s), {command} " in log, log
    assert "spmdinfer: 257 rows, 3 batches," in log, log
    assert local_ranks(log) == [(r, 8) for r in range(8)], log
    clustered = 8 if demo == "matmul_allgather" else 0
    assert log.count("joined MindSpore cluster 0 as worker") == clustered, log


def hosts(log: str) -> list[str]:
    """The host of every rank, in rank order, from SPMDINFER_LOG_LEVEL=INFO placement lines."""
    return [host for _, host in sorted((int(r), h) for r, h in
                                       re.findall(r"INFO rank (\d+)/\d+ on (\S+) \(local", log))]


@pytest.mark.parametrize("launcher, demo", [("srun", "matmul"), ("mpiexec", "matmul"),
                                            ("srun", "matmul_allgather")])
def test_multi_node_script_on_two_nodes(slurm2, tmp_path, launcher, demo):
    """--nodes=2 for real: 4 ranks on each emulated node, each node's ranks numbered from 0
    (SLURM_LOCALID under srun, MPI's own under mpiexec); the MindSpore cluster spans both."""
    root, x = demo_tree(tmp_path, rows=257, seed=16, demo=demo)
    job = root / "jobs" / demo / "job.toml"
    job_id = slurm2.sbatch(SCRIPTS / "multi-node.sbatch", "--nodes=2", "--ntasks-per-node=4",
                           cwd=root, env=job_env(JOB=str(job), VENV_BIN=str(VENV_BIN),
                                                 LAUNCHER=launcher, **TWO_NODES_ENV))
    log = finished(slurm2, job_id, root / f"spmdinfer-{job_id}.out")
    assert_demo_output(root / "jobs" / demo / "out" / "result.h5", x)
    assert "2 node(s)" in log and "spmdinfer: 257 rows, 3 batches," in log, log
    assert hosts(log) == ["n1"] * 4 + ["n2"] * 4, log
    assert local_ranks(log) == sorted([(r, 4) for r in range(4)] * 2), log
    assert log.count("joined MindSpore cluster 0 as worker") == (8 if "allgather" in demo else 0)


def mpich_shm(key: str) -> str:
    """MPICH's name for a node's shared memory: FNV-1a of its PMI job id ("JOBID.STEP" under srun)."""
    value = 2166136261
    for byte in key.encode():
        value = ((value ^ byte) * 16777619) & 0xffffffff
    return f"mpich_shm_{value:x}_0"


def test_multi_node_srun_removes_this_jobs_stale_shared_memory(slurm, tmp_path):
    # A requeued job keeps its id, so its steps' shared memory names repeat; one left by a
    # rank killed in an earlier run (here: zeros, as if its creator died at once) would be
    # attached by the new ranks, which then fail in MPI_Init.
    root, x = demo_tree(tmp_path, rows=100, seed=15)
    job_id = slurm.sbatch(SCRIPTS / "multi-node.sbatch", "--hold", "--nodes=1",
                          "--ntasks-per-node=8", cwd=root,
                          env=job_env(VENV_BIN=str(VENV_BIN), LAUNCHER="srun"))
    stale = [Path("/dev/shm") / mpich_shm(f"{job_id}.{step}") for step in range(3)]
    try:
        for path in stale:
            path.write_bytes(bytes(2 << 20))
        slurm.command("scontrol", "release", job_id)
        finished(slurm, job_id, root / f"spmdinfer-{job_id}.out", timeout=600)
        assert not [path for path in stale if path.exists()]
    finally:
        for path in stale:
            path.unlink(missing_ok=True)
    assert_demo_output(root / "jobs" / "matmul" / "out" / "result.h5", x)


def test_array_script_one_task_per_input(slurm, tmp_path):
    root, _ = demo_tree(tmp_path, rows=1, seed=0)
    rng = np.random.default_rng(12)
    inputs = {"a": rng.standard_normal((130, 96)).astype(np.float32),
              "b": rng.standard_normal((64, 96)).astype(np.float32)}
    (root / "data").mkdir()
    for name, x in inputs.items():
        write_h5(root / "data" / f"{name}.h5", {"features": x})
    # A relative and an absolute path, a comment and a blank line.
    (root / "inputs.txt").write_text(f"# the inputs\ndata/a.h5\n\n{root / 'data' / 'b.h5'}\n")
    # The script's defaults: jobs/matmul/array.toml, inputs.txt, scores/.
    job_id = slurm.sbatch(SCRIPTS / "array.sbatch", "--array=0-1", cwd=root, env=job_env())
    records = slurm.wait(job_id)
    logs = {r["ArrayTaskId"]: root / f"spmdinfer-{job_id}_{r['ArrayTaskId']}.out" for r in records}
    text = "\n".join(path.read_text() for path in logs.values() if path.exists())
    assert sorted(logs) == ["0", "1"], records
    assert all((r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0") for r in records), text
    for name, x in inputs.items():
        assert_demo_output(root / "scores" / f"{name}.h5", x)
        with h5py.File(root / "scores" / f"{name}.h5", "r") as f:
            assert f.attrs["input_file"] == str(root / "data" / f"{name}.h5")
    # The filled-in job files are removed once their task has finished.
    assert not list((root / "jobs" / "matmul").glob(".array.*.toml"))


# 12000 small batches, about 10 s of scoring. The ranks (and Open MPI's launcher) are held
# (SIGSTOP) while a stop is sent through Slurm, so it lands mid-run however busy the machine;
# but Slurm's own requeue sends SIGCONT before SIGTERM, so in that case the length of the job
# keeps the stop mid-run (2000 batches were done before SIGTERM came, under load). Unheld,
# Open MPI's requeue case once scored all 12000 before Slurm's SIGTERM came, 7 s after the
# 8th batch (two CPU hogs beside the suite).
ROWS, BATCH = 48000, 4


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A job of 12000 small batches on 2 column slices, and its output from a plain, uninterrupted
    `mpiexec -n 2` run: (slice template, input rows, weight, reference output)."""
    from tests.cells import MatMulNeg

    folder = tmp_path_factory.mktemp("long_run")
    weight = np.random.default_rng(13).standard_normal((96, 16)).astype(np.float32)
    for rank in range(2):
        export_mindir(MatMulNeg(weight[:, 8 * rank:8 * rank + 8]), [dynamic(96)],
                      folder / f"slice{rank}.mindir")
    template = folder / "slice{rank}.mindir"
    x = np.random.default_rng(14).standard_normal((ROWS, 96)).astype(np.float32)
    reference = long_job(folder / "reference", template, x)
    result = run_cli("run", reference, "--no-progress", n=2)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return template, x, weight, read_h5(reference.parent / "out" / "result.h5", "/y")


def long_job(folder: Path, template: Path, x: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    write_h5(folder / "in.h5", {"x": x})
    return write_job(folder, {
        "model": {"files": str(template), "ranks": 2, "backend": "mindspore"},
        "input": {"file": "in.h5", "batch_size": BATCH, "datasets": {"x": "/x"}},
        "output": {"file": "out/result.h5", "datasets": {"y": "/y"},
                   "combine": {"y": "concat:-1"}},
    })


def wait_until_scoring(slurm: SlurmCluster, job_id: str, job: Path,
                       output: Path) -> dict[int, int]:
    """The job's two ranks (rank -> pid), stopped once a few batches are committed (records in
    FILE.parts/batches.log), however long they take to start on a busy machine (the deadline
    is a safety net, not a window): stopped as soon as they are up, then let go on in short
    steps. (Polled while they ran free, a fast machine's ranks had scored nearly the whole
    job before a busy test looked: two CPU hogs, an AVX-512 EPYC.)"""
    slurm.wait(job_id, timeout=600, until=lambda records: records[0]["JobState"] != "PENDING")
    deadline = time.monotonic() + 600
    while len(pids := rank_pids(job)) < 2:
        assert time.monotonic() < deadline, f"the ranks of {job} were not up in 600 s"
        time.sleep(0.01)
    stop(pids.values())
    run_until(pids.values(), lambda: committed_batches(output) >= 8, None)
    return pids


@contextlib.contextmanager
def held_mid_run(slurm: SlurmCluster, job_id: str, job: Path, output: Path, signum: signal.Signals,
                 openmpi: bool = False):
    """Once a few batches are committed, the job's ranks held (SIGSTOP) while the body sends
    `signum` its way through Slurm, and continued once it is pending on them: without this a
    fast machine finishes the job before Slurm's signal reaches the ranks.

    Open MPI's mpiexec may never forward a signal that reaches it while its ranks are
    stopped (tests/conftest.py, forward): there the launcher is held too, the signal made
    pending on it, then the launcher continued and the ranks let go on in short steps until
    they end."""
    pids = wait_until_scoring(slurm, job_id, job, output)
    assert sorted(pids) == [0, 1], (pids, slurm.jobs(job_id))
    if not openmpi:
        with held(pids.values(), until_pending=signum):
            yield
        return
    launcher = launcher_pid(job)
    stop([*pids.values(), launcher])
    try:
        yield
        wait_pending([launcher], signum)  # (Slurm's requeue sends SIGCONT first: no wait then)
        resume([launcher])
        # Continued at once, the ranks of a fast machine had finished the job before mpirun
        # forwarded the signal (two CPU hogs, an AVX-512 EPYC): they go on in steps instead.
        step_until_gone(pids.values())
    finally:
        resume(pids.values())
        resume([launcher])


def launcher_pid(job: Path) -> int:
    """The pid of the Open MPI launcher (prterun, started as mpiexec) running `job`."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_text(errors="surrogateescape")
            if (proc / "comm").read_text().strip() in ("prterun", "mpiexec", "mpirun") \
                    and str(job) in command:
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no Open MPI launcher runs {job}")


@pytest.mark.parametrize("script,launcher,action,nodes", [
    ("single-node.sbatch", "mpiexec", "USR1", 1),
    # Under srun across two nodes, a rank on each: USR1 as --signal=B:USR1@N sends it, and
    # Slurm's own requeue, as preemption with PreemptMode=REQUEUE does it (TERM to every
    # process of the job, the ranks included, and Slurm requeues the job itself).
    ("multi-node.sbatch", "srun", "USR1", 2),
    ("multi-node.sbatch", "srun", "requeue", 2),
    # The same two under Open MPI's mpiexec, on one node.
    ("multi-node.sbatch", "openmpi", "USR1", 1),
    ("multi-node.sbatch", "openmpi", "requeue", 1),
], ids=["single-node-mpiexec-USR1", "two-nodes-srun-USR1", "two-nodes-srun-scontrol-requeue",
        "multi-node-openmpi-USR1", "multi-node-openmpi-scontrol-requeue"])
def test_preempted_job_is_requeued_and_resumes(request, tmp_path, long_run, script, launcher,
                                               action, nodes):
    """Stopped mid-run (USR1 to the batch shell is what --signal=B:USR1@N sends before the
    time limit): the ranks stop at a batch boundary and exit 75, the job is requeued, the
    requeued job runs `spmdinfer run JOB --resume`, and the output equals the uninterrupted
    run's."""
    slurm = request.getfixturevalue("slurm" if nodes == 1 else "slurm2")
    template, x, weight, reference = long_run
    job = long_job(tmp_path / "slurm", template, x)
    output = job.parent / "out" / "result.h5"
    name, bin_folder, _ = LAUNCHERS[launcher]
    job_id = slurm.sbatch(SCRIPTS / script, f"--nodes={nodes}", f"--ntasks-per-node={2 // nodes}",
                          cwd=job.parent,
                          env=job_env(JOB=str(job), VENV_BIN=str(bin_folder), LAUNCHER=name,
                                      OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                                      PRTE_MCA_hwloc_default_binding_policy="none",
                                      **(TWO_NODES_ENV if nodes == 2 else {})))
    signum = signal.SIGTERM if action == "requeue" else signal.SIGUSR1
    with held_mid_run(slurm, job_id, job, output, signum, openmpi=launcher == "openmpi"):
        if action == "requeue":
            slurm.command("scontrol", "requeue", job_id)
        else:
            slurm.command("scancel", f"--signal={action}", "--batch", job_id)

    log = finished(slurm, job_id, job.parent / f"spmdinfer-{job_id}.out", timeout=900)
    (record,) = slurm.jobs(job_id)
    assert record["Restarts"] == "1", (record, log)
    if nodes == 2:
        assert hosts(log) == ["n1", "n1", "n2", "n2"], log  # both runs: rank 0 on n1, rank 1 on n2
    if not (launcher == "openmpi" and action == "requeue"):
        # (Under Open MPI, Slurm's TERM ends mpirun too, and the ranks' output with it.)
        assert "stopping after the batches in flight" in log, log
    if action == "requeue":
        assert "got TERM" in log and "requeueing job" not in log, log
    else:
        assert "got USR1" in log and f"requeueing job {job_id}" in log, log
    assert re.search(r"restart 1: .*spmdinfer run \S+ --resume", log), log
    # The requeued run scored only the batches the first one had not committed.
    summary = re.search(r"spmdinfer: (\d+) rows \((\d+) this run\), (\d+) batches", log)
    assert summary and int(summary[1]) == ROWS and 0 < int(summary[3]) < ROWS // BATCH, log
    assert int(summary[2]) == int(summary[3]) * BATCH, log
    with h5py.File(output, "r") as f:
        y = f["y"][()]
    assert y.dtype == reference.dtype and np.array_equal(y, reference)
    assert sorted(os.listdir(output.parent)) == ["result.h5"]   # no parts, lock or partial left
    np.testing.assert_allclose(y, -(x @ weight), rtol=1e-5, atol=1e-4)


def test_cancelled_job_stays_cancelled_and_resumes_when_resubmitted(slurm, tmp_path, long_run):
    """scancel mid-run: the ranks stop at a batch boundary, the script does not requeue the
    job, and submitting it again with EXTRA_ARGS=--resume finishes it (as docs/slurm.md says)."""
    template, x, weight, reference = long_run
    job = long_job(tmp_path / "slurm", template, x)
    output = job.parent / "out" / "result.h5"
    env = job_env(JOB=str(job), VENV_BIN=str(VENV_BIN))
    first = slurm.sbatch(SCRIPTS / "single-node.sbatch", "--ntasks-per-node=2", cwd=job.parent,
                         env=env)
    with held_mid_run(slurm, first, job, output, signal.SIGTERM):
        slurm.command("scancel", first)
    (record,) = slurm.wait(first)
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0"), record
    assert not output.exists()

    second = slurm.sbatch(SCRIPTS / "single-node.sbatch", "--ntasks-per-node=2", cwd=job.parent,
                          env={**env, "EXTRA_ARGS": "--resume"})
    log = finished(slurm, second, job.parent / f"spmdinfer-{second}.out", timeout=900)
    first_log = _read(job.parent / f"spmdinfer-{first}.out")
    assert "got TERM" in first_log and "requeueing" not in first_log, first_log
    assert "after scancel, resubmit with EXTRA_ARGS=--resume" in first_log, first_log
    summary = re.search(r"spmdinfer: (\d+) rows \((\d+) this run\), (\d+) batches", log)
    assert summary and int(summary[1]) == ROWS and 0 < int(summary[3]) < ROWS // BATCH, log
    assert int(summary[2]) == int(summary[3]) * BATCH, log
    assert np.array_equal(read_h5(output, "/y"), reference)
