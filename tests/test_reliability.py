"""Fault injection with real processes under mpiexec: kills, exceptions, corrupt slices and
signals, each followed by --resume and a bitwise comparison with an uninterrupted run."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import types
from pathlib import Path

import h5py
import numpy as np
import pytest

from spmdinfer import cli
from spmdinfer.journal import LOG, committed_batches, parts_folder
from spmdinfer.watchdog import THREAD_NAME
from tests.cells import FixedBatchOnly, MatMulNeg
from tests.conftest import (PYTHON, REPO, UNDER_OPENMPI, assert_clean_error, dynamic, export_mindir,
                            forward, held, matmul_job, mpi_command, mpi_env, onnx_column_slices,
                            off_loopback_sockets, pids_running, rank_pids, ranks_up, resume,
                            run_cli, run_until, stop, write_h5, write_job)

pytestmark = [pytest.mark.mpi, pytest.mark.launcher]

EXIT_STOPPED = 75
ROWS, BATCH = 12000, 10  # 1,200 batches: 300 once ended inside one step (a fast EPYC, hogs)


def start_run(job: Path, n: int, *extra, launch: list[str] | None = None) -> subprocess.Popen:
    """`spmdinfer run JOB` under mpiexec with `n` ranks (or the launcher command `launch`)."""
    command = [*(launch or mpi_command(n)), PYTHON, "-m", "spmdinfer", "run", str(job), *extra]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=mpi_env(), start_new_session=True)


def committed(folder: Path) -> int:
    return committed_batches(folder / "out" / "result.h5")


def stopped_at(run: subprocess.Popen, job: Path, batches: int, n: int = 4) -> dict[int, int]:
    """The ranks of `run` (rank -> pid), stopped once at least `batches` batches of `job` are
    committed (its folder's out/result.h5): in steps of 10 ms through start-up (until the
    journal's log exists, just before the first batch), then of 5 ms (on an AVX-512 EPYC a
    step of 50 ms could score 300 batches)."""
    pids = ranks_up(job, n, run)
    stop(pids.values())
    log = parts_folder(job.parent / "out" / "result.h5") / LOG
    run_until(pids.values(), log.exists, run, step=0.01)
    run_until(pids.values(), lambda: committed(job.parent) >= batches, run)
    return pids


def watching(pid: int) -> bool:
    """Whether rank `pid`'s watchdog thread (its OS thread name THREAD_NAME) is alive: the rank
    is in its run, between its first batch and the run's last barrier."""
    try:
        return any((task / "comm").read_text().strip() == THREAD_NAME
                   for task in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False


def stopped_while_watching(run: subprocess.Popen, job: Path, n: int = 4) -> dict[int, int]:
    """The ranks of `run` (rank -> pid), stopped once every one is in its run (`watching`):
    by its own state, not by rank 0's commits, which under load came when the ranks had
    passed their last batch and, frozen there, one hung the others in MPI_Finalize."""
    pids = ranks_up(job, n, run)
    stop(pids.values())
    run_until(pids.values(), lambda: all(watching(pid) for pid in pids.values()), run, step=0.05)
    return pids


def stop_through_launcher(run: subprocess.Popen, job: Path, batches: int, signum) -> None:
    """`signum` sent to the launcher of `run`, reaching its ranks after `batches` batches."""
    pids = stopped_at(run, job, batches)
    try:
        forward(run, pids.values(), signum)
    finally:
        resume(pids.values())


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def datasets(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"]
        return {name: f[name][()] for name in f}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, onnx_matmul_slices):
    """An uninterrupted run of the job every test interrupts, and its job document.

    Its slices are ONNX, run by ONNX Runtime: what these tests stop, kill and resume is the
    runner, and each rank's `import mindspore` costs 3.5 CPU seconds against ONNX Runtime's
    0.4 (4 ranks, two runs a test; this file took 293 s with MindSpore on 2026-12-05). The
    default backend's own faults are tested with MindIR below (a corrupt slice, a failing
    batch), in test_collectives (kill -9 mid-collective), test_multihost and test_slurm."""
    return reference_run(tmp_path_factory, onnx_matmul_slices)


def reference_run(tmp_path_factory, slices) -> tuple[Path, dict, dict]:
    """The reference job (2 replicas of 2 column slices, 1,200 batches, a NaN and an inf in
    the input) run once without interruption on `slices` (conftest's matmul_slices or
    onnx_matmul_slices): (folder, job document, output)."""
    template, _ = slices
    folder = tmp_path_factory.mktemp("reference")
    x = np.random.default_rng(20).standard_normal((ROWS, 96)).astype(np.float32)
    x[5, 3], x[6, 4] = np.nan, np.inf
    write_h5(folder / "in.h5", {"x": x})
    doc = matmul_job(folder, template, ranks=2, batch_size=BATCH)
    result = run_cli("run", write_job(folder, doc), n=4)  # 2 replicas
    assert result.returncode == 0, result.stderr
    return folder, doc, datasets(folder / "out" / "result.h5")


def copy_job(reference, tmp_path: Path, **run) -> Path:
    folder, doc, _ = reference
    shutil.copy(folder / "in.h5", tmp_path / "in.h5")
    if run:
        doc = {**doc, "run": run}
    return write_job(tmp_path, doc)


def resume_and_compare(reference, tmp_path: Path, job: Path, launch: list[str] | None = None) -> None:
    result = run_cli("run", job, "--resume", n=None if launch else 4, launch=launch)
    assert result.returncode == 0, result.stderr
    out = datasets(tmp_path / "out" / "result.h5")
    assert out.keys() == reference[2].keys()
    for name, data in reference[2].items():
        assert np.array_equal(out[name], data, equal_nan=True), name  # bit for bit, NaN included
    assert not (tmp_path / "out" / "result.h5.parts").exists()


def test_the_ranks_traffic_stays_on_loopback(reference, tmp_path):
    # The tests' own rule (tests/conftest.py, LOOPBACK_ENV): mid-run, no socket of a rank is
    # bound to or connected to an address other than loopback.
    job = copy_job(reference, tmp_path)
    run = start_run(job, 4)
    pids = stopped_at(run, job, 3)
    try:
        assert off_loopback_sockets(pids.values()) == []
        forward(run, pids.values(), signal.SIGUSR1)
    finally:
        resume(pids.values())
    run.communicate(timeout=60)
    assert run.returncode == EXIT_STOPPED


KILLS = [(0, 1), (0, 2), (1, 3), (3, 4), (2, 5)]  # (rank, seed)


@pytest.mark.parametrize("rank, seed", KILLS)
def test_kill_9_then_resume_is_bitwise_identical(reference, tmp_path, rank, seed):
    job = copy_job(reference, tmp_path)
    run = start_run(job, 4)
    at = random.Random(seed).randint(3, 150)
    pids = stopped_at(run, job, at)
    with held(pids.values()):
        os.kill(pids[rank], signal.SIGKILL)
    killed = time.monotonic()
    stdout, stderr = run.communicate(timeout=60)
    gone = time.monotonic() - killed
    assert run.returncode != 0
    # Open MPI names the rank that died, its pid and host (on stderr, its lines wrapped).
    # MPICH's hydra (on stdout) names the host and a pid of that host's ranks: the first one,
    # not always the one killed; nothing is left alive that could say more.
    host, pid, said = socket.gethostname(), pids[rank], " ".join((stdout + stderr).split())
    if UNDER_OPENMPI:
        assert f"process rank {rank} with PID {pid} on node {host} exited on signal 9" in said, stderr
    else:
        assert re.search(rf"BAD TERMINATION .* PID ({'|'.join(map(str, pids.values()))}) "
                         rf"RUNNING AT {host} .* Killed \(signal 9\)", said), stdout
    print(f"\nkill -9 of rank {rank} after >= {at} committed batches: every process gone in "
          f"{gone:.2f} s")
    assert gone < 10, f"the other ranks took {gone:.1f} s to go"
    wait_for(lambda: not any(p for p in rank_pids(job)), timeout=10)
    assert not (tmp_path / "out" / "result.h5").exists()
    resume_and_compare(reference, tmp_path, job)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_stops_at_a_batch_boundary_then_resume(reference, tmp_path, signum):
    job = copy_job(reference, tmp_path)
    run = start_run(job, 4)
    stop_through_launcher(run, job, 20, signum)  # mpiexec forwards it to every rank
    _, stderr = run.communicate(timeout=60)
    if UNDER_OPENMPI and signum == signal.SIGTERM:
        # Open MPI's mpirun forwards SIGTERM, then ends the ranks itself and exits 1, their
        # output lost (docs/launchers.md); whatever was committed is safe all the same.
        assert run.returncode == 1, stderr
    else:
        assert run.returncode == EXIT_STOPPED, stderr
        assert "stopped early" in stderr and f"continue with: spmdinfer run {job} --resume" in stderr
        assert stderr.count(f"received {signum.name}") == 1, stderr  # rank 0's line alone
        assert not (tmp_path / "out" / "result.h5").exists()
        assert 20 <= committed(tmp_path) < ROWS // BATCH
    resume_and_compare(reference, tmp_path, job)


def test_signals_in_quick_succession_are_one_request(reference, tmp_path):
    # Under Slurm a rank can get the stop signal from Slurm and from mpiexec at once.
    # (Open MPI's mpirun ends the ranks itself after SIGTERM: there, SIGUSR1.)
    stop = signal.SIGUSR1 if UNDER_OPENMPI else signal.SIGTERM
    job = copy_job(reference, tmp_path)
    run = start_run(job, 4)
    pids = stopped_at(run, job, 10)
    try:
        run.send_signal(stop)
        forward(run, pids.values(), stop)
    finally:
        resume(pids.values())
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == EXIT_STOPPED and "stopped early" in stderr
    resume_and_compare(reference, tmp_path, job)


def test_without_resume_a_partial_run_is_never_touched(reference, tmp_path):
    job = copy_job(reference, tmp_path)
    run = start_run(job, 4)
    stop_through_launcher(run, job, 5, signal.SIGUSR1)
    run.communicate(timeout=60)
    assert run.returncode == EXIT_STOPPED
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "result.h5.parts").iterdir()}
    result = run_cli("run", job, n=4)
    assert_clean_error(result, "a partial run left", "--resume", "--overwrite")
    after = {p.name: p.read_bytes() for p in (tmp_path / "out" / "result.h5.parts").iterdir()}
    assert before == after


