"""`spmdinfer validate --deep`: the preflight before spending cluster hours."""

import hashlib
import shutil

import numpy as np
import pytest

from tests.conftest import assert_clean_error, matmul_job, run_cli, write_h5, write_job


def manifest_for(folder, paths):
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in paths]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def slice_copies(tmp_path, template, ranks):
    (tmp_path / "m").mkdir()
    paths = []
    for rank in range(ranks):
        paths.append(tmp_path / "m" / f"s{rank}.mindir")
        shutil.copy(str(template).format(rank=rank), paths[-1])
    return paths


def test_deep_checks_pass_and_say_what_they_checked(tmp_path, matmul_slices):
    template, _ = matmul_slices
    paths = slice_copies(tmp_path, template, 4)
    manifest_for(tmp_path / "m", paths)
    write_h5(tmp_path / "in.h5", {"x": np.ones((10, 96), np.float32)})
    doc = matmul_job(tmp_path, template, ranks=4)
    doc["model"].update(files="m/s{rank}.mindir", sha256="m/SHA256SUMS")
    result = run_cli("validate", write_job(tmp_path, doc), "--deep", "-n", 8)
    assert result.returncode == 0, result.stderr
    for words in ("world 8 = 2 replica(s) x 1 stage(s) x 4 rank(s)", "sha256: every slice matches",
                  "MPI: mpi4py loads MPICH", "mpiexec on PATH: MPICH",
                  "declared inputs and outputs of all 4 model rank(s) fit"):
        assert words in result.stdout
    assert run_cli("run", write_job(tmp_path, doc), n=4).returncode == 0


def test_deep_finds_a_damaged_slice_and_the_run_refuses_it(tmp_path, matmul_slices):
    template, _ = matmul_slices
    paths = slice_copies(tmp_path, template, 2)
    manifest_for(tmp_path / "m", paths)
    shutil.copy(str(template).format(rank=5), paths[1])  # the wrong slice in rank 1's place
    write_h5(tmp_path / "in.h5", {"x": np.ones((10, 96), np.float32)})
    doc = matmul_job(tmp_path, template, ranks=2)
    doc["model"].update(files="m/s{rank}.mindir", sha256="m/SHA256SUMS")
    job = write_job(tmp_path, doc)
    assert_clean_error(run_cli("validate", job, "--deep"), "s1.mindir", "manifest expects")
    assert_clean_error(run_cli("run", job, n=2), "rank 1", "s1.mindir", "manifest expects")
    assert not (tmp_path / "out").exists()


def test_validate_finds_a_dataset_that_does_not_fit_a_slice_without_mpi(tmp_path, matmul_slices):
    """Plain validate reads the slices' signatures (no model loaded), as --deep does."""
    template, _ = matmul_slices
    write_h5(tmp_path / "in.h5", {"x": np.ones((10, 96), np.float64)})
    job = write_job(tmp_path, matmul_job(tmp_path, template, ranks=8))
    for deep in ((), ("--deep",)):
        assert_clean_error(run_cli("validate", job, *deep),
                           "dataset /x float64 (rows, 96) does not fit model input x float32")
    write_h5(tmp_path / "in.h5", {"x": np.ones((10, 95), np.float32)})
    assert_clean_error(run_cli("validate", job), "dataset /x float32 (rows, 95) does not fit")


@pytest.mark.parametrize("change, needle", [
    ({"combine": {"y": "concat:2"}}, '[output.combine] y = "concat:2": slice'),
    ({"datasets": {"y": "/y", "z": "/z"}}, "[output.datasets] names 2 output(s) (y, z) but slice"),
])
def test_validate_checks_outputs_against_what_the_slices_declare(tmp_path, matmul_slices,
                                                                 change, needle):
    template, _ = matmul_slices
    write_h5(tmp_path / "in.h5", {"x": np.ones((10, 96), np.float32)})
    doc = matmul_job(tmp_path, template, ranks=8)
    doc["output"].update(change)
    assert_clean_error(run_cli("validate", write_job(tmp_path, doc)), needle)


def test_validate_says_where_a_slice_declares_no_outputs(tmp_path, multi_io_slices):
    template, _ = multi_io_slices
    write_h5(tmp_path / "in.h5", {"x": np.ones((6, 4), np.float32),
                                  "k": np.ones((6, 3), np.int32)})
    doc = {"model": {"files": str(template), "ranks": 2},
           "input": {"file": "in.h5", "datasets": {"k": "/k", "x": "/x"}},
           "output": {"file": "out.h5", "datasets": {"scores": "/s", "shifted": "/t", "part": "/p"}}}
    result = run_cli("validate", write_job(tmp_path, doc))
    assert result.returncode == 0, result.stderr
    assert ("the declared inputs of all 2 model rank(s) fit; model rank(s) 0, 1 declare no "
            "outputs (MindIR tuple outputs), so their outputs are not checked here") in result.stdout
    assert "inputs and outputs" not in result.stdout
    # --deep learns them from a one-row predict, and checks the combines against them.
    doc["output"]["combine"] = {"scores": "concat:1", "part": "sum"}
    result = run_cli("validate", write_job(tmp_path, doc), "--deep")
    assert result.returncode == 0, result.stderr
    assert ("outputs: outputs learned from a one-row predict on CPU, and they fit: model rank 0: "
            "output0 float32 (?, 2), output1 int32 (?, 3), output2 int32 (?, 3); 1: ") in result.stdout
    doc["output"]["combine"] = {"scores": "concat:2"}
    assert run_cli("validate", write_job(tmp_path, doc)).returncode == 0  # not declared: unknown
    assert_clean_error(run_cli("validate", write_job(tmp_path, doc), "--deep"),
                       '[output.combine] scores = "concat:2"', "output0 float32 (?, 2)")
    doc["output"]["datasets"] = {"scores": "/s", "shifted": "/t"}
    doc["output"]["combine"] = {}
    assert_clean_error(run_cli("validate", write_job(tmp_path, doc), "--deep"),
                       "[output.datasets] names 2 output(s) (scores, shifted)", "declares 3")


def test_deep_finds_shared_devices_and_bad_world_sizes(tmp_path, matmul_slices):
    template, _ = matmul_slices
    write_h5(tmp_path / "in.h5", {"x": np.ones((10, 96), np.float32)})
    doc = matmul_job(tmp_path, template, ranks=8)
    doc["device"] = {"target": "gpu", "device_id": 0}
    job = write_job(tmp_path, doc)
    assert_clean_error(run_cli("validate", job, "--deep", "-n", 8, "--per-node", 4),
                       "ranks 0 and 1 would share a device")
    assert_clean_error(run_cli("validate", job, "--deep", "-n", 12), "world size 12")
