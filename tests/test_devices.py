"""Node-local device mapping: the launcher's local rank, explicit lists, visible-device lists,
and two ranks on one node never sharing a device; 2 simulated nodes x 4 ranks."""

import re
import subprocess

import numpy as np
import pytest

from spmdinfer.errors import WorldSizeError
from spmdinfer.spec import DeviceSpec
from spmdinfer.topology import device_for, env_local_rank, physical_device
from tests.conftest import PYTHON, REPO, launcher, matmul_job, mpi_env, write_h5, write_job

pytestmark = pytest.mark.launcher

GPU = DeviceSpec(target="gpu")


def test_local_rank_comes_from_the_launcher_in_order(monkeypatch):
    for name in ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert env_local_rank(7) == 7  # no launcher variable: the shared-memory split's answer
    monkeypatch.setenv("PMI_LOCAL_RANK", "3")
    assert env_local_rank(7) == 3
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "2")
    assert env_local_rank(7) == 2
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert env_local_rank(7) == 1
    # Under mpiexec inside an allocation every rank inherits the batch step's SLURM_LOCALID:
    # it counts only for the rank Slurm itself started.
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert env_local_rank(7, rank=0) == 1 and env_local_rank(7, rank=5) == 2


def test_visible_devices_are_indexed(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert [device_for(GPU, r) for r in range(4)] == [0, 1, 2, 3]
    assert physical_device("gpu", 2) == "6"
    with pytest.raises(WorldSizeError, match="CUDA_VISIBLE_DEVICES=4,5,6,7 makes only 4 visible"):
        device_for(GPU, 4)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "2,3")
    assert physical_device("ascend", 1) == "3"
    assert device_for(DeviceSpec(target="ascend", device_id=(1, 0)), 0) == 1
    assert device_for(DeviceSpec(target="cpu"), 3) is None


def simulated_nodes(job, nodes: int, per_node: int, extra_env=()):
    """The launcher in MPMD form (`A : B : ...`, which MPICH and Open MPI both take): every
    rank gets its node's name, its rank and its node-local rank, as srun would export them
    (SLURMD_NODENAME, SLURM_PROCID, SLURM_LOCALID), through `env`."""
    command = launcher()
    for rank in range(nodes * per_node):
        if rank:
            command.append(":")
        variables = {"SLURMD_NODENAME": f"n{rank // per_node}", "SLURM_PROCID": str(rank),
                     "SLURM_LOCALID": str(rank % per_node), "SPMDINFER_LOG_LEVEL": "INFO",
                     **dict(extra_env)}
        command += ["-n", "1", "env", *(f"{k}={v}" for k, v in variables.items()),
                    PYTHON, "-m", "spmdinfer", "run", str(job)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=mpi_env())


@pytest.fixture
def gpu_job(tmp_path, matmul_slices):
    template, _ = matmul_slices
    write_h5(tmp_path / "in.h5", {"x": np.ones((4, 96), np.float32)})
    doc = matmul_job(tmp_path, template, ranks=8)
    doc["device"] = {"target": "gpu"}
    return tmp_path, doc


def test_two_nodes_of_four_ranks_get_devices_0_to_3_each(gpu_job):
    folder, doc = gpu_job
    result = simulated_nodes(write_job(folder, doc), 2, 4, [("CUDA_VISIBLE_DEVICES", "4,5,6,7")])
    placed = sorted(line.split("] INFO ", 1)[1] for line in result.stderr.splitlines()
                    if "INFO rank" in line and "device=" in line)
    assert len(placed) == 8, result.stderr
    for line in placed:
        rank = int(line.split()[1].split("/")[0])
        assert f"on n{rank // 4} " in line and f"model_rank={rank} device={rank % 4} " in line
    # No GPU here: MindSpore cannot start on one, and says so once; nothing is written.
    assert result.returncode == 2 and not (folder / "out" / "result.h5").exists()


def test_two_ranks_of_a_node_on_one_device_is_refused_before_loading(gpu_job):
    folder, doc = gpu_job
    doc["device"]["device_id"] = [0, 1, 2, 2]
    result = simulated_nodes(write_job(folder, doc), 2, 4)
    errors = [line for line in result.stderr.splitlines() if line.startswith("spmdinfer: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "ranks 2 and 3 on n0 would both use gpu device 2" in errors[0]
    assert "loaded" not in result.stderr


PATIENCE = ("import sys; from mpi4py import MPI; from spmdinfer.comm import Channel, Peers; "
            "p = Peers(MPI.COMM_WORLD); c = Channel(MPI.COMM_WORLD, p); "
            "before = c.patience; c.finishing(); "
            "sys.stdout.write(f'patience={before} finishing={c.patience}\\n'); c.close(); p.close()")


@pytest.mark.parametrize("cores, expected", [
    # bound to a core each (Open MPI's default): a wait may yield, longer after the last batch
    (["0", "1"], "patience=0.001 finishing=0.02"),
    (["0-1", "0-1", "0-1", "0-1"], "patience=0.0 finishing=0.0"),  # 4 unbound on 2 cores: sleep
])
def test_waits_yield_only_where_a_rank_has_its_cores_to_itself(cores, expected):
    command = launcher()
    for rank, mask in enumerate(cores):
        command += [":"] * bool(rank) + ["-n", "1", "taskset", "-c", mask, PYTHON, "-c", PATIENCE]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=mpi_env())
    assert result.returncode == 0, result.stderr
    said = re.findall(r"patience=\d\.\d+ finishing=\d\.\d+", result.stdout)
    assert said == [expected] * len(cores), result.stdout
