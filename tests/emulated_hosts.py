"""Hosts emulated on this machine (tests/test_multihost.py, benchmarks/hosts.py).

MPICH's launcher reaches "host" nI through tests/emulated-host instead of ssh, which starts
that host's ranks in a UTS namespace named nI; `-iface lo` keeps hydra's own traffic on
loopback. MPICH passes messages between the hosts through UCX, which knows they are one
machine (one boot id) and uses its shared-memory transports between them. Of those,
cross-memory attach reads the peer's memory in place (process_vm_readv), which no two real
hosts can, and aborts the reader when that peer is killed: UCX_TLS=^cma leaves it out.
(UCX's TCP transport does not take the loopback interface, so the emulated hosts cannot
talk TCP.) Set UCX_NET_DEVICES=lo in the job's environment too, as tests/conftest.py does.
"""

from __future__ import annotations

from pathlib import Path

EMULATED_HOST = Path(__file__).resolve().with_name("emulated-host")


def hosts_command(mpiexec: str, *counts: int) -> list[str]:
    """MPICH's `mpiexec` for counts[0] ranks on emulated host n1, counts[1] on n2, and so on
    (ranks numbered host by host); append the program."""
    hosts = ",".join(f"n{i}:{count}" for i, count in enumerate(counts, 1))
    return [mpiexec, "-launcher", "ssh", "-launcher-exec", str(EMULATED_HOST), "-iface", "lo",
            "-hosts", hosts, "-genv", "UCX_TLS", "^cma", "-n", str(sum(counts))]