@pytest.mark.parametrize("change, needle", [
    ("job", "the job file changed"),
    ("input", "the input file changed"),
    ("slices", "the model slices changed"),
])
def test_resume_refuses_a_changed_job_input_or_slice(reference, tmp_path, change, needle):
    folder, doc, _ = reference
    job = copy_job(reference, tmp_path)
    run = start_run(job, 4)
    stop_through_launcher(run, job, 5, signal.SIGUSR1)
    run.communicate(timeout=60)
    assert run.returncode == EXIT_STOPPED
    if change == "job":
        job = write_job(tmp_path, {**doc, "run": {"max_attempts": 5}})
    elif change == "input":
        with h5py.File(tmp_path / "in.h5", "r+") as f:
            f["x"][7] = 1.0
    else:
        slices = onnx_column_slices(tmp_path / "slices", np.ones((96, 4), np.float32), "s{rank}.onnx")
        job = write_job(tmp_path, {**doc, "model": {**doc["model"], "files": str(slices)}})
        # The job text changed too; the message lists both.
    result = run_cli("run", job, "--resume", n=4)
    assert_clean_error(result, "--resume refused", needle)


def test_failing_batch_is_not_retried_forever(tmp_path, matmul_slices):
    template, _ = matmul_slices
    weight = np.ones((96, 2), np.float32)
    export_mindir(MatMulNeg(weight), [dynamic(96)], tmp_path / "p" / "p0.mindir")
    export_mindir(FixedBatchOnly(weight, 4), [dynamic(96)], tmp_path / "p" / "p1.mindir")
    write_h5(tmp_path / "in.h5", {"x": np.ones((10, 96), np.float32)})
    doc = matmul_job(tmp_path, template, ranks=2, batch_size=4)
    doc["model"]["files"] = str(tmp_path / "p" / "p{rank}.mindir")
    doc["run"] = {"max_attempts": 2}
    job = write_job(tmp_path, doc)
    assert run_cli("run", job, n=2).returncode == 1
    assert run_cli("run", job, "--resume", n=2).returncode == 1
    assert_clean_error(run_cli("run", job, "--resume", n=2), "rows 8..9", "attempted 2 times",
                       "max_attempts = 2")


