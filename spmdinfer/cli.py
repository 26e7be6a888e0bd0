"""The `spmdinfer` command: a thin layer over the library API.

`--help` and `validate` never start MPI or import a framework; `run` starts MPI
only after the job file has been read and checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from . import __version__
from .errors import OutputExistsError, SpmdinferError
from .failure import abort, bound_exit
from .spec import load_spec
from .topology import launcher_rank
from .watchdog import GRACE_SECONDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spmdinfer",
        description="Score an HDF5 dataset with a sharded model, one slice per MPI rank.",
        epilog="Launch runs with MPI, e.g.: mpiexec -n 8 spmdinfer run job.toml")
    parser.add_argument("--version", action="version", version=f"spmdinfer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run a job (under mpiexec for more than one rank)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes (the same on every rank):\n"
               "  0   the output is complete (or was already, with --resume)\n"
               "  1   a crash: a bug, or a rank that died; committed batches stay for --resume\n"
               "  2   bad input: the job file, a slice, a dataset, the world size or a device;\n"
               "      one line says which, and nothing was written\n"
               "  75  stopped early by SIGTERM or SIGUSR1 at a batch boundary (EX_TEMPFAIL):\n"
               "      continue with --resume (the Slurm scripts requeue on it)")
    run.add_argument("job", help="the job file (TOML)")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="start again even if the output or a stopped run's parts exist "
                            "(an existing output is kept until the new one is complete)")
    again.add_argument("--resume", action="store_true",
                       help="continue a stopped or failed run from its committed batches "
                            "(nothing to do if the output is complete)")
    run.add_argument("--no-progress", action="store_true", help="do not draw progress on rank 0")
    run.add_argument("--metrics", type=Path, metavar="FILE",
                     help="write JSON metrics: rows/s, load time, and per rank the seconds spent "
                          "reading, broadcasting, predicting, combining, writing, waiting, peak RSS")
    run.add_argument("--trace", type=Path, metavar="FILE",
                     help="write a Chrome trace-event JSON (open it in https://ui.perfetto.dev): "
                          "one track per rank")

    validate = commands.add_parser(
        "validate", help="check a job file, its slices and datasets without MPI or loading models",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes:\n"
               "  0   every check passed: `run` with the same flags would start (the last line\n"
               "      says what it does with the output: write it, replace it, continue it)\n"
               "  2   a problem, in one line; also when the output exists (or a stopped run's\n"
               "      parts do) and `run` with the same flags would refuse it, after every\n"
               "      other check")
    validate.add_argument("job", help="the job file (TOML)")
    flags = validate.add_mutually_exclusive_group()
    flags.add_argument("--overwrite", action="store_true",
                       help="check as for `run --overwrite` (an existing output is replaced)")
    flags.add_argument("--resume", action="store_true",
                       help="check as for `run --resume` (a stopped run is continued)")
    validate.add_argument("--deep", action="store_true",
                          help="also check the layout for a world size, the sha256 manifest, devices, "
                               "the MPI library, and every slice's declared inputs and outputs")
    validate.add_argument("-n", dest="world", type=int, metavar="WORLD",
                          help="with --deep: the world size you will launch with (default: the "
                               "launcher's, else [model] ranks)")
    validate.add_argument("--per-node", type=int, metavar="K",
                          help="with --deep: ranks per node (default: all on one node)")

    plan = commands.add_parser(
        "plan", help="show where every rank will run and which slices it loads, without MPI")
    plan.add_argument("job", help="the job file (TOML)")
    plan.add_argument("-n", dest="world", type=int, required=True, metavar="WORLD",
                      help="the world size you will launch with (mpiexec -n WORLD)")
    plan.add_argument("--per-node", type=int, default=None, metavar="K",
                      help="ranks per node (default: all on one node)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")

    inspect = commands.add_parser(
        "inspect", help="show a slice file's format, inputs and outputs without MPI or a run")
    inspect.add_argument("file", help="the slice file (.mindir or .onnx)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def console() -> NoReturn:
    """The `spmdinfer` command: `main`, and an exit that suits what the process joined. A
    run that every rank ended alike (complete, or stopped to resume) leaves without the
    interpreter's teardown (`exiting.leave`); a failed one exits as Python does."""
    code = main()
    from . import cluster, exiting

    if cluster.is_member():
        cluster.leave(code)
    if exiting.mpi_started():
        from .runner import EXIT_STOPPED

        if code in (0, EXIT_STOPPED):
            exiting.leave(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args)
        spec = load_spec(args.job)
        if args.command == "plan":
            return _plan(spec, args)
        if args.command == "validate":
            return _validate(spec, args)
    except SpmdinferError as exc:
        if launcher_rank() == 0:
            _error(exc)
        return exc.exit_code
    return _run(spec, args)


