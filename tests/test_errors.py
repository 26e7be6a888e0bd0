"""Bad input and failing ranks: a one-line message, the right exit code, nothing written,
and every rank gone promptly."""

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from spmdinfer.journal import Journal
from tests.cells import FixedBatchOnly, MatMulNeg
from tests.conftest import (assert_clean_error, dynamic, export_mindir, matmul_job, run_cli,
                            write_h5, write_job)


@pytest.fixture
def job_dir(tmp_path, matmul_slices):
    """A runnable 2-rank matmul job in tmp_path; tests break one thing in it."""
    template, _ = matmul_slices
    write_h5(tmp_path / "in.h5", {"x": np.ones((10, 96), np.float32)})
    return tmp_path, matmul_job(tmp_path, template, ranks=2, batch_size=4)


def run_broken(folder, doc, n=2, *extra):
    job = write_job(folder, doc)
    result = run_cli("run", job, *extra, n=n)
    assert not (folder / "out").exists(), "a failed run left output behind"
    return result


def test_toml_syntax_error_printed_once_with_line(job_dir):
    folder, _ = job_dir
    job = folder / "job.toml"
    job.write_text("[model]\nfiles = \"a{rank}.mindir\"\nranks = = 2\n")
    result = run_cli("run", job, n=2)
    assert_clean_error(result, str(job), "invalid TOML", "line 3")


def test_misspelt_key_lists_valid_keys(job_dir):
    folder, doc = job_dir
    doc["input"]["batchsize"] = doc["input"].pop("batch_size")
    result = run_broken(folder, doc)
    assert_clean_error(result, "unknown key 'batchsize' in [input]", "valid keys: file, datasets, batch_size")


def test_missing_input_file(job_dir):
    folder, doc = job_dir
    doc["input"]["file"] = "nope.h5"
    assert_clean_error(run_broken(folder, doc), "[input] file", "nope.h5", "no such file")


def test_input_that_is_not_hdf5(job_dir):
    folder, doc = job_dir
    (folder / "text.h5").write_text("not hdf5")
    doc["input"]["file"] = "text.h5"
    assert_clean_error(run_broken(folder, doc), "text.h5", "not a readable HDF5 file")


def test_missing_slice_of_one_rank(job_dir):
    folder, doc = job_dir
    doc["model"]["ranks"] = 9
    assert_clean_error(run_broken(folder, doc, n=9), "slice of model rank 8 not found", "device8")


def test_dataset_not_in_file(job_dir):
    folder, doc = job_dir
    doc["input"]["datasets"] = {"x": "/features"}
    assert_clean_error(run_broken(folder, doc), "[input.datasets] x", "/features", "no such dataset")


def test_inputs_with_different_row_counts(job_dir, multi_io_slices):
    folder, doc = job_dir
    template, _ = multi_io_slices
    write_h5(folder / "in.h5", {"x": np.ones((10, 4), np.float32), "k": np.ones((9, 3), np.int32)})
    doc["model"]["files"] = str(template)
    doc["input"]["datasets"] = {"x": "/x", "k": "/k"}
    assert_clean_error(run_broken(folder, doc), "same number of rows", "/x has 10", "/k has 9")


@pytest.mark.parametrize("data, needle", [
    (np.ones((10, 96), np.float64), "dataset /x float64 (rows, 96) does not fit model input x float32"),
    (np.ones((10, 95), np.float32), "dataset /x float32 (rows, 95) does not fit model input x float32"),
    (np.array(["a"] * 10, dtype=object).astype("S1"), "expected a numeric dtype"),
])
def test_dataset_that_does_not_fit_the_model(job_dir, data, needle):
    folder, doc = job_dir
    write_h5(folder / "in.h5", {"x": data})
    assert_clean_error(run_broken(folder, doc), needle)


def test_scalar_dataset(job_dir):
    folder, doc = job_dir
    write_h5(folder / "in.h5", {"x": np.float32(1.0)})
    assert_clean_error(run_broken(folder, doc), "/x", "is a scalar")


def test_bad_combine_mode(job_dir):
    folder, doc = job_dir
    doc["output"]["combine"] = {"y": "concat"}
    assert_clean_error(run_broken(folder, doc), "[output.combine] y", "concat:AXIS")


def test_combine_axis_that_does_not_fit_the_output(job_dir):
    folder, doc = job_dir
    doc["output"]["combine"] = {"y": "concat:3"}
    assert_clean_error(run_broken(folder, doc), "output y", "concat:3", "does not fit")


def test_batch_size_below_one(job_dir):
    folder, doc = job_dir
    doc["input"]["batch_size"] = 0
    assert_clean_error(run_broken(folder, doc), "[input] batch_size must be an integer >= 1, got 0")


def test_world_size_other_than_ranks(job_dir):
    folder, doc = job_dir
    assert_clean_error(run_broken(folder, doc, n=3), "world size 3", "[model] ranks = 2")


def test_output_that_is_a_directory(job_dir):
    folder, doc = job_dir
    doc["output"]["file"] = "outdir"
    (folder / "outdir").mkdir()
    assert_clean_error(run_cli("run", write_job(folder, doc), n=2), "outdir is a directory")


