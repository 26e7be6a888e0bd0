"""A MindSpore collective cluster, formed from the MPI world, for slices that communicate
inside their graphs.

MindSpore's distributed export writes slices whose graphs carry their own communication
(AllGather, AllReduce, ... in the world group of the device's collective library:
mccl_world_group on CPU, nccl_world_group on GPU, hccl_world_group on Ascend). Such a
slice runs only in a process that has joined a MindSpore *dynamic cluster*: one scheduler
process, and every rank a worker told the scheduler's address, the worker count and its
own id through MS_* variables, then `mindspore.communication.init()`. Without it
MindSpore crashes (SIGSEGV) in load or predict.

spmdinfer forms that cluster before any slice loads, from what the slices say
(`mindir.read_collectives`), so that no job key is needed:

- Who: the ranks that run the graphs' group. A group of `ranks` ranks is one model
  instance (each replica forms a cluster of its own); a group of `ranks / stages` ranks is
  one pipeline stage (each stage of each replica forms its own).
- The scheduler runs as a child of the cluster's first rank (`python -m spmdinfer.cluster`),
  on that rank's host and on a port the OS chose there just before. It dies with that
  rank (PR_SET_PDEATHSIG), and the rank waits for it at exit, once every worker has left
  it. A scheduler left by a killed job holds its own port, so a new job, whose port the OS
  picks fresh, can never reach it.
- Lining up: every rank imports MindSpore while the scheduler starts (MindSpore reads its
  cluster variables only in init()), waits over MPI (politely) until the scheduler
  listens, and then every rank calls init() at once, so that MindSpore's registration does
  not spin on retries. MindSpore paces the rest by its heartbeat and retry intervals
  (MS_RETRY_INTERVAL_LOWER / UPPER, a random 3 to 5 s by default): spmdinfer sets them to
  0 and 1 unless the user set them, which cut init() for 8 ranks from 8.4 s to 5.5 s here.
  What is left is mostly a fixed `sleep(3)` in MindSpore's CPU collective node, which polls
  for the other ranks' addresses every 3 s (docs/collectives.md).

A rank that fails while its peers wait inside a collective, in native code, cannot be
heard by them through MPI: `PeerWatch` listens for them (a thread; MindSpore releases the
GIL while a graph runs), and ends a rank stuck in MindSpore once a peer has failed.
"""

from __future__ import annotations

import atexit
import ctypes
import faulthandler
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import NoReturn

from . import exiting
from .errors import BackendError, PeerFailed, SpmdinferError
from .log import log
from .mindir import WORLD_GROUPS, Collective, read_collectives

# What MindSpore 2.10's CPU runtime runs from a MindIR slice (docs/collectives.md has the
# measurements): AllGather in the world group, AllReduce with sum (float32, float16), and
# Broadcast. Every other communicating op exports and loads, then fails at the first predict
# ("Unsupported op [Send] on CPU"), so it is refused before any slice loads.
CPU_OPS = ("AllGather", "AllReduce", "Broadcast")
SCHEDULER_TIMEOUT = 120.0   # seconds for the scheduler to listen (it imports MindSpore first)
# MindSpore's heartbeat and retry pace, in seconds (a random whole number in [LOWER, UPPER]),
# unless the user set them: 3 to 5 by default, which adds seconds to every init().
# (MS_DISABLE_HEARTBEAT=1 is not set: with it, 2 of 3 exports of the test slices crashed.)
RETRY_INTERVALS = {"MS_RETRY_INTERVAL_LOWER": "0", "MS_RETRY_INTERVAL_UPPER": "1"}
LOCAL_HOST = "127.0.0.1"
HOST_VARIABLE = "SPMDINFER_CLUSTER_HOST"  # the address other hosts reach a scheduler at