def _validate(spec, args) -> int:
    from .validate import validate, validate_deep

    if args.deep:
        found, lines = validate_deep(spec, args.world, args.per_node, overwrite=args.overwrite,
                                     resume=args.resume)
    else:
        found = validate(spec, overwrite=args.overwrite, resume=args.resume)
        lines = [str(found), f"slices: {found.slices}"]
    if found.refusal is not None:  # everything else was checked: `run` would stop here
        raise OutputExistsError(f"{found.refusal}; every other check passed")
    if launcher_rank() == 0:
        print(f"spmdinfer: {args.job}: ok: " + "\n  ".join(lines + [f"output: {found.output}"]))
    return 0


def _plan(spec, args) -> int:
    from .plan import format_plan, format_program, plan, program, shared_devices

    rows = plan(spec, args.world, args.per_node)
    clashes = shared_devices(rows)
    described = program(spec)
    print(json.dumps({"ranks": rows, "shared_devices": clashes, "program": described}, indent=2)
          if args.json else format_plan(rows) + "\n" + format_program(described))
    missing = [r["rank"] for r in rows if not r["exists"]]
    if missing or clashes:
        problem = (f"slice files missing for rank(s) {missing}" if missing else
                   f"ranks {clashes[0][0]} and {clashes[0][1]} would share a device")
        if not args.json:
            print(f"spmdinfer: error: {problem}", file=sys.stderr)
        return 2
    return 0


def _inspect(args) -> int:
    from .inspect import format_report, inspect_slice

    report = inspect_slice(args.file)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# The least time a rank's exit gets once its run is over, whatever [run] batch_timeout says:
# rank 0 may still write --metrics and --trace files, and a cluster's workers wait for each
# other (cluster.leave, up to 60 s) while the others wait in MPI_Finalize.
EXIT_SECONDS = 120.0


def _run(spec, args) -> int:
    # Open MPI 5 warns once per rank, at the first shared-memory window, that its UCX
    # one-sided component cannot serve it (osc/sm does); spmdinfer opens no other windows.
    os.environ.setdefault("OMPI_MCA_osc", "^ucx")
    from mpi4py import MPI

    from .runner import EXIT_STOPPED, run_job

    world = MPI.COMM_WORLD
    # A stop signal that arrives after the run has ended must not kill the rank with no word:
    # run_job catches them while it runs and restores these afterwards.
    for stop in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop, signal.SIG_IGN)
    try:
        summary = run_job(spec, world, overwrite=args.overwrite, resume=args.resume,
                          progress=not args.no_progress, metrics=args.metrics, trace=args.trace)
    except SpmdinferError as exc:
        _bound_exit(spec, world)
        if world.rank == 0:
            _error(exc)
        return exc.exit_code
    except BaseException:
        # A bug, not an agreed failure: the other ranks may be waiting on this one.
        print("".join(f"[rank {world.rank}] {line}\n" for line in
                      traceback.format_exc().splitlines()), file=sys.stderr, end="", flush=True)
        if world.size > 1:
            abort(world, 1)
        return 1
    _bound_exit(spec, world)
    if world.rank == 0:
        summary = dataclasses.replace(summary, job=args.job)  # as the user typed it
        print(summary, file=sys.stderr if summary.outcome == "stopped" else sys.stdout, flush=True)
    return EXIT_STOPPED if summary.outcome == "stopped" else 0


def _bound_exit(spec, world) -> None:
    """The run is over on every rank: the exit may take the watchdog's time (at least
    EXIT_SECONDS) and its grace, no longer (failure.bound_exit); unbounded where the
    watchdog is off or alone."""
    if world.size > 1 and spec.run.batch_timeout > 0:
        bound_exit(max(spec.run.batch_timeout, EXIT_SECONDS) + GRACE_SECONDS)


def _error(exc: SpmdinferError) -> None:
    print(f"spmdinfer: error: {exc}", file=sys.stderr, flush=True)
