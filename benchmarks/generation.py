"""jobs/gpt's generation under spmdinfer against the same loop written by hand with mpi4py.

    python benchmarks/generation.py [--prompts 16384] [--repeats 5] [--quick] [--wait-idle S]

Copies jobs/gpt (the tiny GPT split over 2 ranks: an init graph, then the step graph up to 8
times with its KV cache, collected until the end token) into a temporary folder with more
prompts (the same generator, gpt.PROMPT tokens each), and alternates
`mpiexec -n 2 spmdinfer run job.toml` with `mpiexec -n 2 python benchmarks/generation_loop.py
job.toml`. Both count the loop after loading (spmdinfer: its wall less its load seconds, as
its summary counts rows/s; the hand loop: first batch to the file closed) and generated
tokens (each row's length: tokens up to and including its end token). The two outputs must
be equal, and equal to the whole model's (gpt.generate).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO), str(REPO / "jobs" / "gpt")]

from common import (CpuWatch, add_run_options, alternate_samples, print_footer,  # noqa: E402
                    progress_printer, repeats_of, run_mpi_json, run_spmdinfer_metrics, scratch,
                    wait_for_idle)
from suite import cell, spread  # noqa: E402
import export  # noqa: E402  (jobs/gpt/export.py)
import gpt  # noqa: E402  (jobs/gpt/gpt.py)

RANKS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser, quick="one repeat, 1024 prompts")
    parser.add_argument("--prompts", type=int, default=None, help="prompts scored (default 16384)")
    args = parser.parse_args()
    began = time.monotonic()
    progress = progress_printer(began)
    watch = CpuWatch()
    rows = args.prompts or (1024 if args.quick else 16384)
    repeats = repeats_of(args)
    with scratch("generation") as folder:
        job = folder / "job.toml"
        shutil.copytree(REPO / "jobs" / "gpt", folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("out", "__pycache__", "prompts.h5"))
        prompts = export.prompts(rows)
        with h5py.File(folder / "prompts.h5", "w") as f:
            f.create_dataset("prompts", data=prompts)
        expected = gpt.generate(prompts)
        progress(f"{rows} prompts; {repeats} alternating runs of each loop")
        samples = alternate_samples({
            "spmdinfer": lambda: spmdinfer_sample(job, args.wait_idle, expected),
            "by hand": lambda: hand_sample(job, args.wait_idle, expected),
        }, repeats)
    progress("done")

    tokens = int(expected[1].sum())
    print(f"\njobs/gpt over {RANKS} ranks: {rows} prompts, {tokens} tokens generated; medians of "
          f"{repeats} alternating run(s); ratio: the median of the back-to-back pairs' ratios\n")
    ours, hand = ([s["rate"] for s in samples[k]] for k in ("spmdinfer", "by hand"))
    header = f"{'loop':<12} {'tokens/s':>30}  {'loop seconds':>14}  {'others':>7}"
    print(header)
    print("-" * len(header))
    for name, rates in (("spmdinfer", ours), ("by hand", hand)):
        loops = [s["loop"] for s in samples[name]]
        share = max(s["other"] for s in samples[name])
        print(f"{name:<12} {cell(f'{statistics.median(rates):,.0f}', spread(rates)):>30}  "
              f"{statistics.median(loops):>14.2f}  {share:>6.0%}")
    ratio = statistics.median(a / b for a, b in zip(ours, hand))
    print(f"\nspmdinfer / by hand: {ratio:.2f}x tokens/s")
    print_footer(watch, began)


def spmdinfer_sample(job: Path, idle: float, expected) -> dict:
    def run():
        metrics = run_spmdinfer_metrics(job, RANKS)
        return None, metrics["wall_seconds"] - metrics["load_seconds"]

    return sample(run, job.parent / "out" / "tokens.h5", idle, expected)


def hand_sample(job: Path, idle: float, expected) -> dict:
    def run():
        result = run_mpi_json(HERE / "generation_loop.py", [job], RANKS)
        return result["tokens"], result["loop_seconds"]

    return sample(run, job.parent / "out" / "tokens.h5.plain.h5", idle, expected)


def sample(run, output: Path, idle: float, expected) -> dict:
    """One run (`run` -> (the tokens it counted or None, its loop seconds)) on an idle
    machine (up to `idle` s): tokens/s, loop seconds, the CPU share others took."""
    wait_for_idle(idle)
    watch = CpuWatch()
    counted, loop = run()
    share = watch.share()
    tokens = check(output, expected)
    assert counted in (None, tokens), (counted, tokens)
    return {"rate": tokens / loop, "loop": loop, "other": share}


def check(path: Path, expected) -> int:
    """The tokens generated in `path`, which must hold the whole model's tokens and lengths."""
    with h5py.File(path, "r") as f:
        tokens, length = f["tokens"][...], f["length"][...]
    if not (np.array_equal(tokens, expected[0]) and np.array_equal(length, expected[1])):
        raise SystemExit(f"{path}: the tokens differ from the whole model's (gpt.generate)")
    return int(length.sum())


if __name__ == "__main__":
    main()