def test_corrupt_slice_then_fixed_slice(tmp_path, matmul_slices):
    template, weight = matmul_slices
    write_h5(tmp_path / "in.h5", {"x": np.ones((9, 96), np.float32)})
    (tmp_path / "s").mkdir()
    shutil.copy(str(template).format(rank=0), tmp_path / "s" / "s0.mindir")
    (tmp_path / "s" / "s1.mindir").write_bytes(b"\x08\x01not a model" * 50)
    doc = matmul_job(tmp_path, template, ranks=2, batch_size=4)
    doc["model"]["files"] = str(tmp_path / "s" / "s{rank}.mindir")
    job = write_job(tmp_path, doc)
    assert_clean_error(run_cli("run", job, n=2), "rank 1", "s1.mindir")
    assert not (tmp_path / "out").exists()
    shutil.copy(str(template).format(rank=1), tmp_path / "s" / "s1.mindir")
    assert run_cli("run", job, n=2).returncode == 0
    out = datasets(tmp_path / "out" / "result.h5")
    np.testing.assert_allclose(out["y"], -(np.ones((9, 96)) @ weight[:, :4]), rtol=1e-5, atol=1e-5)


def test_second_run_on_the_same_output_fails_fast_and_stale_lock_is_taken(reference, tmp_path):
    job = copy_job(reference, tmp_path)
    run = start_run(job, 4)
    # Hold the first run's ranks (a short job ends sooner than a
    # second mpiexec starts) so that it still holds the lock while the second one starts.
    pids = stopped_at(run, job, 3)
    try:
        started = time.monotonic()
        result = run_cli("run", job, "--resume", n=2)
        assert time.monotonic() - started < 30
        forward(run, pids.values(), signal.SIGUSR1)
    finally:
        resume(pids.values())
    assert_clean_error(result, "another run is writing it", "result.h5.lock")
    run.communicate(timeout=60)
    assert run.returncode == EXIT_STOPPED
    # A lock left by a process that no longer exists does not block --resume.
    (tmp_path / "out" / "result.h5.lock").write_text(f"{os.uname().nodename} 999999999\n")
    resume_and_compare(reference, tmp_path, job)


