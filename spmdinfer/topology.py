"""Who am I: one object with this process's rank, node, device and thread count; and what
this node gives it (memory, the ranks the launcher put beside it)."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .errors import WorldSizeError
from .spec import DeviceSpec, JobSpec

# Launchers that export the node-local rank, in the order they are trusted.
LOCAL_RANK_VARIABLES = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                        "PMI_LOCAL_RANK")
# Launchers that export how many ranks share this node, in the order they are trusted.
LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")
# Launchers that export the global rank; read only to print once before MPI starts.
WORLD_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def under_hydra() -> bool:
    """Whether MPICH's launcher (hydra) started this rank. Its proxy sets MPI_LOCALRANKID for
    every rank it starts, whatever started the proxy (mpiexec's fork, ssh, srun under
    `-launcher slurm`); srun's own PMI and Open MPI set other names. (HYDI_CONTROL_FD, which
    spmdinfer once read, is there only when mpiexec forked the proxy itself.)"""
    return "MPI_LOCALRANKID" in os.environ


@dataclass(frozen=True)
class Layout:
    """Where a world rank sits: replica, then stage, then rank inside the stage.

    Consecutive world ranks form a replica (so a replica stays on one node when
    ranks per node is a multiple of `ranks`); inside a replica, consecutive
    model ranks form a stage.
    """

    rank: int
    size: int
    ranks: int    # model ranks per replica
    stages: int

    @property
    def replicas(self) -> int:
        return self.size // self.ranks

    @property
    def replica(self) -> int:
        return self.rank // self.ranks

    @property
    def model_rank(self) -> int:
        return self.rank % self.ranks

    @property
    def per_stage(self) -> int:
        return self.ranks // self.stages

    @property
    def stage(self) -> int:
        return self.model_rank // self.per_stage

    @property
    def stage_rank(self) -> int:
        return self.model_rank % self.per_stage

    def leader(self, replica: int, stage: int) -> int:
        """The world rank that leads `stage` of `replica` (its first rank)."""
        return replica * self.ranks + stage * self.per_stage


def layout_for(size: int, rank: int, spec: JobSpec) -> Layout:
    """The Layout of world rank `rank` in a world of `size`; WorldSizeError if it does not fit."""
    ranks = spec.model.ranks
    if size % ranks:
        raise WorldSizeError(f"world size {size} is not a multiple of [model] ranks = {ranks}; "
                             f"launch with mpiexec -n {ranks} (or a multiple of it for replicas)")
    return Layout(rank=rank, size=size, ranks=ranks, stages=spec.model.stages)


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job, and what it runs on."""

    layout: Layout
    local_rank: int
    local_size: int
    host: str
    device_id: int | None
    threads: int
    cores: frozenset[int]   # the cores its kernels run on: `threads` of its CPU mask
    # the cores of its prefetch and commit threads (helper_cores); empty: not pinned
    helper_cores: frozenset[int] = frozenset()

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def model_rank(self) -> int:
        return self.layout.model_rank

    def __str__(self) -> str:
        layout = self.layout
        device = "" if self.device_id is None else f" device={self.device_id}"
        return (f"rank {layout.rank}/{layout.size} on {self.host} (local {self.local_rank}/"
                f"{self.local_size}) replica={layout.replica} stage={layout.stage} "
                f"model_rank={layout.model_rank}{device} threads={self.threads} "
                f"cores={','.join(map(str, sorted(self.cores)))}"
                f"{' helpers=' + ','.join(map(str, sorted(self.helper_cores))) if self.helper_cores else ''}")


def launcher_rank() -> int:
    """This process's global rank as the launcher exported it (0 when not launched by one)."""
    for name in WORLD_RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def discover(comm, spec: JobSpec) -> RankInfo:
    """Build this rank's RankInfo from `comm` and the launcher's environment."""
    layout = layout_for(comm.size, comm.rank, spec)
    node = comm.Split_type(_shared_split_type(), key=comm.rank)
    try:
        node_rank, local_size = node.rank, node.size
        masks = node.allgather(cpu_mask())
    finally:
        node.Free()
    local_rank = env_local_rank(node_rank, comm.rank)
    threads = threads_for(spec.device, sharing(masks, node_rank))
    return RankInfo(layout=layout, local_rank=local_rank, local_size=local_size,
                    host=node_name(), device_id=device_for(spec.device, local_rank),
                    threads=threads, cores=core_share(masks, node_rank, threads),
                    helper_cores=helper_cores(masks, node_rank, spec.device))


