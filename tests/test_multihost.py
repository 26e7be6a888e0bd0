"""Real jobs over two or three hosts, emulated on this machine (tests/emulated-host): each host
is a UTS namespace with its own name, so MPI and spmdinfer see one node per name (groups
that span hosts exchange batches by message, a group on one host through shared memory),
while every byte stays on 127.0.0.1. Outputs are compared with numpy and, bit for bit, with
the same job run on one host; faults on one host must end the ranks on every host."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests import cells
from tests.conftest import (UNDER_OPENMPI, assert_clean_error, dynamic, export_mindir, held,
                            hosts_command, matmul_job, off_loopback_sockets, rank_pids, read_h5,
                            resume, run_cli, write_h5, write_job)
from tests.export_collectives import seed_weight
from tests.test_collectives import collective_slices, job as collective_job  # noqa: F401 (fixture)
from tests.test_layouts import dense_slices, job as layout_job, rows_input  # noqa: F401 (fixture)
from tests.test_reliability import (EXIT_STOPPED, copy_job, reference_run, resume_and_compare,
                                    run_frozen_at_exit, start_run, stopped_at, stopped_while_watching,
                                    wait_for)

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.multihost,
    pytest.mark.skipif(UNDER_OPENMPI, reason="hosts are emulated through MPICH's launcher "
                                             "(hydra's -launcher-exec); the MPICH tier runs these"),
]

INFO = {"SPMDINFER_LOG_LEVEL": "INFO"}
# The MindSpore cluster of a model instance that spans hosts: its scheduler's address, which
# the other hosts reach (on a real cluster, rank 0's address on the fast network).
CLUSTER_ON_LOOPBACK = {"SPMDINFER_CLUSTER_HOST": "127.0.0.1"}


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-4000:])
    return result


def paths_taken(stderr: str) -> list[str]:
    """Each multi-rank group's way of sharing batches, from its root's INFO line."""
    return sorted(re.findall(r"INFO (replica \d+ stage \d+: \d+ ranks, batches [a-z ]+)$",
                             stderr, re.M))


def hosts_of_ranks(stderr: str) -> dict[int, str]:
    """rank -> the host its placement line names."""
    return {int(rank): host for rank, host in
            re.findall(r"\[rank \d+\] INFO rank (\d+)/\d+ on (\S+) \(local", stderr)}


def both_ways(folder: Path, doc: dict, counts: tuple[int, ...], env: dict | None = None):
    """Run `doc` on one host and over emulated hosts with `counts` ranks each; return both
    outputs' datasets and the emulated run's stderr."""
    outputs = {}
    for where in ("one", "hosts"):
        run = folder / where
        run.mkdir()
        shutil.copy(folder / "in.h5", run / "in.h5")
        path = write_job(run, doc)
        if where == "one":
            result = ok(run_cli("run", path, n=sum(counts), env={**INFO, **(env or {})}))
        else:
            result = ok(run_cli("run", path, launch=hosts_command(*counts),
                                env={**INFO, **(env or {})}))
        with h5py.File(run / doc["output"]["file"]) as f:
            assert f.attrs["complete"]
            outputs[where] = {name: f[name][()] for name in f}
    return outputs["one"], outputs["hosts"], result.stderr


LAYOUTS = {
    # name: (hosts' rank counts, the groups' ways of sharing batches over those hosts)
    "one-group-over-two-hosts-sum": ((2, 2), ["replica 0 stage 0: 4 ranks, batches by message"]),
    "one-group-over-three-hosts-concat": ((2, 1, 1),
                                          ["replica 0 stage 0: 4 ranks, batches by message"]),
    "a-replica-per-host-concat": ((2, 2), ["replica 0 stage 0: 2 ranks, batches in shared memory",
                                           "replica 1 stage 0: 2 ranks, batches in shared memory"]),
    "replicas-across-hosts-rank0": ((1, 2, 1), ["replica 0 stage 0: 2 ranks, batches by message",
                                                "replica 1 stage 0: 2 ranks, batches by message"]),
    "a-stage-per-host-concat": ((2, 2), ["replica 0 stage 0: 2 ranks, batches in shared memory",
                                         "replica 0 stage 1: 2 ranks, batches by message"]),
    "replicas-of-stages-over-three-hosts": ((1, 2, 1), []),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_over_hosts_equal_numpy_and_the_one_host_run(tmp_path, layout, onnx_matmul_slices,
                                                             mlp_slices, dense_slices):
    """The matmul layouts run ONNX Runtime (the runner's paths are what differ over hosts, and
    a rank's `import mindspore` is most of a short job here); the others MindSpore."""
    counts, paths = LAYOUTS[layout]
    matmul, weight = onnx_matmul_slices
    mlp, mlp_weights = mlp_slices
    dense, w1, w2 = dense_slices
    rows = 203  # batches of 16: the last one has 11 rows
    if layout == "one-group-over-two-hosts-sum":
        x = rows_input(tmp_path, rows, 16)
        doc, expected = layout_job(tmp_path, str(mlp), 4, 16, "sum"), cells.mlp_reference(x, *mlp_weights)
    elif layout == "one-group-over-three-hosts-concat":
        x = rows_input(tmp_path, rows, 96)
        doc, expected = layout_job(tmp_path, str(matmul), 4, 16, "concat:-1"), -(x @ weight[:, :8])
    elif layout == "a-replica-per-host-concat":
        x = rows_input(tmp_path, rows, 96)
        doc, expected = layout_job(tmp_path, str(matmul), 2, 16, "concat:-1"), -(x @ weight[:, :4])
    elif layout == "replicas-across-hosts-rank0":
        x = rows_input(tmp_path, rows, 96)
        doc, expected = layout_job(tmp_path, str(matmul), 2, 16, "rank0"), -(x @ weight[:, :2])
    elif layout == "a-stage-per-host-concat":
        x = rows_input(tmp_path, rows, 8)
        doc = layout_job(tmp_path, str(dense / "pipe2_{rank}.mindir"), 4, 16, "concat:-1",
                         stages=2, stage_combine="concat:-1")
        expected = np.maximum(x @ w1, 0) @ w2
    else:  # two replicas of two one-rank stages: n1 | n2 n2 | n3, every handoff between hosts
        x = rows_input(tmp_path, rows, 8)
        doc = layout_job(tmp_path, str(dense / "pipe1_{rank}.mindir"), 2, 16, stages=2)
        expected = np.maximum(x @ w1, 0) @ w2
    one, hosts, stderr = both_ways(tmp_path, doc, counts)
    assert paths_taken(stderr) == paths, stderr
    names = [f"n{i}" for i, count in enumerate(counts, 1) for _ in range(count)]
    assert hosts_of_ranks(stderr) == dict(enumerate(names)), stderr
    np.testing.assert_allclose(hosts["y"], expected, rtol=1e-4, atol=1e-4)
    assert one.keys() == hosts.keys()
    for name in one:
        assert np.array_equal(one[name], hosts[name]), name  # bit for bit


@pytest.mark.parametrize("counts", [(1, 1), (2, 2)], ids=["spanning-two-hosts", "a-cluster-per-host"])
def test_collective_slices_over_hosts(tmp_path, collective_slices, counts):
    """AllGather inside the graph: one MindSpore cluster over two hosts, or one per host
    (2 replicas); its scheduler at SPMDINFER_CLUSTER_HOST."""
    path, x = collective_job(tmp_path, collective_slices(2), "allgather", ranks=2, rows=203,
                             batch=50)
    result = ok(run_cli("run", path, launch=hosts_command(*counts),
                        env={**INFO, **CLUSTER_ON_LOOPBACK}))
    assert result.stderr.count("joined MindSpore cluster") == sum(counts)
    assert np.allclose(read_h5(tmp_path / "out" / "result.h5", "y"), -(x @ seed_weight(2)),
                       rtol=1e-5, atol=1e-4)


def test_a_cluster_over_hosts_without_an_address_is_refused(tmp_path, collective_slices):
    # Emulated host n1 has no address in DNS, as a host without one on the network would.
    path, _ = collective_job(tmp_path, collective_slices(2), "allgather", ranks=2, rows=10, batch=5)
    result = run_cli("run", path, launch=hosts_command(1, 1),
                     env={"SPMDINFER_CLUSTER_HOST": ""})
    assert_clean_error(result, "cannot find an address of n1", "SPMDINFER_CLUSTER_HOST")
    assert not (tmp_path / "out").exists()


# Faults on one host: test_reliability's job (its reference run on one host), over hosts.

COUNTS = (1, 2, 1)  # replica 0: ranks 0 (n1) and 1 (n2); replica 1: ranks 2 (n2) and 3 (n3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, onnx_matmul_slices):
    """test_reliability's reference job (ONNX Runtime's ranks, as there)."""
    return reference_run(tmp_path_factory, onnx_matmul_slices)


def start_over_hosts(job: Path) -> subprocess.Popen:
    return start_run(job, sum(COUNTS), launch=hosts_command(*COUNTS))


def resume_over_hosts_and_compare(reference, folder: Path, job: Path) -> None:
    resume_and_compare(reference, folder, job, launch=hosts_command(*COUNTS))


def all_gone(job: Path, run: subprocess.Popen, since: float) -> tuple[float, str, str]:
    """Seconds from `since` until the launcher and every rank of `job` are gone, and the
    launcher's stdout and stderr (read meanwhile: a launcher blocked on a full pipe would
    never end). What is left after 60 s fails the test, listed."""
    try:
        stdout, stderr = run.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        left = subprocess.run(["ps", "-eo", "pid,ppid,stat,args"], capture_output=True,
                              text=True).stdout
        left = [line for line in left.splitlines() if "hydra" in line or str(job) in line]
        os.killpg(run.pid, signal.SIGKILL)
        for pid in rank_pids(job).values():
            os.kill(pid, signal.SIGKILL)
        stdout, stderr = run.communicate()
        pytest.fail("the launcher did not end in 60 s; left:\n" + "\n".join(left)
                    + f"\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-6000:]}")
    wait_for(lambda: not rank_pids(job), timeout=30)
    return time.monotonic() - since, stdout, stderr


def test_the_ranks_traffic_over_hosts_stays_on_loopback(reference, tmp_path):
    job = copy_job(reference, tmp_path)
    run = start_over_hosts(job)
    pids = stopped_at(run, job, 3)
    try:
        assert off_loopback_sockets(pids.values()) == []
        os.kill(pids[2], signal.SIGUSR1)
    finally:
        resume(pids.values())
    run.communicate(timeout=60)
    assert run.returncode == EXIT_STOPPED


def test_kill_9_of_a_rank_on_another_host_then_resume(reference, tmp_path):
    job = copy_job(reference, tmp_path)
    run = start_over_hosts(job)
    pids = stopped_at(run, job, 40)
    with held(pids.values()):
        os.kill(pids[2], signal.SIGKILL)  # on n2, away from rank 0
    gone, stdout, stderr = all_gone(job, run, time.monotonic())
    assert run.returncode != 0
    # hydra names the host and the pid (the placement INFO lines map pids to ranks).
    said = " ".join((stdout + stderr).split())
    assert re.search(rf"BAD TERMINATION .* PID ({pids[1]}|{pids[2]}) RUNNING AT n2 = EXIT CODE: 9",
                     said), said
    print(f"\nkill -9 of rank 2 on n2: every process on every host gone in {gone:.2f} s")
    assert gone < 10
    assert not (tmp_path / "out" / "result.h5").exists()
    resume_over_hosts_and_compare(reference, tmp_path, job)  # at once: no lock left in the way


def test_an_error_on_another_host_is_one_line_naming_rank_and_host(tmp_path, matmul_slices):
    template, _ = matmul_slices
    weight = np.ones((96, 2), np.float32)
    export_mindir(cells.MatMulNeg(weight), [dynamic(96)], tmp_path / "p" / "p0.mindir")
    export_mindir(cells.FixedBatchOnly(weight, 4), [dynamic(96)], tmp_path / "p" / "p1.mindir")
    write_h5(tmp_path / "in.h5", {"x": np.ones((10, 96), np.float32)})
    doc = matmul_job(tmp_path, template, ranks=2, batch_size=4)
    doc["model"]["files"] = str(tmp_path / "p" / "p{rank}.mindir")
    result = run_cli("run", write_job(tmp_path, doc), launch=hosts_command(1, 1))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("spmdinfer: error:")]
    assert len(errors) == 1, result.stderr
    assert "rank 1 (n2)" in errors[0] and "rows 8..9" in errors[0], errors[0]