def test_watchdog_ends_a_frozen_rank(reference, tmp_path):
    job = copy_job(reference, tmp_path, batch_timeout=3)
    run = start_run(job, 4)
    pids = stopped_while_watching(run, job)  # all stopped, then all but rank 1 continued
    resume(pid for rank, pid in pids.items() if rank != 1)
    stopped = time.monotonic()
    _, stderr = run.communicate(timeout=60)
    assert run.returncode != 0
    assert time.monotonic() - stopped < 20
    # A waiting rank's watchdog: one line, its stacks (faulthandler's), then it ends the job.
    assert re.search(r"\[rank \d\] ERROR no progress on \S+ for 3\.\d s \(\[run\] batch_timeout = 3\)",
                     stderr), stderr
    assert "most recent call first" in stderr
    resume_and_compare(reference, tmp_path, job)


# The last step of a rank of the `spmdinfer` command: its run over, it exits (MPI_Finalize,
# which waits for every rank); the last rank freezes there. argv: bound_exit's seconds.
FROZEN_AT_EXIT = """# frozen-at-exit
import os, signal, sys
from mpi4py import MPI
from spmdinfer.failure import bound_exit

comm = MPI.COMM_WORLD
comm.Barrier()
print("at the exit", flush=True)
bound_exit(float(sys.argv[1]))
if comm.rank == comm.size - 1:
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def run_frozen_at_exit(seconds: float, n: int, launch: list[str]) -> tuple[float | None, str]:
    """FROZEN_AT_EXIT under `launch`: (seconds until every process is gone, or None if the
    launcher was still there 30 s after the bound; the launcher's output)."""
    began = time.monotonic()
    run = subprocess.Popen([*launch, PYTHON, "-c", FROZEN_AT_EXIT, str(seconds)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=mpi_env(), start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        output = run.communicate(timeout=max(seconds, 0) + 30)[0]
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        # Open MPI puts each rank in a process group of its own.
        for pid in pids_running("# frozen-at-exit"):
            os.kill(pid, signal.SIGKILL)
        return None, run.communicate()[0]
    wait_for(lambda: not pids_running("# frozen-at-exit"), 30)
    return time.monotonic() - began, output



@pytest.mark.parametrize("seconds", [2, 0], ids=["bounded", "unbounded"])
def test_a_rank_frozen_in_the_exit_ends_the_job_past_the_bound(seconds):
    # Past the run's last barrier the watchdog is stopped and MPI_Finalize holds the GIL:
    # failure.bound_exit's alarm ends the waiting ranks with SIGALRM, and the launcher the
    # frozen one. Unbounded (batch_timeout = 0), the job stays: what the bound prevents.
    gone, output = run_frozen_at_exit(seconds, 3, mpi_command(3))
    assert output.count("at the exit") == 3, output  # the job started, and every rank got there
    if seconds:
        assert gone is not None, output
        print(f"\na rank frozen in the exit, bound 2 s: every process gone in {gone:.2f} s")
    else:
        assert gone is None, output


@pytest.mark.parametrize("timeout, size, alarm", [(3, 4, 125), (300, 4, 305), (0, 4, 0), (3, 1, 0)],
                         ids=["watchdog-short", "watchdog-long", "watchdog-off", "one-rank"])
def test_the_command_bounds_its_exit_only_where_the_watchdog_is_on(timeout, size, alarm):
    # The alarm: batch_timeout (at least cli.EXIT_SECONDS) plus the watchdog's 5 s of grace;
    # none where batch_timeout = 0 turns the watchdog off, nor for a rank alone.
    spec = types.SimpleNamespace(run=types.SimpleNamespace(batch_timeout=timeout))
    previous = signal.getsignal(signal.SIGALRM)
    try:
        cli._bound_exit(spec, types.SimpleNamespace(size=size))
        left = signal.alarm(0)  # what is left of it (whole seconds), and cancelled
        assert alarm - 1 <= left <= alarm if alarm else left == 0
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_resume_of_a_complete_output_does_nothing(reference, tmp_path):
    job = copy_job(reference, tmp_path)
    assert run_cli("run", job, n=2).returncode == 0
    before = (tmp_path / "out" / "result.h5").read_bytes()
    result = run_cli("run", job, "--resume", n=2)
    assert result.returncode == 0 and "already complete" in result.stdout
    assert (tmp_path / "out" / "result.h5").read_bytes() == before


@pytest.fixture
def small_disk(tmp_path):
    """A 32 KiB tmpfs (the tests run as root, as CI does), unmounted afterwards: room for about
    about 100 of the job's batches in the journal's log."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def small_disk_job(reference, tmp_path: Path, small_disk: Path) -> Path:
    """The reference job, writing its output on the small disk."""
    folder, doc, _ = reference
    shutil.copy(folder / "in.h5", tmp_path / "in.h5")
    doc = {**doc, "output": {**doc["output"], "file": str(small_disk / "out" / "result.h5")}}
    return write_job(tmp_path, doc)


def test_a_failing_collector_never_crashes_at_exit(reference, tmp_path, small_disk):
    # Disk full on rank 0 while replica 1 (ranks 2-3) is still sending it batches, five times:
    # every rank ends with the one message and exit code 2, never a signal from MPI_Finalize.
    job = small_disk_job(reference, tmp_path, small_disk)
    codes = []
    for _ in range(5):
        shutil.rmtree(small_disk / "out", ignore_errors=True)
        result = run_cli("run", job, n=4)
        assert "disk full while" in result.stderr, result.stderr
        codes.append(result.returncode)
    assert codes == [2] * 5


def test_no_room_for_the_journal_is_one_line_and_leaves_nothing(reference, tmp_path, small_disk):
    subprocess.run(["mount", "-o", "remount,size=8k", str(small_disk)], check=True)
    result = run_cli("run", small_disk_job(reference, tmp_path, small_disk), n=4)
    assert_clean_error(result, f"cannot write {small_disk}/out/result.h5.parts "
                               "(No space left on device); nothing was scored")
    assert list(small_disk.iterdir()) == []


def test_disk_full_keeps_committed_batches_then_resume(reference, tmp_path, small_disk):
    expected = reference[2]
    job = small_disk_job(reference, tmp_path, small_disk)
    result = run_cli("run", job, n=4)
    # Rank 0 fails while replica 1's packets are still on their way to it: it must not crash
    # at exit (mpi4py freed the buffers of given-up receives that MPI then wrote into: about
    # one run in three ended in SIGSEGV in MPI_Finalize before comm.abandon/finalize).
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("spmdinfer: error:")]
    assert len(errors) == 1, result.stderr
    message = errors[0]
    for needle in ("disk full while", "intact", "--resume"):
        assert needle in message, message
    kept = committed_batches(small_disk / "out" / "result.h5")
    assert 0 < kept < ROWS // BATCH, message
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    assert run_cli("run", job, "--resume", n=4).returncode == 0
    out = datasets(small_disk / "out" / "result.h5")
    assert all(np.array_equal(out[k], v, equal_nan=True) for k, v in expected.items())
