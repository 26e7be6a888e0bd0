"""A real Slurm for the tests: munged, slurmctld and slurmd from Debian's packages.

Everything lives in one folder: the munge key and socket, slurm.conf, the controller's
state, the nodes' spools and the daemons' logs. Each node claims 8 CPUs on whatever the
machine has (`SlurmdParameters=config_overrides`), so 8-rank jobs fit on 2 cores. The
daemons run as root (`SlurmUser=root`), as do the jobs. `.ci/run` installs the packages.

One node (this host), or several emulated ones: each node's slurmd runs in a UTS namespace
of its own whose host name is the node's (started through tests/emulated-host), on a port
of its own at 127.0.0.1, so its job steps and their ranks see that host name; everything
else (processes, files, /dev/shm, loopback) the nodes share.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.emulated_hosts import EMULATED_HOST

COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
CPUS = 8
PARTITION = "debug"

SLURM_CONF = """\
ClusterName=spmdinfer-test
SlurmctldHost={controller}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={root}/munge/munge.sock,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
MinJobAge=600
# Job ids differ from one test session to the next: MPICH names its shared memory after the
# Slurm job and step id, and a segment left by a killed rank of an earlier session's job
# with the same id would be attached by the new job's ranks (they then fail in MPI_Init).
FirstJobId={first_job_id}
MailProg=/bin/true
{node_lines}
PartitionName={partition} Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""
NODE_LINE = "NodeName={node} NodeAddr=127.0.0.1{port} CPUs={cpus} RealMemory=1000 State=UNKNOWN"


class SlurmError(RuntimeError):
    """The test cluster could not be started or a command against it failed."""