def test_corrupt_slice_on_one_rank_ends_every_rank(job_dir):
    folder, doc = job_dir
    (folder / "slices").mkdir()
    shutil.copy(doc["model"]["files"].format(rank=0), folder / "slices" / "s0.mindir")
    (folder / "slices" / "s1.mindir").write_bytes(b"\x08\x01garbage" * 100)
    doc["model"]["files"] = str(folder / "slices" / "s{rank}.mindir")
    started = time.monotonic()
    result = run_broken(folder, doc)
    assert time.monotonic() - started < 60
    assert_clean_error(result, "rank 1", "s1.mindir", "MindIR")


def test_exception_in_predict_on_one_rank_ends_every_rank(job_dir):
    folder, doc = job_dir
    weight = np.ones((96, 2), np.float32)
    export_mindir(MatMulNeg(weight), [dynamic(96)], folder / "p" / "p0.mindir")
    export_mindir(FixedBatchOnly(weight, 4), [dynamic(96)], folder / "p" / "p1.mindir")
    doc["model"]["files"] = str(folder / "p" / "p{rank}.mindir")
    started = time.monotonic()
    result = run_cli("run", write_job(folder, doc), n=2)  # rank 1 fails on the last batch, 8..9
    assert time.monotonic() - started < 60
    # The two batches before it were committed and stay for --resume; no output file.
    assert not (folder / "out" / "result.h5").exists()
    journal = Journal.open(folder / "out" / "result.h5", {}, resume=True, overwrite=False)
    assert journal.committed() == {0, 4}
    journal.close()
    assert not (folder / "out" / "result.h5.lock").exists()
    assert result.returncode == 1, result.stderr
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("spmdinfer: error:")]
    assert len(line) == 1 and "rank 1" in line[0] and "rows 8..9" in line[0]
    assert "[rank 1] ERROR" in result.stderr and "[rank 1] Traceback (most recent call last)" in result.stderr


def test_validate_accepts_a_good_job_without_mpi_or_mindspore(job_dir):
    folder, doc = job_dir
    job = write_job(folder, doc)
    code = ("import sys; from spmdinfer.cli import main; rc = main(['validate', sys.argv[1]]); "
            "assert 'mpi4py.MPI' not in sys.modules and 'mindspore' not in sys.modules, 'imported'; "
            "sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ok: 2 rank(s), 10 rows in 3 batch(es)" in result.stdout


def test_validate_says_what_run_would_do_with_an_existing_output(job_dir):
    """An output from an earlier run does not stop validate: every other check runs, and it
    says what `run` would do with the output; exit 2 where `run` with the same flags would
    refuse it."""
    folder, doc = job_dir
    job = write_job(folder, doc)
    out = folder / "out" / "result.h5"
    out.parent.mkdir()
    out.write_bytes(b"precious")
    assert_clean_error(run_cli("validate", job), f"[output] file {out} exists; pass --overwrite",
                       "every other check passed")
    for flag, says in (("--overwrite", "`run --overwrite` replaces it once the new one is complete"),
                       ("--resume", "`run --resume` has nothing to do")):
        result = run_cli("validate", job, flag)
        assert result.returncode == 0 and f"output: {out} exists" in result.stdout, result.stderr
        assert says in result.stdout and "ok: 2 rank(s), 10 rows" in result.stdout
    broken = dict(doc, input={**doc["input"], "datasets": {"x": "/nope"}})
    assert_clean_error(run_cli("validate", write_job(folder, broken, name="broken.toml")),
                       "no such dataset")
    out.unlink()  # now a stopped run's parts, one batch committed
    journal = Journal.open(out, {}, resume=False, overwrite=False)
    journal.commit(0, [np.zeros((4, 4), np.float32)])
    journal.close()
    assert_clean_error(run_cli("validate", job), "a partial run left",
                       "pass --resume to continue it or --overwrite to start again")
    result = run_cli("validate", job, "--resume")
    assert result.returncode == 0 and "`run --resume` continues it" in result.stdout, result.stderr
    assert Journal.open(out, {}, resume=True, overwrite=False).committed() == {0}  # untouched
    out.write_bytes(b"precious")  # the parts and a complete output: --resume refuses, as run does
    assert_clean_error(run_cli("validate", job, "--resume"), f"[output] file {out} exists",
                       "a partial run's")
    result = run_cli("validate", job, "--overwrite")
    assert result.returncode == 0 and "exist(s): `run --overwrite` starts again" in result.stdout
    assert "exit codes" in run_cli("validate", "--help").stdout


@pytest.mark.parametrize("breakage, needle", [
    (lambda doc: doc["model"].update(ranks=9), "slice of model rank 8 not found"),
    (lambda doc: doc["input"].update(datasets={"x": "/nope"}), "no such dataset"),
    (lambda doc: doc["model"].update(ranks="two"), "[model] ranks must be an integer"),
])
def test_validate_reports_problems_with_exit_2(job_dir, breakage, needle):
    folder, doc = job_dir
    breakage(doc)
    assert_clean_error(run_cli("validate", write_job(folder, doc)), needle)


def test_help_and_import_start_nothing():
    code = ("import sys, spmdinfer, spmdinfer.cli; "
            "assert 'mpi4py.MPI' not in sys.modules and 'mindspore' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    result = run_cli("--help")
    assert result.returncode == 0 and "run" in result.stdout and "validate" in result.stdout
    result = run_cli("run", "--help")
    codes = result.stdout.split("exit codes", 1)[1]
    assert result.returncode == 0 and all(f"\n  {c} " in codes for c in (0, 1, 2, 75)), result.stdout
