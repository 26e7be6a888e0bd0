"""Slices whose graphs communicate (AllGather, AllReduce inside the graph), exported under a
real MindSpore CPU cluster and run by spmdinfer under real mpiexec on the MindSpore cluster
it forms from the MPI world; numbers compared with numpy."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from spmdinfer.cluster import ClusterPlan, plan_cluster
from spmdinfer.errors import BackendError
from spmdinfer.journal import committed_batches
from spmdinfer.mindir import Collective
from spmdinfer.spec import parse_spec
from tests import cells
from tests.conftest import (PYTHON, REPO, UNDER_OPENMPI,
                            assert_clean_error, held, mpi_command, mpi_env, off_loopback_sockets,
                            rank_pids, read_h5, run_cli, write_h5, write_job)
from tests.export_collectives import FIXED_BATCH, seed_weight

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="session")
def collective_slices(tmp_path_factory):
    """size -> the folder of slices exported by `size` ranks of one MindSpore cluster."""
    exported = {}

    def export(size: int) -> Path:
        if size not in exported:
            folder = tmp_path_factory.mktemp(f"collective{size}")
            command = [*mpi_command(size), PYTHON, "-m", "tests.export_collectives", str(folder)]
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                    timeout=600, env=mpi_env(), stdin=subprocess.DEVNULL)
            assert result.returncode == 0, result.stderr[-3000:]
            exported[size] = folder
        return exported[size]

    return export


def job(folder: Path, slices: Path, kind: str, ranks: int, rows: int, batch: int,
        features: int = 96, seed: int = 0, **tables) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)
    write_h5(folder / "in.h5", {"x": x})
    doc = {"model": {"files": str(slices / (kind + "{rank}.mindir")), "ranks": ranks,
                     "backend": "mindspore"},
           "input": {"file": "in.h5", "batch_size": batch, "datasets": {"x": "/x"}},
           "output": {"file": "out/result.h5", "datasets": {"y": "/y"}}}
    doc.update(tables)
    return write_job(folder, doc), x


def tagged(folder: Path) -> dict:
    """An environment that marks the processes of the job in `folder` (see `schedulers`)."""
    return {"SPMDINFER_TEST_JOB": str(folder)}


def schedulers(folder: Path) -> list[int]:
    """Pids of the MindSpore schedulers still running for the job in `folder`."""
    found, mark = [], f"SPMDINFER_TEST_JOB={folder}\0".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"spmdinfer.cluster" in (proc / "cmdline").read_bytes() \
                    and mark in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def wait_until_gone(pids, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


# What the slices say, read without MPI.

def test_inspect_shows_each_collective(collective_slices):
    folder = collective_slices(2)
    result = run_cli("inspect", folder / "allgather1.mindir", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["collectives"] == [{"op": "AllGather", "group": "mccl_world_group",
                                      "rank_size": 2}]
    text = run_cli("inspect", folder / "allreduce0.mindir").stdout
    assert "AllReduce  group=mccl_world_group  rank_size=?" in text


def _spec(tmp_path: Path, ranks: int, stages: int = 1, target: str = "cpu"):
    text = (f'[model]\nfiles = "s{{rank}}.mindir"\nranks = {ranks}\nstages = {stages}\n'
            f'[device]\ntarget = "{target}"\n'
            '[input]\nfile = "in.h5"\n[input.datasets]\nx = "/x"\n'
            '[output]\nfile = "out.h5"\n[output.datasets]\ny = "/y"\n')
    return parse_spec(text, tmp_path / "job.toml")


def _found(ranks: int, *collectives: Collective, only=None) -> dict:
    return {r: {f"s{r}.mindir": list(collectives) if only is None or r in only else []}
            for r in range(ranks)}


GATHER2 = Collective("AllGather", "mccl_world_group", 2)


def test_plan_one_cluster_per_model_instance(tmp_path):
    plan = plan_cluster(_spec(tmp_path, 2), "mindspore", _found(2, GATHER2))
    assert plan == ClusterPlan("model", 2, "mccl_world_group", ("AllGather",), (0,))
    assert plan_cluster(_spec(tmp_path, 2), "mindspore", _found(2)) is None
    assert plan_cluster(_spec(tmp_path, 2), "mslite", _found(2, GATHER2)) is None  # Lite: its own


def test_plan_one_cluster_per_stage_when_the_group_is_a_stage(tmp_path):
    plan = plan_cluster(_spec(tmp_path, 4, stages=2), "mindspore",
                        _found(4, GATHER2, only={2, 3}))
    assert (plan.scope, plan.size, plan.stages) == ("stage", 2, (1,))


@pytest.mark.parametrize("ranks, collective, target, needle", [
    (4, GATHER2, "cpu", "exported for a group of 2 rank(s), but [model] ranks = 4"),
    (2, Collective("AllGather", "hccl_world_group", 2), "cpu",
     "talks in group 'hccl_world_group', but with [device] target = 'cpu' MindSpore's world "
     "group is 'mccl_world_group' (the slice was exported for ascend"),
    (2, GATHER2, "gpu", "world group is 'nccl_world_group' (the slice was exported for cpu"),
    (2, Collective("AllGather", "g01", 2), "cpu", "spmdinfer forms only the world group"),
    (2, Collective("Send", "hccl_world_group", None), "cpu",
     "Send cannot run on MindSpore's CPU runtime, which has a kernel for AllGather, AllReduce, "
     "Broadcast only"),
    (2, Collective("ReduceScatter", "mccl_world_group", 2), "cpu", "ReduceScatter cannot run"),
    (2, Collective("AllReduce", "mccl_world_group", None, "max"), "cpu",
     "AllReduce with op 'max' cannot run on MindSpore's CPU runtime"),
])
def test_plan_refuses_what_cannot_run(tmp_path, ranks, collective, target, needle):
    with pytest.raises(BackendError, match=None) as caught:
        plan_cluster(_spec(tmp_path, ranks, target=target), "mindspore", _found(ranks, collective))
    assert needle in str(caught.value) and "s0.mindir" in str(caught.value)


def test_plan_refuses_slices_that_disagree(tmp_path):
    found = _found(2, GATHER2)
    found[1] = {"s1.mindir": [Collective("AllGather", "mccl_world_group", 4)]}
    with pytest.raises(BackendError, match="disagree on their group's size: .* in s0.mindir"):
        plan_cluster(_spec(tmp_path, 2), "mindspore", found)


def test_validate_deep_checks_the_group_size(tmp_path, collective_slices):
    slices = collective_slices(2)
    path, _ = job(tmp_path, slices, "allgather", ranks=2, rows=10, batch=4)
    result = run_cli("validate", path, "--deep")
    assert result.returncode == 0, result.stderr
    assert "collectives: AllGather in mccl_world_group: a MindSpore cluster of 2 rank(s)" in \
        result.stdout
    path, _ = job(tmp_path, slices, "allgather", ranks=1, rows=10, batch=4)
    assert_clean_error(run_cli("validate", path, "--deep"), "allgather0.mindir",
                       "AllGather was exported for a group of 2 rank(s)")


def test_a_slice_for_another_target_is_refused_before_loading(tmp_path, collective_slices):
    path, _ = job(tmp_path, collective_slices(2), "allgather", ranks=2, rows=10, batch=4,
                  device={"target": "gpu"})
    result = run_cli("run", path, n=2)
    assert_clean_error(result, "allgather0.mindir", "nccl_world_group")
    assert not (tmp_path / "out").exists()


def test_send_receive_stages_are_refused_before_any_slice_loads(tmp_path, collective_slices):
    path, _ = job(tmp_path, collective_slices(2), "stages", ranks=2, rows=10, batch=FIXED_BATCH,
                  model={"files": str(collective_slices(2) / "stages{rank}.mindir"), "ranks": 2,
                         "stages": 2, "handoff": "graph", "backend": "mindspore"})
    result = run_cli("run", path, n=2, env={"SPMDINFER_LOG_LEVEL": "INFO"})
    assert_clean_error(result, "stages0.mindir", "Send cannot run on MindSpore's CPU runtime")
    assert "loaded" not in result.stderr and "joined MindSpore cluster" not in result.stderr
    assert not (tmp_path / "out").exists()


# Real runs.

@pytest.mark.parametrize("size", [pytest.param(2, marks=pytest.mark.launcher), 8])
def test_allgather_matmul_every_rank_returns_the_whole_output(tmp_path, collective_slices, size):
    path, x = job(tmp_path, collective_slices(size), "allgather", ranks=size, rows=203, batch=50)
    result = run_cli("run", path, n=size, env=tagged(tmp_path))
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]  # MPICH's word: stdout
    assert "UCX" not in result.stderr  # Open MPI's osc/ucx warning: spmdinfer turns it off
    assert np.allclose(read_h5(tmp_path / "out" / "result.h5", "y"), -(x @ seed_weight(size)),
                       rtol=1e-5, atol=1e-4)
    assert not schedulers(tmp_path)


def test_allreduce_mlp_with_replicas_one_cluster_each(tmp_path, collective_slices):
    path, x = job(tmp_path, collective_slices(2), "allreduce", ranks=2, rows=157, batch=20,
                  features=16, seed=3)
    result = run_cli("run", path, n=4, env={"SPMDINFER_LOG_LEVEL": "INFO"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("joined MindSpore cluster 0") == 2
    assert result.stderr.count("joined MindSpore cluster 1") == 2
    reference = cells.mlp_reference(x, *cells.mlp_weights(16, 32, 8))
    assert np.allclose(read_h5(tmp_path / "out" / "result.h5", "y"), reference, atol=1e-4)


def test_fixed_batch_graph_pads_the_ragged_last_batch(tmp_path, collective_slices):
    path, x = job(tmp_path, collective_slices(2), "fixed", ranks=2, rows=70, batch=FIXED_BATCH)
    result = run_cli("run", path, n=2)
    assert result.returncode == 0, result.stderr
    out = read_h5(tmp_path / "out" / "result.h5", "y")
    assert out.shape == (70, 16)
    assert np.allclose(out, -(x @ seed_weight(2)), rtol=1e-5, atol=1e-4)


@pytest.mark.launcher
def test_a_rank_failing_while_its_peer_waits_in_the_collective(tmp_path, collective_slices):
    """Rank 1's graph fails on the short last batch; rank 0 is inside the AllGather then."""
    path, _ = job(tmp_path, collective_slices(2), "failing", ranks=2, rows=70, batch=FIXED_BATCH)
    began = time.monotonic()
    result = run_cli("run", path, n=2, timeout=120, env=tagged(tmp_path))
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("spmdinfer: error:")]
    assert len(errors) == 1, result.stderr
    assert "rank 1" in errors[0] and "rows 64..69" in errors[0], errors[0]
    assert time.monotonic() - began < 100
    assert not schedulers(tmp_path)
    assert not (tmp_path / "out" / "result.h5.lock").exists()