class SlurmCluster:
    """A private Slurm under `root`, on this host or on the emulated nodes `nodes`; `env` is
    what its client commands need."""

    def __init__(self, root: Path, first_job_id: int | None = None,
                 nodes: tuple[str, ...] | None = None):
        self.root = root
        self.first_job_id = first_job_id or random.randrange(1000, 60_000_000)
        self.emulated = nodes is not None
        self.nodes = list(nodes) if nodes else [_this_host()]
        self.conf = root / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        self.env["SLURM_CONF"] = str(self.conf)
        self._pids: dict[str, int | None] = {}

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        missing = [name for name in COMMANDS if _which(name) is None]
        if missing:
            raise SlurmError(f"not installed: {', '.join(missing)}; run .ci/run (it apt-installs "
                             "slurmctld slurmd slurm-client munge)")
        if os.geteuid() != 0:
            raise SlurmError("the test Slurm runs its daemons and jobs as root; "
                             "run the tests as root")
        socket_path = self.root / "munge" / "munge.sock"
        if len(str(socket_path)) > 100:
            raise SlurmError(f"temporary folder too deep for a unix socket: {socket_path}")
        for folder in ("munge", "state", "spool", "log"):
            (self.root / folder).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._start_munge()
        ctld_port, d_port, *node_ports = _free_ports(2 + len(self.nodes))
        lines = [NODE_LINE.format(node=node, cpus=CPUS, port=f" Port={port}" if self.emulated else "")
                 for node, port in zip(self.nodes, node_ports)]
        self.conf.write_text(SLURM_CONF.format(root=self.root, controller=_this_host(),
                                               node_lines="\n".join(lines),
                                               node_list=",".join(self.nodes),
                                               ctld_port=ctld_port, d_port=d_port,
                                               partition=PARTITION,
                                               first_job_id=self.first_job_id))
        self._daemon(_which("slurmctld"), "-f", str(self.conf))
        self._pids["slurmctld"] = _read_pid(self.root / "slurmctld.pid")
        for node in self.nodes:
            command = [_which("slurmd"), "-f", str(self.conf), "-N", node]
            if self.emulated:  # in a UTS namespace named after the node
                command = [str(EMULATED_HOST), node, *command]
            self._daemon(*command)
            self._pids[f"slurmd {node}"] = _read_pid(self.root / f"slurmd-{node}.pid")
        deadline = time.monotonic() + timeout
        state, wanted = "", "\n".join(f"{node} idle" for node in sorted(self.nodes))
        while time.monotonic() < deadline:
            probe = self.command("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            state = "\n".join(sorted(probe.stdout.split("\n"))).strip()
            if probe.returncode == 0 and state == wanted:
                return
            time.sleep(0.5)
        raise SlurmError(f"nodes not idle after {timeout} s (sinfo: {state!r})\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job, shut both Slurm daemons down, stop munged."""
        if self._pids.get("slurmctld"):
            # Let the jobs end while the daemons still run, or their slurmstepd would linger.
            self.command("scancel", "--user", "root", check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.command(
                    "squeue", "-h", "-o", "%i", check=False).stdout.strip():
                time.sleep(0.5)
            self.command("scontrol", "shutdown", check=False)
        for name in ("slurmctld", *(f"slurmd {node}" for node in self.nodes)):
            _wait_gone(self._pids.get(name), timeout=30)
        for pid in self._step_daemons():
            _wait_gone(pid, timeout=0)
        if self._pids.get("munged"):
            socket_path = self.root / "munge" / "munge.sock"
            subprocess.run([_which("munged"), "--stop", f"--socket={socket_path}"],
                           capture_output=True, timeout=30)
            _wait_gone(self._pids["munged"], timeout=10)

    def _step_daemons(self) -> list[int]:
        """This cluster's slurmstepd processes: they inherit SLURM_CONF from its slurmd."""
        mark = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if (proc.name.isdigit() and (proc / "comm").read_text().strip() == "slurmstepd"
                        and mark in (proc / "environ").read_bytes().split(b"\0")):
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={munge / 'munge.key'}"],
                       check=True, capture_output=True, timeout=30)
        self._daemon(_which("munged"), "--force", f"--socket={munge / 'munge.sock'}",
                     f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                     f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}")
        self._pids["munged"] = _read_pid(munge / "munged.pid")

    def _daemon(self, *command: str) -> None:
        """Start a daemon that forks into the background; raise with its logs if it fails."""
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        if result.returncode != 0:
            raise SlurmError(f"{' '.join(command)} exited {result.returncode}: "
                             f"{result.stderr.strip()}\n{self.logs()}")

    # -- client side ------------------------------------------------------------------------

    def command(self, *args: str, check: bool = True, cwd: Path | None = None,
                env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                                env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, script: Path, *options: str, cwd: Path, env: dict | None = None) -> str:
        """Submit `script` from `cwd` (the job's working folder); return the job id."""
        result = self.command("sbatch", "--parsable", *options, str(script), cwd=cwd, env=env)
        return result.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job` as one dict per job record (an array gives one per task)."""
        result = self.command("scontrol", "show", "job", "-o", job_id)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in result.stdout.splitlines()
                if line.strip()]

    def wait(self, job_id: str, timeout: float = 240, until=None) -> list[dict]:
        """Poll until every record of `job_id` is in a terminal state (or `until(records)`)."""
        deadline = time.monotonic() + timeout
        records: list[dict] = []
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            done = until(records) if until else all(
                r.get("JobState") in TERMINAL_STATES for r in records)
            if records and done:
                return records
            time.sleep(0.5)
        raise SlurmError(f"job {job_id} not done after {timeout} s: "
                         f"{[(r.get('JobId'), r.get('JobState')) for r in records]}\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        """The tails of the daemons' logs, for failure messages."""
        parts = []
        for path in sorted(self.root.glob("log/*.log")) + [self.root / "munge" / "munged.log"]:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def _this_host() -> str:
    return socket.gethostname().split(".")[0]


def _which(name: str) -> str | None:
    """A command on PATH, or in the sbin folders a non-root PATH leaves out."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _read_pid(path: Path, timeout: float = 10) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.exists() else ""
        if text.isdigit():
            return int(text)
        time.sleep(0.1)
    return None


def _wait_gone(pid: int | None, timeout: float) -> None:
    """Wait for a process this module started to exit; then SIGTERM, then SIGKILL it, by pid."""
    if pid is None:
        return
    for signal_number, wait in ((0, timeout), (15, 5.0), (9, 5.0)):
        if signal_number:
            try:
                os.kill(pid, signal_number)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