@dataclass(frozen=True)
class ClusterPlan:
    """Which ranks form MindSpore clusters, and how big each is."""

    scope: str      # "model": one cluster per replica; "stage": one per stage of each replica
    size: int       # workers per cluster: the graphs' rank_size
    group: str      # the world group the graphs name
    ops: tuple[str, ...]
    stages: tuple[int, ...]   # the stages whose ranks join (every stage for "model")

    def cluster_of(self, layout) -> int | None:
        """The number of the cluster world rank `layout.rank` joins, or None."""
        if self.scope == "model":
            return layout.replica
        if layout.stage not in self.stages:
            return None
        return layout.replica * layout.stages + layout.stage

    def node_id(self, layout) -> int:
        """This rank's id inside its cluster (MindSpore's rank in the world group)."""
        return layout.model_rank if self.scope == "model" else layout.stage_rank

    def __str__(self) -> str:
        where = "each model instance" if self.scope == "model" else \
            f"stage(s) {', '.join(map(str, self.stages))} of each model instance"
        return (f"{', '.join(self.ops)} in {self.group}: a MindSpore cluster of {self.size} "
                f"rank(s) for {where}")


def plan_cluster(spec, backend: str,
                 found: dict[int, dict[str, list[Collective]]]) -> ClusterPlan | None:
    """The clusters a job needs, from every model rank's {slice file: collectives}; None for
    independent graphs (or MindSpore Lite, which forms its own communication).

    Raises BackendError, naming the op and the slice, for what cannot run.
    """
    listed = [(rank, path, c) for rank, files in sorted(found.items())
              for path, collectives in files.items() for c in collectives]
    if not listed or backend == "mslite":
        return None
    model, target = spec.model, spec.device.target
    if backend != "mindspore":
        _, path, c = listed[0]
        raise BackendError(f"slice {path}: its graph communicates ({c.op}); only the mindspore "
                           f"backend can form the collective cluster it needs, not {backend!r}")
    expected = WORLD_GROUPS[target]
    for _, path, c in listed:
        if target == "cpu" and c.op not in CPU_OPS:
            raise BackendError(f"slice {path}: {c.op} cannot run on MindSpore's CPU runtime, which "
                               f"has a kernel for {', '.join(CPU_OPS)} only (for pipeline stages, "
                               "use [model] handoff = \"host\")")
        if target == "cpu" and c.op == "AllReduce" and c.reduce not in (None, "sum"):
            raise BackendError(f"slice {path}: AllReduce with op {c.reduce!r} cannot run on "
                               "MindSpore's CPU runtime, which reduces by sum only")
        if c.group is not None and c.group != expected:
            made_for = [t for t, g in WORLD_GROUPS.items() if g == c.group]
            hint = (f" (the slice was exported for {made_for[0]}; export it again on {target} "
                    "or set [device] target)" if made_for else
                    "; spmdinfer forms only the world group")
            raise BackendError(f"slice {path}: {c.op} talks in group {c.group!r}, but with [device] "
                               f"target = {target!r} MindSpore's world group is {expected!r}{hint}")
    sized = [(path, c) for _, path, c in listed if c.rank_size is not None]
    sizes = sorted({c.rank_size for _, c in sized})
    if len(sizes) > 1:
        (path_a, a), (path_b, b) = (next(s for s in sized if s[1].rank_size == size)
                                    for size in sizes[:2])
        raise BackendError(f"slices disagree on their group's size: {a} in {path_a}, {b} in {path_b}")
    size = sizes[0] if sizes else model.ranks
    per_stage = model.ranks_per_stage
    if size == model.ranks:
        scope, stages = "model", tuple(range(model.stages))
    elif model.stages > 1 and size == per_stage:
        scope = "stage"
        stages = tuple(sorted({rank // per_stage for rank, _, _ in listed}))
    else:
        path, c = sized[0]
        runs = f"{model.ranks}" + (f" ({per_stage} per stage)" if model.stages > 1 else "")
        raise BackendError(f"slice {path}: {c.op} was exported for a group of {size} rank(s), but "
                           f"[model] ranks = {model.ranks} runs it on {runs}")
    ops = tuple(dict.fromkeys(c.op for _, _, c in listed))
    return ClusterPlan(scope, size, expected, ops, stages)


def slice_collectives(spec, model_rank: int) -> dict[str, list[Collective]]:
    """{slice file: collectives} for the graphs of one model rank (MindIR files only)."""
    return {str(p): read_collectives(p) if p.suffix.lower() == ".mindir" else []
            for p in spec.model.graph_paths(model_rank)}


# Forming the cluster (every rank of the world takes part).

@dataclass(frozen=True)
class Membership:
    """This rank's place in a MindSpore cluster."""

    plan: ClusterPlan
    cluster: int             # which cluster (replica, or replica * stages + stage)
    node_id: int             # MindSpore's rank of this worker in the world group
    watch: "PeerWatch"
    comm: object = None      # the cluster's workers over MPI: they leave together (`leave`)


def form(world, spec, info, backend: str) -> Membership | None:
    """Join this rank to its MindSpore cluster, if the job's slices need one (collective:
    every rank of `world` calls it, before any slice loads).

    Every rank reads its own slices' collectives; the plan is agreed before anything
    starts, so a slice that cannot run is refused before any model loads.
    """
    error, own = None, None
    try:
        own = slice_collectives(spec, info.model_rank)
    except SpmdinferError as exc:
        error = exc
    world.agree(error)
    found: dict[int, dict[str, list[Collective]]] = {}
    hosts = []
    for model_rank, files, host in world.allgather_objects((info.model_rank, own, info.host)):
        found.setdefault(model_rank, files)
        hosts.append(host)
    error, plan = None, None
    try:
        plan = plan_cluster(spec, backend, found)
    except SpmdinferError as exc:
        error = exc
    world.agree(error if world.is_root else None)  # every rank found the same
    if plan is None:
        return None
    layout = info.layout
    clusters = layout.replicas * layout.stages
    number = plan.cluster_of(layout)
    group = world.split(clusters + world.rank if number is None else number)
    try:
        if number is None:  # a stage that does not communicate: in the agreements only
            world.agree(None)  # the schedulers listen
            world.agree(None)  # every worker joined
            return None
        began = time.monotonic()
        scheduler, error = None, None
        if group.is_root:
            try:
                host = scheduler_host([hosts[r] for r in group_ranks(world, group)])
                scheduler = Scheduler(host, plan.size, spec.device.target)
                scheduler.launch()
            except (SpmdinferError, OSError) as exc:
                error = BackendError(f"cannot start the MindSpore cluster's scheduler: {exc}")
        from .backends.mindspore import preload

        imported = preload()  # MindSpore reads the cluster's variables only in init()
        listening = time.monotonic()
        if scheduler is not None and error is None:
            try:
                scheduler.wait_listening()
            except SpmdinferError as exc:
                error = exc
        listening = time.monotonic() - listening
        world.agree(error)
        address = group.bcast_object(None if scheduler is None else scheduler.address)
        member = Membership(plan, number, plan.node_id(layout), PeerWatch(world.peers, world.is_root),
                            group.comm.Dup())
        joining, error = time.monotonic(), None
        with member.watch.predicting():  # init() waits for every worker, in native code
            try:
                _join(address, member, spec, info)
            except SpmdinferError as exc:
                error = exc
        joining = time.monotonic() - joining
        world.agree(error)
        log.info("joined MindSpore cluster %d as worker %d of %d in %.2f s: import mindspore "
                 "%.2f s, then waited %.2f s for the scheduler (%s:%d), init() %.2f s", number,
                 member.node_id, plan.size, time.monotonic() - began, imported, listening,
                 *address, joining)
        return member
    finally:
        group.close()


def join_world(target: str = "cpu", comm=None) -> tuple[int, int]:
    """Make every rank of `comm` (COMM_WORLD by default) one worker of a single MindSpore
    cluster, as `spmdinfer run` does for a model instance; return (rank, size).

    For scripts under `mpiexec -n N` that export collective slices: call it before building
    the network (collective ops ask for the group's size when they are made).
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    started = None
    if comm.rank == 0:
        try:
            started = Scheduler.start(scheduler_host(hosts), comm.size, target).address
        except SpmdinferError as exc:
            started = exc
    started = comm.bcast(started if comm.rank == 0 else None)
    if isinstance(started, Exception):
        raise started
    joined = _join_as_worker(started, comm.size, comm.rank, target, None)
    global _workers
    _workers = comm  # `leave` waits for them all before the scheduler goes
    return joined


def group_ranks(world, group) -> list[int]:
    """The world ranks of `group`'s members, in its rank order."""
    return group.comm.Get_group().Translate_ranks(list(range(group.size)),
                                                  world.comm.Get_group())


def scheduler_host(hosts: list[str]) -> str:
    """Where the scheduler listens: loopback when the cluster is on one host, else the
    address other hosts reach this one at (SPMDINFER_CLUSTER_HOST, or the host name's)."""
    chosen = os.environ.get(HOST_VARIABLE, "").strip()
    if chosen:
        return chosen
    if len(set(hosts)) == 1:
        return LOCAL_HOST
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as exc:
        raise BackendError(f"cannot find an address of {socket.gethostname()} for the MindSpore "
                           f"cluster's scheduler ({exc}); set {HOST_VARIABLE}") from None


def _join(address: tuple[str, int], member: Membership, spec, info) -> None:
    """Join as this rank's worker; MindSpore must number it as spmdinfer does."""
    plan, node_id = member.plan, member.node_id
    joined = _join_as_worker(address, plan.size, node_id, spec.device.target, info.device_id)
    global _workers
    _workers = member.comm
    if joined != (node_id, plan.size):
        raise BackendError(f"MindSpore's cluster made this rank worker {joined[0]} of {joined[1]}; "
                           f"expected {node_id} of {plan.size}")


def _join_as_worker(address: tuple[str, int], size: int, node_id: int, target: str,
                    device_id: int | None) -> tuple[int, int]:
    """Set MindSpore's cluster variables (it reads them in init()) and join as worker
    `node_id` of `size`; return (rank, size) as MindSpore sees them."""
    host, port = address
    os.environ.update(MS_ROLE="MS_WORKER", MS_WORKER_NUM=str(size), MS_SCHED_HOST=host,
                      MS_SCHED_PORT=str(port), MS_NODE_ID=str(node_id))
    for name, value in RETRY_INTERVALS.items():
        os.environ.setdefault(name, value)
    from .backends.mindspore import join_cluster

    joined = join_cluster(target, device_id)
    atexit.register(_quiet_teardown)  # after MindSpore's import: runs before its exit hook
    global _member
    _member = True
    return joined


class Scheduler:
    """The cluster's scheduler: a child process of the cluster's first rank."""

    def __init__(self, host: str, workers: int, target: str):
        self.host, self.workers, self.target = host, workers, target
        self.process: subprocess.Popen | None = None
        self.address = (host, 0)
        self._log = None
        atexit.register(self._wait_at_exit)

    def launch(self) -> None:
        """Start the scheduler on a fresh port of the host (returns at once: it imports
        MindSpore while the workers import it too)."""
        port = free_port(self.host)
        self.address = (self.host, port)
        self._log = tempfile.TemporaryFile()
        env = {**os.environ, "MS_ROLE": "MS_SCHED", "MS_WORKER_NUM": str(self.workers),
               "MS_SCHED_HOST": self.host, "MS_SCHED_PORT": str(port),
               "SPMDINFER_CLUSTER_PARENT": str(os.getpid()),
               "SPMDINFER_CLUSTER_TARGET": self.target, "GLOG_v": os.environ.get("GLOG_v", "3")}
        env.pop("MS_NODE_ID", None)
        for name, value in RETRY_INTERVALS.items():
            env.setdefault(name, value)
        self.process = subprocess.Popen([sys.executable, "-m", "spmdinfer.cluster"], env=env,
                                        stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=self._log)

    def wait_listening(self, attempts: int = 3) -> None:
        """Return once the scheduler accepts connections; one that exits first (its port
        taken in between) is started again on another port."""
        for attempt in range(attempts):
            if self._listening():
                return
            words = self.last_words()
            self.stop()
            if attempt < attempts - 1:
                self.launch()
        raise BackendError(f"the MindSpore cluster's scheduler did not start on {self.host}: "
                           f"{words}")

    @classmethod
    def start(cls, host: str, workers: int, target: str) -> Scheduler:
        """Start a scheduler and return once it listens."""
        scheduler = cls(host, workers, target)
        scheduler.launch()
        scheduler.wait_listening()
        return scheduler

    def _listening(self) -> bool:
        """Wait until the scheduler accepts connections (False if it exits first)."""
        deadline = time.monotonic() + SCHEDULER_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                socket.create_connection(self.address, timeout=1.0).close()
                return True
            except OSError:
                time.sleep(0.01)
        return False

    def last_words(self) -> str:
        """The last line the scheduler printed (its error), or how it ended."""
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().decode("utf-8", "replace").splitlines()
                 if line.strip() and not line.startswith("[WARNING]")]
        code = self.process.poll()
        ended = "still running" if code is None else f"exit code {code}"
        return f"{lines[-1][:300]} ({ended})" if lines else ended

    def stop(self, grace: float = 0.0) -> None:
        """End the scheduler: wait `grace` seconds for it to finish by itself, then kill it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self.process = None

    def _wait_at_exit(self) -> None:
        """At exit: killed at once where the workers left together without MindSpore's exit
        hooks (`leave`); else, after MindSpore's own exit hook has unregistered this worker
        (atexit runs hooks latest first, and this one is registered before MindSpore is
        imported), the scheduler ends by itself once the last worker has left, and is killed
        if it does not."""
        grace = 10.0 if "mindspore" not in _imported_before and not _scheduler_idle else 0.0
        self.stop(grace)


# MindSpore's exit hook must run before Scheduler._wait_at_exit; that holds only when
# mindspore is imported after this module registers it.
_imported_before = {name for name in ("mindspore",) if name in sys.modules}


_member = False       # this process joined a MindSpore cluster (leave by `leave`)
_workers = None       # the MPI communicator of its cluster's workers
_scheduler_idle = False  # no worker needs the scheduler any more: it is killed at once
LEAVE_SECONDS = 60.0  # the longest a worker waits at exit for the others to get there


def leave(code: int) -> NoReturn:
    """End a process that joined a MindSpore cluster, once the run is over, without
    MindSpore's exit hooks and without the interpreter's teardown: the cluster's workers wait
    for each other over MPI, the scheduler is killed and reaped, MPI is finalized (and
    MPICH's launcher told so: `exiting.leave`), and the process exits with `code`.

    MindSpore's C++ exit hook crashed (SIGSEGV) now and then in a worker under load, after
    the output was complete: a failed job for a finished run. faulthandler's stacks put it
    there (docs/collectives.md). Nothing it does is needed here: it tells the scheduler the
    worker is done (the scheduler is spmdinfer's child, and killed) and frees what the
    process's exit frees anyway. The rest is `exiting.leave`'s.
    """
    exiting.flush()
    from .backends.mindspore import exit_hooks
    from .runner import EXIT_STOPPED

    if exit_hooks and _workers is not None:
        for hook in exit_hooks:
            atexit.unregister(hook)
        # After a run that every rank ended alike, every worker gets here; after a failure some
        # may not (a rank that left from its PeerWatch): nobody waits for them.
        global _scheduler_idle
        _scheduler_idle = _together(_workers, LEAVE_SECONDS) if code in (0, EXIT_STOPPED) else True
    # The atexit hooks left, latest first: _quiet_teardown, Scheduler._wait_at_exit (the
    # first worker kills the scheduler), comm._finalize_before_teardown, logging's flush.
    exiting.leave(code)


def _together(comm, seconds: float) -> bool:
    """Wait, politely, until every rank of `comm` has got here (False after `seconds`)."""
    request, deadline = comm.Ibarrier(), time.monotonic() + seconds
    while not request.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def is_member() -> bool:
    """Whether this process joined a MindSpore cluster."""
    return _member


def _quiet_teardown() -> None:
    """MindSpore's exit hook logs INFO lines as its cluster threads stop, whatever GLOG_v
    says; by then spmdinfer has said all it had to, so stderr goes (unless GLOG_v < 2).
    A crash from here on still says where: faulthandler writes to the stderr it had."""
    if int(os.environ.get("GLOG_v", "3") or 3) < 2:
        return  # the user asked for MindSpore's INFO log
    sys.stderr.flush()
    global _crash_log
    _crash_log = os.fdopen(os.dup(2), "w")
    faulthandler.enable(file=_crash_log, all_threads=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


_crash_log = None   # the stderr that a crash in MindSpore's exit hook is reported on


def free_port(host: str) -> int:
    """A port nobody listens on at `host` now, chosen by the OS."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class PeerWatch:
    """Ends this rank when a peer fails while this rank is stuck inside MindSpore.

    A collective in a graph waits for every rank of the cluster in native code, where no
    failure notice is read. While `inside` is set (MindSpore's init() and every predict),
    a thread reads the notices; when a peer has failed and this rank is still inside a
    second later, rank 0 prints the failure in the usual one line, and the rank leaves at
    once with the failure's exit code. Committed batches are safe in the journal, so
    `--resume` goes on from them.
    """

    POLL_SECONDS = 0.05
    GRACE_SECONDS = 1.0

    def __init__(self, peers, prints: bool):
        from mpi4py import MPI

        self.peers = peers
        self.prints = prints
        self.inside = False
        self.failed: PeerFailed | None = None   # a failure the thread read, for the main thread
        self.lock = threading.Lock()
        self.on_exit: list = []   # callables run before leaving (rank 0: release the lock)
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            log.warning("MPI gives fewer threads than MPI_THREAD_MULTIPLE: a failure while other "
                        "ranks wait inside a collective ends the job only through the launcher")
            return
        threading.Thread(target=self._watch, name="spmdinfer-peer-watch", daemon=True).start()

    def predicting(self):
        """A context manager around a predict that may wait for peers in native code."""
        return _Inside(self)

    def _watch(self) -> None:
        since = 0.0
        while True:
            time.sleep(self.POLL_SECONDS)
            with self.lock:
                if not self.inside:
                    continue
                if self.failed is None:
                    try:
                        self.peers.check()
                    except PeerFailed as exc:
                        self.failed, since = exc, time.monotonic()
                elif time.monotonic() - since > self.GRACE_SECONDS:
                    self._leave(self.failed)

    def _leave(self, failed: PeerFailed) -> None:
        if self.prints:
            print(f"spmdinfer: error: {failed}", file=sys.stderr, flush=True)
        for action in self.on_exit:
            try:
                action()
            except Exception:
                pass
        sys.stderr.flush()
        os._exit(failed.exit_code)


class _Inside:
    def __init__(self, watch: PeerWatch):
        self.watch = watch

    def __enter__(self):
        self.watch.inside = True

    def __exit__(self, kind, value, traceback):
        with self.watch.lock:  # a look at the notices under way finishes first
            self.watch.inside = False
            failed, self.watch.failed = self.watch.failed, None
        if failed is not None and kind is None:
            raise failed  # the thread read the notice: the main thread fails as it would have
        return False


def _die_with_parent() -> None:
    """The scheduler dies with the rank that started it, however that rank ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if str(os.getppid()) != os.environ.get("SPMDINFER_CLUSTER_PARENT"):
        os._exit(1)  # the parent died before prctl took effect


def scheduler_main() -> None:
    """`python -m spmdinfer.cluster`: the scheduler (MS_ROLE=MS_SCHED set by Scheduler.start)."""
    _die_with_parent()
    import mindspore
    from mindspore.communication import init

    mindspore.set_device({"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}[
        os.environ.get("SPMDINFER_CLUSTER_TARGET", "cpu")])
    init()  # returns once every worker has left the cluster


if __name__ == "__main__":
    scheduler_main()