@pytest.mark.launcher
def test_kill_9_mid_collective_then_resume_is_identical(tmp_path, collective_slices):
    slices = collective_slices(2)
    path, x = job(tmp_path, slices, "allgather", ranks=2, rows=3000, batch=10)
    process = subprocess.Popen(
        [*mpi_command(2), PYTHON, "-m", "spmdinfer", "run", str(path)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(**tagged(tmp_path)))
    deadline = time.monotonic() + 240
    while committed_batches(tmp_path / "out" / "result.h5") < 5:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pids = rank_pids(path)
    leftover = schedulers(tmp_path)
    with held(pids.values()):
        # MindSpore's cluster, scheduler included, stays on loopback too.
        assert off_loopback_sockets([*pids.values(), *leftover]) == []
        os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    process.communicate(timeout=60)
    assert process.returncode != 0
    wait_until_gone(list(pids.values()) + leftover, timeout=10)
    assert time.monotonic() - killed < 10
    result = run_cli("run", path, "--resume", n=2)
    assert result.returncode == 0, result.stderr
    out = read_h5(tmp_path / "out" / "result.h5", "y")
    uninterrupted = tmp_path / "again"
    uninterrupted.mkdir()
    again, _ = job(uninterrupted, slices, "allgather", ranks=2, rows=3000, batch=10)
    assert run_cli("run", again, n=2).returncode == 0
    assert np.array_equal(out, read_h5(uninterrupted / "out" / "result.h5", "y"))
    assert np.allclose(out, -(x @ seed_weight(2)), rtol=1e-5, atol=1e-4)


@pytest.mark.launcher
def test_the_scheduler_dies_with_its_rank_and_frees_its_port(tmp_path, collective_slices):
    path, _ = job(tmp_path, collective_slices(2), "allgather", ranks=2, rows=3000, batch=10)
    log = tmp_path / "launcher.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [*mpi_command(2), PYTHON, "-m", "spmdinfer", "run", str(path)], cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=sink, env=mpi_env(**tagged(tmp_path)))
    deadline = time.monotonic() + 240
    while committed_batches(tmp_path / "out" / "result.h5") < 2:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    [scheduler] = schedulers(tmp_path)
    port = int(dict(item.split("=", 1) for item in Path(f"/proc/{scheduler}/environ")
                    .read_text().split("\0") if "=" in item)["MS_SCHED_PORT"])
    os.kill(rank_pids(path)[0], signal.SIGKILL)  # the rank that started it
    process.wait(timeout=60)
    wait_until_gone([scheduler], timeout=10)
    with socket.socket() as probe:  # nobody listens on the port any more (TIME_WAIT aside)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()


LEAVE = """
import atexit, os, sys
from spmdinfer import cluster

class Teardown:
    def __del__(self, os=os, path=sys.argv[1] + ".teardown"):  # runs in the teardown only
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY))

keep = Teardown()
atexit.register(lambda: open(sys.argv[1] + ".atexit", "w").close())
cluster._member = True
print("summary", end="")  # no newline: only a flush gets it out
cluster.leave(3)
"""


@pytest.mark.launcher
def test_a_cluster_worker_exits_with_its_code_past_the_teardown(tmp_path):
    # What spmdinfer.cluster.leave promises: the output flushed, the atexit hooks run (MindSpore's
    # leaves the cluster, the scheduler is reaped), the exit code kept, the teardown skipped.
    mark = str(tmp_path / "mark")
    result = subprocess.run([PYTHON, "-c", LEAVE, mark], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert (result.returncode, result.stdout) == (3, "summary"), result.stderr
    assert Path(mark + ".atexit").exists() and not Path(mark + ".teardown").exists()


LINGER = """
import os, sys, time
from mpi4py import MPI
from spmdinfer import exiting

rank = MPI.COMM_WORLD.rank
MPI.COMM_WORLD.Barrier()
MPI.Finalize()
if sys.argv[1] == "tell":
    exiting.tell_hydra_finalized(MPI.Get_library_version())
if rank % 2 == 0:  # still at work when the odd ranks have exited
    time.sleep(float(sys.argv[3]))
    open(sys.argv[2] + str(rank), "w").close()
os._exit(0)
"""


@pytest.mark.parametrize("tell", ["tell", "tell-proxy-not-forked", "skip"])
@pytest.mark.launcher
def test_a_rank_that_ends_with_os_exit_after_finalize_lets_the_others_finish(tmp_path, tell):
    # cluster.leave ends with os._exit after MPI_Finalize; MPICH tells its launcher only from a
    # C atexit handler, and without that the launcher kills the ranks still running (exit 9).
    # A proxy that ssh or srun (`-launcher slurm`) started has no HYDI_CONTROL_FD, which a
    # forked one passes to its ranks: the call must not depend on it (`env -u` below).
    mark = str(tmp_path / "done")
    # Without the call the even ranks would work 300 s, unless the launcher kills them first.
    tell, proxy = tell.partition("-")[::2]
    work = "2" if tell == "tell" or UNDER_OPENMPI else "300"
    started = ["env", "-u", "HYDI_CONTROL_FD"] if proxy else []
    result = subprocess.run([*mpi_command(4), *started, PYTHON, "-c", LINGER, tell, mark, work],
                            cwd=REPO,
                            capture_output=True, text=True, timeout=600, env=mpi_env(),
                            stdin=subprocess.DEVNULL)
    finished = sorted(p.name for p in tmp_path.iterdir())
    if tell == "tell" or UNDER_OPENMPI:  # Open MPI needs nothing more than MPI_Finalize
        assert (result.returncode, finished) == (0, ["done0", "done2"]), result.stdout + result.stderr
    else:  # what the call prevents, so that this test can fail: the ranks still at work are
        # killed before they finish (MPICH reports exit 9, or at times the first exit's 0)
        assert finished == [], (result.returncode, result.stdout + result.stderr)


def test_mindspores_native_exit_hook_is_noted_as_it_is_registered():
    # cluster.leave skips the exit hooks MindSpore registers; its C++ one (where a worker
    # crashed at exit) must be among those spmdinfer notes, or leave would still run it.
    code = ("import types; from spmdinfer.backends.mindspore import exit_hooks, preload; preload(); "
            "print(sum(not isinstance(h, types.FunctionType) for h in exit_hooks))")
    result = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) >= 1