def test_watchdog_ends_a_rank_frozen_on_another_host(reference, tmp_path):
    job = copy_job(reference, tmp_path, batch_timeout=3)
    run = start_over_hosts(job)
    pids = stopped_while_watching(run, job)
    resume(pid for rank, pid in pids.items() if rank != 3)  # rank 3, on n3, stays frozen
    gone, _, stderr = all_gone(job, run, time.monotonic())
    # The ranks waiting on rank 3 end the job, and the launcher ends rank 3 on n3. (With
    # MPI_Abort, rank 3, its proxy and mpiexec stayed: spmdinfer.failure.abort says why.)
    assert re.search(r"\[rank [012]\] ERROR no progress on n[12] for 3\.\d s", stderr), stderr
    assert run.returncode not in (0, EXIT_STOPPED), stderr
    assert gone < 3 + 10, f"{gone:.1f} s"
    resume_over_hosts_and_compare(reference, tmp_path, job)


def test_a_rank_frozen_in_the_exit_on_a_third_host_is_ended(tmp_path):
    # test_reliability's case over three hosts, the frozen rank on n3: the ranks on n1 and n2
    # die of the alarm, and hydra ends n3's rank (failure.bound_exit).
    gone, output = run_frozen_at_exit(2, 3, hosts_command(1, 1, 1))
    assert output.count("at the exit") == 3, output  # the job started, and every rank got there
    assert gone is not None, output
    print(f"\na rank frozen in the exit on n3, bound 2 s: every process gone in {gone:.2f} s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_reaching_one_hosts_ranks_only(reference, tmp_path, signum):
    job = copy_job(reference, tmp_path)
    run = start_over_hosts(job)
    pids = stopped_at(run, job, 20)
    with held(pids.values()):
        for rank in (1, 2):  # both ranks on n2, as a host's own Slurm daemon would signal them
            os.kill(pids[rank], signum)
    gone, _, stderr = all_gone(job, run, time.monotonic())
    assert run.returncode == EXIT_STOPPED, stderr
    assert "stopped early" in stderr and "--resume" in stderr
    assert gone < 10
    resume_over_hosts_and_compare(reference, tmp_path, job)