def node_name() -> str:
    """The node this rank runs on: Slurm's name for it where Slurm launched us, else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def env_local_rank(default: int, rank: int | None = None) -> int:
    """The node-local rank the launcher exported, else `default`.

    SLURM_LOCALID counts only when Slurm started this very rank (SLURM_PROCID is the MPI
    rank): under mpiexec inside an allocation every rank inherits the batch step's 0.
    """
    for name in LOCAL_RANK_VARIABLES:
        value = os.environ.get(name, "")
        if name == "SLURM_LOCALID" and rank is not None and \
                os.environ.get("SLURM_PROCID", "") != str(rank):
            continue
        if value.isdigit():
            return int(value)
    return default


VISIBLE_DEVICES = {"gpu": "CUDA_VISIBLE_DEVICES", "ascend": "ASCEND_RT_VISIBLE_DEVICES"}


def device_for(device: DeviceSpec, local_rank: int) -> int | None:
    """The device id the framework gets for the rank with this node-local rank; None on CPU.

    With CUDA_VISIBLE_DEVICES (gpu) or ASCEND_RT_VISIBLE_DEVICES (ascend) set, the id is
    an index into that list, as the frameworks number only the visible devices.
    """
    if device.target == "cpu":
        return None
    if device.device_id == "local":
        chosen = local_rank
    elif isinstance(device.device_id, tuple):
        if local_rank >= len(device.device_id):
            raise WorldSizeError(f"[device] device_id lists {len(device.device_id)} devices but "
                                 f"node-local rank {local_rank} needs one")
        chosen = device.device_id[local_rank]
    else:
        chosen = device.device_id
    visible = visible_devices(device.target)
    if visible is not None and chosen >= len(visible):
        raise WorldSizeError(f"[device] device_id: node-local rank {local_rank} gets device {chosen}, "
                             f"but {VISIBLE_DEVICES[device.target]}={','.join(visible)} makes only "
                             f"{len(visible)} visible")
    return chosen


def visible_devices(target: str) -> list[str] | None:
    """The visible-devices list the launcher set for `target`, or None."""
    value = os.environ.get(VISIBLE_DEVICES.get(target, ""), "").strip()
    return [d.strip() for d in value.split(",") if d.strip()] if value else None


def physical_device(target: str, device_id: int | None) -> str | None:
    """The device as the node knows it: the visible list's entry, or the id itself."""
    if device_id is None:
        return None
    visible = visible_devices(target)
    return visible[device_id] if visible is not None else str(device_id)


def threads_for(device: DeviceSpec, sharing: int, usable: int | None = None) -> int:
    """CPU threads per rank: as set, or this rank's cores (`usable`, by default this
    process's) shared evenly by the `sharing` ranks of the node that may run on them."""
    if device.threads:
        return device.threads
    return max(1, (usable or usable_cores()) // max(1, sharing))


def sharing(masks: list[frozenset[int]], node_rank: int) -> int:
    """How many ranks of a node (their CPU masks, `masks[node_rank]` this one's) may run on
    this rank's cores. Unbound ranks (MPICH's default) all share every core; a launcher that
    binds (Open MPI's default, `--bind-to core`, srun's `--cpu-bind`) has already given each
    rank its share, which is not to be divided again."""
    mine = masks[node_rank]
    return sum(1 for mask in masks if mask & mine) or 1


def core_share(masks: list[frozenset[int]], node_rank: int, threads: int) -> frozenset[int]:
    """The `threads` cores of this rank's mask (`masks[node_rank]`) that its kernels run on:
    the ranks that share a mask take its cores in turn, in node-rank order, so that two
    unbound one-thread ranks on two cores get a core each."""
    mine = masks[node_rank]
    if threads >= len(mine):
        return mine
    cores = sorted(mine)
    turn = sum(1 for mask in masks[:node_rank] if mask & mine)
    first = turn * threads % len(cores)
    return frozenset((cores + cores)[first:first + threads])


def helper_cores(masks: list[frozenset[int]], node_rank: int, device: DeviceSpec) -> frozenset[int]:
    """The cores for this rank's prefetch and commit threads: the cores of its mask that no
    rank of the node runs its kernels on (each rank's core_share), where there is at least one
    for each rank that shares the mask (`threads` set low, or whole cores left over), so they
    never take a predicting rank's core. Otherwise empty: the threads keep the rank's mask. A
    launcher that binds has put them on their rank's cores already, and unbound ranks'
    helpers go where the scheduler finds room; squeezed onto a remainder core (3 ranks on 4
    cores) they would queue behind each other, and pinned to their own rank's core they cost
    the suite's I/O-bound case 13% on 2 cores (docs/performance.md), because a peer that
    waits for its batch leaves its core idle."""
    shares = [core_share(masks, rank, threads_for(device, sharing(masks, rank), len(mask)))
              for rank, mask in enumerate(masks)]
    spare = masks[node_rank] - frozenset().union(*shares)
    return spare if len(spare) >= sharing(masks, node_rank) else frozenset()


def pin_thread(cores: frozenset[int]) -> None:
    """Run the calling thread (not the process) on `cores`; nothing when empty or where
    the system has no such call."""
    if cores:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setaffinity(0, cores)  # Linux: 0 is the calling thread


def cpu_mask() -> frozenset[int]:
    """The cores this process may run on."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """Cores this process may run on."""
    return len(cpu_mask())


def _shared_split_type() -> int:
    from mpi4py import MPI

    return MPI.COMM_TYPE_SHARED


def available_memory() -> int | None:
    """Bytes of memory available to this process: MemAvailable (else free pages), capped
    by the memory limit of its cgroup where one is set; None when unknown."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    limit = cgroup_memory_limit()
    return available if limit is None else min(available, limit)


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max, v1 limit_in_bytes), or None.

    A Slurm job or a container sees the whole node in /proc/meminfo, but may only use
    its cgroup's limit.
    """
    try:
        with open("/proc/self/cgroup") as cgroups:
            lines = [line.rstrip("\n").split(":", 2) for line in cgroups]
    except OSError:
        return None
    candidates = []
    for _, controllers, path in (parts for parts in lines if len(parts) == 3):
        relative = path.lstrip("/")
        if controllers == "":
            candidates += [Path("/sys/fs/cgroup", relative, "memory.max"),
                           Path("/sys/fs/cgroup/memory.max")]
        elif "memory" in controllers.split(","):
            candidates += [Path("/sys/fs/cgroup/memory", relative, "memory.limit_in_bytes"),
                           Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    for candidate in candidates:
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        return int(text) if text.isdigit() else None  # "max": no limit
    return None


def launcher_ranks_on_node() -> int:
    """How many ranks the launcher started on this node; 1 when it does not say."""
    for name in LOCAL_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1
