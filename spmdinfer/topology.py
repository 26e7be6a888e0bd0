"""Who am I: one object with this process's rank, node, device and thread count."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from .errors import WorldSizeError
from .spec import DeviceSpec, JobSpec

# Launchers that export the node-local rank, in the order they are trusted.
LOCAL_RANK_VARIABLES = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                        "PMI_LOCAL_RANK")
# Launchers that export the global rank; read only to print once before MPI starts.
WORLD_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    host: str
    model_rank: int
    device_id: int | None
    threads: int

    def __str__(self) -> str:
        device = "" if self.device_id is None else f" device={self.device_id}"
        return (f"rank {self.rank}/{self.size} on {self.host} (local {self.local_rank}/"
                f"{self.local_size}) model_rank={self.model_rank}{device} threads={self.threads}")


def launcher_rank() -> int:
    """This process's global rank as the launcher exported it (0 when not launched by one)."""
    for name in WORLD_RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def discover(comm, spec: JobSpec) -> RankInfo:
    """Build this rank's RankInfo from `comm` and the launcher's environment."""
    if comm.size != spec.model.ranks:
        raise WorldSizeError(f"world size {comm.size} does not match [model] ranks = "
                             f"{spec.model.ranks}; launch with mpiexec -n {spec.model.ranks}")
    node = comm.Split_type(_shared_split_type(), key=comm.rank)
    try:
        local_rank, local_size = node.rank, node.size
    finally:
        node.Free()
    for name in LOCAL_RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            local_rank = int(value)
            break
    return RankInfo(rank=comm.rank, size=comm.size, local_rank=local_rank, local_size=local_size,
                    host=socket.gethostname(), model_rank=comm.rank % spec.model.ranks,
                    device_id=device_for(spec.device, local_rank),
                    threads=threads_for(spec.device, local_size))


def device_for(device: DeviceSpec, local_rank: int) -> int | None:
    """The device id of the rank with this node-local rank; None on CPU."""
    if device.target == "cpu":
        return None
    if device.device_id == "local":
        return local_rank
    if isinstance(device.device_id, tuple):
        if local_rank >= len(device.device_id):
            raise WorldSizeError(f"[device] device_id lists {len(device.device_id)} devices but "
                                 f"node-local rank {local_rank} needs one")
        return device.device_id[local_rank]
    return device.device_id


def threads_for(device: DeviceSpec, local_size: int) -> int:
    """CPU threads per rank: as set, or the node's cores shared evenly by its ranks."""
    if device.threads:
        return device.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_size))


def _shared_split_type() -> int:
    from mpi4py import MPI

    return MPI.COMM_TYPE_SHARED
