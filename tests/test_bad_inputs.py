"""The input side of the bad-input catalogue: hostile or unreadable HDF5 structure, non-numeric
dtypes, absurd shapes, batches too big for memory, and output paths that cannot be created.

Unit tests build each file with h5py and open it with InputReader; a few run the real CLI
under mpiexec to show the one-line error, exit code 2 and nothing written. Values are never
checked: NaN and Inf go through untouched."""

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from spmdinfer.input import InputField, InputReader, check_batch_memory
from spmdinfer.output import check_output_path
from spmdinfer.topology import available_memory, launcher_ranks_on_node
from spmdinfer.errors import DataError
from spmdinfer.spec import InputSpec, OutputSpec
from tests.conftest import assert_clean_error, matmul_job, read_h5, run_cli, write_h5, write_job

NUMERIC = "expected a numeric dtype"
INSIDE = "expected data stored in the input file"


def open_input(path, dataset="/x", batch_size=4, ranks_on_node=1):
    return InputReader(InputSpec(path, (("x", dataset),), batch_size), ranks_on_node)


def refused(path, *needles, **options) -> str:
    """InputReader refuses `path` with a one-line DataError containing every needle."""
    with pytest.raises(DataError) as caught:
        open_input(path, **options).close()
    message = str(caught.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def accepted(path, **options) -> InputReader:
    reader = open_input(path, **options)
    reader.close()
    return reader


def h5(path, build):
    """Write an HDF5 file at `path` with `build(file)`."""
    with h5py.File(path, "w") as f:
        build(f)
    return path


def other_file(folder):
    """A plain HDF5 file for links and virtual datasets to point at."""
    return write_h5(folder / "other.h5", {"x": np.ones((4, 96), np.float32),
                                          "g/x": np.ones((4, 96), np.float32)})


# Dtypes.

@pytest.mark.parametrize("dtype, name", [
    (h5py.string_dtype(), "variable-length utf-8 string"),
    (h5py.string_dtype("ascii", 8), "fixed-length ascii string (|S8)"),
    (h5py.vlen_dtype(np.float32), "variable-length sequence of float32"),
    (h5py.ref_dtype, "object reference"),
    (h5py.regionref_dtype, "region reference"),
    (np.dtype([("a", "f4"), ("b", "i4")]), "compound (a, b)"),
    (h5py.enum_dtype({"RED": 0, "GREEN": 1}, basetype="i1"), "enum (int8)"),
    (h5py.opaque_dtype(np.dtype("V4")), "opaque"),
    (np.dtype(("f4", (3,))), "array of float32 (3,)"),
])
def test_non_numeric_dtypes_are_refused_with_the_dtype_named(tmp_path, dtype, name):
    path = h5(tmp_path / "in.h5", lambda f: f.create_dataset("x", (4,), dtype=dtype))
    refused(path, "[input.datasets] x", "dataset /x", str(path), name, NUMERIC)


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint16", "float16", "float64", "complex64"])
def test_numeric_dtypes_are_accepted(tmp_path, dtype):
    path = write_h5(tmp_path / "in.h5", {"x": np.zeros((4, 3), dtype)})
    assert accepted(path).fields == [InputField("x", "/x", np.dtype(dtype).str, (3,))]


# Shapes.

def test_scalar_and_null_datasets_are_refused(tmp_path):
    path = h5(tmp_path / "in.h5", lambda f: (f.create_dataset("s", data=1.0),
                                             f.create_dataset("n", data=h5py.Empty("f4"))))
    refused(path, "dataset /s", "is a scalar", dataset="/s")
    refused(path, "dataset /n", "null dataspace", "expected rows along axis 0", dataset="/n")


def test_empty_and_zero_width_datasets_are_accepted(tmp_path):
    path = write_h5(tmp_path / "in.h5", {"empty": np.zeros((0, 96), np.float32),
                                         "thin": np.zeros((10, 0), np.float32)})
    assert accepted(path, dataset="/empty").rows == 0
    reader = accepted(path, dataset="/thin")
    assert reader.rows == 10 and reader.fields[0].row_shape == (0,)


def test_absurd_declared_shape_is_refused(tmp_path):
    path = h5(tmp_path / "in.h5", lambda f: f.create_dataset("x", (2 ** 45, 8), np.float32,
                                                             chunks=(1024, 8)))
    refused(path, "dataset /x", "declares shape (35184372088832, 8) float32 = 1.0 PiB",
            "the file holds only", "expected at most 1.0 TiB or 10,000 × the file's size")


def test_absurd_row_count_of_zero_width_rows_is_refused(tmp_path):
    path = h5(tmp_path / "in.h5", lambda f: f.create_dataset("x", (2 ** 50, 0), np.float32,
                                                             maxshape=(None, 0)))
    refused(path, "dataset /x", "declares shape (1125899906842624, 0)")


def test_large_unwritten_and_highly_compressed_datasets_are_accepted(tmp_path):
    def build(f):
        f.create_dataset("unwritten", (2 ** 28, 96), np.float32, chunks=(4096, 96))  # 96 GiB
        f.create_dataset("zeros", data=np.zeros((200_000, 96), np.float32), chunks=(20_000, 96),
                         compression="gzip")
    path = h5(tmp_path / "in.h5", build)
    assert os.path.getsize(path) < 1_000_000
    assert accepted(path, dataset="/unwritten").rows == 2 ** 28
    assert accepted(path, dataset="/zeros").rows == 200_000


# Links and storage outside the file.

def test_external_link_to_the_dataset_is_refused(tmp_path):
    other_file(tmp_path)
    path = h5(tmp_path / "in.h5", lambda f: f.__setitem__("x", h5py.ExternalLink("other.h5", "/x")))
    refused(path, "dataset /x", "/x is an external link to /x in other.h5", INSIDE)


def test_external_link_to_a_group_on_the_path_is_refused(tmp_path):
    other_file(tmp_path)
    path = h5(tmp_path / "in.h5", lambda f: f.__setitem__("a", h5py.ExternalLink("other.h5", "/g")))
    refused(path, "dataset /a/x", "/a is an external link to /g in other.h5", dataset="/a/x")


def test_soft_links_inside_the_file_are_followed_and_checked(tmp_path):
    other_file(tmp_path)

    def build(f):
        f["real/x"] = np.ones((4, 96), np.float32)
        f["alias"] = h5py.SoftLink("/real")
        f["ext"] = h5py.ExternalLink("other.h5", "/g")
        f["sneaky"] = h5py.SoftLink("/ext/x")
        f["loop"] = h5py.SoftLink("/loop")
        f["dangling"] = h5py.SoftLink("/nowhere")
    path = h5(tmp_path / "in.h5", build)
    assert accepted(path, dataset="/alias/x").rows == 4
    refused(path, "dataset /sneaky", "/ext is an external link to /g in other.h5", dataset="/sneaky")
    refused(path, "dataset /loop", "soft links", dataset="/loop")
    refused(path, "dataset /dangling", "no such dataset", dataset="/dangling")


def test_virtual_dataset_is_refused(tmp_path):
    other_file(tmp_path)

    def build(f):
        layout = h5py.VirtualLayout((4, 96), np.float32)
        layout[:] = h5py.VirtualSource("other.h5", "/x", (4, 96))
        f.create_virtual_dataset("x", layout)
    path = h5(tmp_path / "in.h5", build)
    refused(path, "dataset /x", "is a virtual dataset (mapped from other.h5)", INSIDE)


def test_external_raw_storage_is_refused(tmp_path):
    np.ones((4, 96), np.float32).tofile(tmp_path / "raw.bin")
    path = h5(tmp_path / "in.h5", lambda f: f.create_dataset(
        "x", (4, 96), np.float32, external=[(str(tmp_path / "raw.bin"), 0, h5py.h5f.UNLIMITED)]))
    refused(path, "dataset /x", "external raw file(s)", "raw.bin", INSIDE)


def test_filter_this_hdf5_cannot_decode_is_refused(tmp_path):
    path = h5(tmp_path / "in.h5", lambda f: f.create_dataset(
        "x", (4, 96), np.float32, compression=32001, allow_unknown_filter=True))
    refused(path, "dataset /x", "HDF5 filter 32001", "cannot decode")


# Memory.

FEATURES = [InputField("x", "/x", "<f4", (96,))]   # 384 bytes a row


def test_batch_that_does_not_fit_in_memory_is_refused():
    with pytest.raises(DataError) as caught:
        check_batch_memory(FEATURES, rows=10 ** 6, batch_size=10_000, ranks_on_node=4,
                           available=16 * 2 ** 20)
    assert str(caught.value) == (
        "[input] batch_size = 10000: a batch of 10000 rows needs 3.7 MiB on each of 4 ranks on "
        "this node = 14.6 MiB, more than half of the 16.0 MiB of memory available; use a smaller "
        "batch_size (at most 5461)")
    check_batch_memory(FEATURES, rows=10 ** 6, batch_size=5461, ranks_on_node=4,
                       available=16 * 2 ** 20)


def test_batch_memory_counts_every_dataset_every_rank_and_caps_at_the_rows():
    fields = FEATURES + [InputField("k", "/k", "<i8", (8,))]        # 384 + 64 bytes a row
    check_batch_memory(fields, rows=1000, batch_size=1000, ranks_on_node=1, available=896_000)
    with pytest.raises(DataError, match="on each of 2 ranks on this node"):
        check_batch_memory(fields, rows=1000, batch_size=1000, ranks_on_node=2, available=896_000)
    # The buffers hold min(batch_size, rows) rows: a huge batch_size over 10 rows is fine.
    check_batch_memory(FEATURES, rows=10, batch_size=2 ** 40, ranks_on_node=8, available=2 ** 20)
    with pytest.raises(DataError, match="even one row does not fit"):
        check_batch_memory(FEATURES, rows=10, batch_size=1, ranks_on_node=1, available=700)


def test_input_reader_refuses_a_huge_batch_against_real_memory(tmp_path):
    path = h5(tmp_path / "in.h5", lambda f: f.create_dataset("x", (2 ** 31, 96), np.float32,
                                                             chunks=(4096, 96)))
    refused(path, "[input] batch_size = 1099511627776", "a batch of 2147483648 rows needs 768.0 GiB",
            "of memory available", "use a smaller batch_size", batch_size=2 ** 40)
    assert accepted(path, batch_size=4096).rows == 2 ** 31


def test_available_memory_and_ranks_on_node(monkeypatch):
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    assert 0 < available_memory() <= int(meminfo["MemAvailable"].split()[0]) * 1024
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_ranks_on_node() == 1
    monkeypatch.setenv("MPI_LOCALNRANKS", "6")
    assert launcher_ranks_on_node() == 6


# Output paths.

def output_refused(path, *needles):
    with pytest.raises(DataError) as caught:
        check_output_path(OutputSpec(path, (("y", "/y"),)), overwrite=False)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_output_paths_that_cannot_be_created(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "somefile.txt").write_text("not a folder")
    output_refused(tmp_path / "folder", "is a directory")
    output_refused(tmp_path / "somefile.txt" / "out.h5", "somefile.txt is not a folder")
    output_refused(tmp_path / "somefile.txt" / "a" / "out.h5", "is not a folder")
    output_refused(Path("/proc/spmdinfer/out.h5"), "cannot create it in /proc")


def test_output_path_check_leaves_nothing_behind(tmp_path):
    check_output_path(OutputSpec(tmp_path / "out.h5", ()), overwrite=False)
    check_output_path(OutputSpec(tmp_path / "new" / "deeper" / "out.h5", ()), overwrite=False)
    assert list(tmp_path.iterdir()) == []


# The CLI: one line, exit 2, nothing written.

@pytest.fixture
def job(tmp_path, matmul_slices):
    """A 2-rank matmul job in tmp_path reading /x of in.h5; tests write in.h5."""
    template, weight = matmul_slices
    return tmp_path, matmul_job(tmp_path, template, ranks=2, batch_size=4), weight


def run_refused(folder, doc, *needles):
    result = run_cli("run", write_job(folder, doc), n=2)
    assert_clean_error(result, *needles)
    assert not (folder / "out").exists(), "a refused run left output behind"
    assert not result.stdout.strip(), result.stdout


def test_cli_refuses_external_link(job):
    folder, doc, _ = job
    other_file(folder)
    h5(folder / "in.h5", lambda f: f.__setitem__("x", h5py.ExternalLink("other.h5", "/x")))
    run_refused(folder, doc, "[input.datasets] x", "is an external link", "other.h5")


def test_cli_refuses_virtual_dataset(job):
    folder, doc, _ = job
    other_file(folder)

    def build(f):
        layout = h5py.VirtualLayout((4, 96), np.float32)
        layout[:] = h5py.VirtualSource("other.h5", "/x", (4, 96))
        f.create_virtual_dataset("x", layout)
    h5(folder / "in.h5", build)
    run_refused(folder, doc, "[input.datasets] x", "is a virtual dataset")


def test_cli_refuses_vlen_strings(job):
    folder, doc, _ = job
    h5(folder / "in.h5", lambda f: f.create_dataset("x", data=["a", "bb"] * 5,
                                                     dtype=h5py.string_dtype()))
    run_refused(folder, doc, "[input.datasets] x", "variable-length utf-8 string", NUMERIC)


def test_cli_refuses_absurd_shape(job):
    folder, doc, _ = job
    h5(folder / "in.h5", lambda f: f.create_dataset("x", (2 ** 45, 96), np.float32,
                                                     chunks=(1024, 96)))
    run_refused(folder, doc, "[input.datasets] x", "declares shape (35184372088832, 96)")


def test_cli_refuses_batch_too_big_for_memory(job):
    folder, doc, _ = job
    h5(folder / "in.h5", lambda f: f.create_dataset("x", (2 ** 31, 96), np.float32,
                                                     chunks=(4096, 96)))
    doc["input"]["batch_size"] = 2 ** 40
    run_refused(folder, doc, "[input] batch_size = 1099511627776", "on each of 2 ranks",
                "use a smaller batch_size")


def test_cli_refuses_output_under_a_regular_file(job):
    folder, doc, _ = job
    write_h5(folder / "in.h5", {"x": np.ones((10, 96), np.float32)})
    (folder / "somefile.txt").write_text("not a folder")
    doc["output"]["file"] = "somefile.txt/out.h5"
    run_refused(folder, doc, "[output] file", "somefile.txt is not a folder")


def test_a_folder_in_the_way_of_the_temporary_output_ends_every_rank(job):
    """Rank 0 cannot create FILE.partial, and rank 1 has gone on towards the loop, whose
    first step is a blocking collective: it must learn of the failure before (this hung)."""
    folder, doc, _ = job
    write_h5(folder / "in.h5", {"x": np.ones((10, 96), np.float32)})
    (folder / "out" / "result.h5.partial").mkdir(parents=True)
    result = run_cli("run", write_job(folder, doc), n=2, timeout=60)
    assert_clean_error(result, "[output] file", "cannot create",
                       "result.h5.partial (Is a directory)")
    assert [p.name for p in (folder / "out").iterdir()] == ["result.h5.partial"]


def test_a_job_file_named_in_another_encoding_is_recorded_with_escapes(job):
    """A name that is not UTF-8 (Latin-1 here) cannot be stored by HDF5 as it is: the
    output's provenance says it with a backslash escape."""
    folder, doc, _ = job
    write_h5(folder / "in.h5", {"x": np.ones((10, 96), np.float32)})
    named = Path(os.fsdecode(os.fsencode(folder) + b"/job\xff.toml"))
    write_job(folder, doc).rename(named)
    result = run_cli("run", named, n=2, timeout=60)
    assert result.returncode == 0, result.stderr
    with h5py.File(folder / "out" / "result.h5", "r") as f:
        assert f.attrs["job_file"] == f"{folder}/job\\xff.toml"


def test_nan_and_inf_pass_through_untouched(job):
    folder, doc, weight = job
    x = np.random.default_rng(7).standard_normal((10, 96)).astype(np.float32)
    x[1, 5] = np.nan
    x[3, 0] = np.inf
    x[4, 7] = -np.inf
    x[6, 2], x[6, 9] = np.inf, -np.inf   # Inf - Inf (NaN) where the two weights share a sign
    write_h5(folder / "in.h5", {"x": x})
    result = run_cli("run", write_job(folder, doc), n=2)
    assert result.returncode == 0, result.stderr
    y = read_h5(folder / "out" / "result.h5", "/y")
    with np.errstate(invalid="ignore", over="ignore"):
        expected = -(x @ weight[:, :4])
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(expected))
    np.testing.assert_array_equal(np.sign(y[np.isinf(y)]), np.sign(expected[np.isinf(expected)]))
    assert np.isnan(y[1]).all() and np.isinf(y[3]).all() and np.isinf(y[4]).all()
    finite = np.isfinite(expected)
    np.testing.assert_allclose(y[finite], expected[finite], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(read_h5(folder / "in.h5", "/x"), x)
