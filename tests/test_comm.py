"""Ranks that wait for a late peer sleep: they do not spin in MPI on the cores it needs.

Each agreement of the start-up (and the end) is a nonblocking collective waited for by
`Channel.wait`, and a job's first call is `settle(comm.Ibarrier())`: a rank that gets
there early (its peers still import MindSpore, or were descheduled) uses almost no CPU. A
blocking MPI collective would spin inside MPI until the last rank arrives: on a busy
2-core machine, about half a core or more for as long as the wait lasts.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import MPI_TIMEOUT, PYTHON, mpi_command, mpi_env

pytestmark = [pytest.mark.mpi, pytest.mark.launcher]

LATE = 1.5  # seconds a late rank keeps the others waiting, before each operation

SCRIPT = r"""
import json, resource, sys, time
from mpi4py import MPI
from spmdinfer.comm import Channel, Peers, settle

LATE = float(sys.argv[1])
comm = MPI.COMM_WORLD

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

def waited(operation, late):
    if comm.rank == late:
        time.sleep(LATE)
    began, wall = cpu(), time.monotonic()
    value = operation()
    return value, (time.monotonic() - wall, cpu() - began)

values, times = {}, {}
values["settle"], times["settle"] = waited(lambda: settle(comm.Ibarrier()), 2)
peers = Peers(comm)
world = Channel(comm, peers)
for name, late, operation in [
        # a broadcast's ranks wait for the root; the others' for the last rank
        ("bcast_object", 0, lambda: world.bcast_object({"from": world.rank} if world.is_root else None)),
        ("gather_objects", 2, lambda: world.gather_objects(("rank", world.rank))),
        ("allgather_objects", 2, lambda: world.allgather_objects([world.rank] * (world.rank + 1))),
        ("agree", 2, lambda: world.agree(None, value="agreed")),
        ("barrier", 2, world.barrier)]:
    values[name], times[name] = waited(operation, late)
everyone = comm.gather(times)
if comm.rank == 0:
    print(json.dumps({"times": everyone, "values": {k: repr(v) for k, v in values.items()}}))
world.close()
peers.close()
"""

def test_ranks_waiting_for_a_late_peer_sleep():
    result = subprocess.run([*mpi_command(3), PYTHON, "-c", SCRIPT, str(LATE)],
                            capture_output=True, text=True, timeout=MPI_TIMEOUT, env=mpi_env())
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    values = report["values"]
    assert values["bcast_object"] == repr({"from": 0})
    assert values["gather_objects"] == repr([("rank", r) for r in range(3)])
    assert values["allgather_objects"] == repr([[0], [1, 1], [2, 2, 2]])
    assert values["agree"] == repr("agreed") and values["barrier"] == "None"
    # The rank that waited for the late one (rank 1 for the broadcast, else the root) waited
    # about LATE seconds: spinning in MPI it would use a large share of a core over them,
    # sleeping between tests a few percent.
    for name in report["values"]:
        wall, cpu = report["times"][1 if name == "bcast_object" else 0][name]
        assert wall > LATE / 2, (name, report["times"])
        assert cpu < 0.25 * wall, f"{cpu / wall:.2f} cores used while waiting in {name}: {report}"


FIXED_SCRIPT = r"""
import json
import numpy as np
from mpi4py import MPI
from spmdinfer.comm import DONE, GO, Channel, Peers

comm = MPI.COMM_WORLD
peers = Peers(comm)
world = Channel(comm, peers)
fixed = [(np.dtype(np.float32), (8, 3)), (np.dtype(np.int64), (8,))]

def batch(k, rows):
    rng = np.random.default_rng(k)
    return [rng.standard_normal((rows, 3)).astype(np.float32), np.arange(rows) + 100 * k]

sent = [(GO, 0, 8, batch(0, 8)), (GO, 8, 8, batch(1, 8)), (GO, 16, 5, batch(2, 5)),
        (DONE, 0, 0, [])]
got, intact, earlier = [], [], None
posted = world.post_packet(*sent[0], fixed=fixed)
for k in range(len(sent)):
    kind, start, rows, arrays = world.take_packet(posted)
    # The packet before was received into other buffers: its arrays are still as sent.
    if earlier is not None:
        intact.append(all(np.array_equal(a, b) for a, b in zip(earlier, sent[k - 1][3])))
    if k + 1 < len(sent):
        posted = world.post_packet(*sent[k + 1], fixed=fixed)
    earlier = arrays
    got.append([kind, start, rows, [(a.dtype.str, a.shape, a.tolist()) for a in arrays]])
refused = None
if world.is_root:
    try:
        world.post_packet(GO, 0, 9, batch(3, 9), fixed=fixed)
    except RuntimeError as exc:
        refused = str(exc)
expected = [[kind, start, rows, [(a.dtype.str, a.shape, a.tolist()) for a in arrays]]
            for kind, start, rows, arrays in sent]
reports = comm.gather({"rank": world.rank, "refused": refused, "intact": intact,
                       "same": json.loads(json.dumps(got)) == json.loads(json.dumps(expected))})
if comm.rank == 0:
    print(json.dumps(reports))
world.close()
peers.close()
"""


def test_fixed_size_packets_arrive_whole_ragged_and_last():
    """Stage 0's batches by message (`post_packet(fixed=...)`): every rank posts a batch's
    arrays at full size before its header arrives; a shorter batch and the end still arrive
    as sent, and the arrays of one batch stay intact while the next is received."""
    result = subprocess.run([*mpi_command(3), PYTHON, "-c", FIXED_SCRIPT],
                            capture_output=True, text=True, timeout=MPI_TIMEOUT, env=mpi_env())
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(r["rank"] for r in reports) == [0, 1, 2]
    assert all(r["intact"] == [True] * 3 for r in reports), reports
    assert all(r["same"] for r in reports), reports
    refused = next(r["refused"] for r in reports if r["rank"] == 0)
    assert refused and "beyond the fixed float32 (8, 3)" in refused
