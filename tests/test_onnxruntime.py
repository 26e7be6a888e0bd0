"""The onnxruntime backend: real ONNX slices exported by MindSpore, run under real mpiexec."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from spmdinfer import backends
from spmdinfer.backends import Placement
from spmdinfer.backends.onnxruntime import open_session
from spmdinfer.errors import BackendError
from tests.conftest import (assert_clean_error, dynamic, export_mindir, export_onnx, read_h5, run_cli,
                            write_h5, write_job)

MATMUL_WEIGHT = np.full((96, 16), 0.5, dtype=np.float32)
MATMUL_RANKS = 8
MLP_RANKS = 4
MLP_FIXED_BATCH = 8  # the MLP's ONNX slices keep a static batch, to exercise padding
CPU = Placement(target="cpu", device_id=None, rank_id=0, threads=1)


@pytest.fixture(scope="session")
def onnx_matmul(tmp_path_factory):
    """The seed matmul in 8 column slices (rank r: columns 2r, 2r+1), as ONNX and MindIR."""
    from tests.cells import MatMulNeg

    folder = tmp_path_factory.mktemp("onnx_matmul")
    example = np.zeros((4, 96), np.float32)
    for rank in range(MATMUL_RANKS):
        cell = MatMulNeg(MATMUL_WEIGHT[:, 2 * rank:2 * rank + 2])
        export_onnx(cell, example, folder / f"slice_{rank}.onnx", free_batch=True)
        export_mindir(cell, [dynamic(96)], folder / f"slice_{rank}.mindir")
    return folder


@pytest.fixture(scope="session")
def onnx_mlp(tmp_path_factory):
    """A 4-way row-parallel MLP: (folder of slices, weights); ONNX with a fixed batch of 8."""
    from tests.cells import mlp_shards, mlp_weights

    folder = tmp_path_factory.mktemp("onnx_mlp")
    weights = mlp_weights(16, 32, 5)
    example = np.zeros((MLP_FIXED_BATCH, 16), np.float32)
    for rank, cell in enumerate(mlp_shards(*weights, MLP_RANKS)):
        export_onnx(cell, example, folder / f"slice_{rank}.onnx", free_batch=False)
        export_mindir(cell, [dynamic(16)], folder / f"slice_{rank}.mindir")
    return folder, weights


def job(folder: Path, files: str, ranks: int, batch_size: int, combine: str,
        backend: str = "onnxruntime", options: dict | None = None) -> Path:
    doc = {"model": {"files": files, "backend": backend, "ranks": ranks},
           "device": {"threads": 1},
           "input": {"file": "in.h5", "batch_size": batch_size, "datasets": {"x": "/x"}},
           "output": {"file": "out.h5", "datasets": {"y": "/y"}, "combine": {"y": combine}}}
    if options is not None:
        doc["backend"] = {"onnxruntime": options}
    return write_job(folder, doc)


def backend_attr(path: Path) -> str:
    with h5py.File(path, "r") as f:
        return f.attrs["backend"]


@pytest.mark.mpi
def test_matmul_8_ranks_free_batch(tmp_path, onnx_matmul):
    x = np.random.default_rng(1).standard_normal((103, 96)).astype(np.float32)
    write_h5(tmp_path / "in.h5", {"x": x})
    path = job(tmp_path, str(onnx_matmul / "slice_{rank}.onnx"), MATMUL_RANKS, 16, "concat:-1")
    result = run_cli("run", path, "--no-progress", n=MATMUL_RANKS)
    assert result.returncode == 0, result.stderr
    # Float32 sums of 96 products: an absolute error (about 1e-6), not a relative one, where
    # they nearly cancel (ONNX Runtime on an AVX2-only CPU: 7e-7 off a 0.04, 1.8e-5 of it).
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), -(x @ MATMUL_WEIGHT),
                               rtol=1e-5, atol=1e-5)
    assert backend_attr(tmp_path / "out.h5") == "onnxruntime"


@pytest.mark.mpi
def test_mlp_4_ranks_fixed_batch_with_auto_backend(tmp_path, onnx_mlp):
    from tests.cells import mlp_reference

    folder, weights = onnx_mlp
    # 50 rows in batches of 20: every batch is cut into pieces of 8, the last piece padded.
    x = np.random.default_rng(2).standard_normal((50, 16)).astype(np.float32)
    write_h5(tmp_path / "in.h5", {"x": x})
    path = job(tmp_path, str(folder / "slice_{rank}.onnx"), MLP_RANKS, 20, "sum", backend="auto")
    result = run_cli("run", path, "--no-progress", n=MLP_RANKS)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"),
                               mlp_reference(x, *weights), rtol=1e-5, atol=1e-6)
    assert backend_attr(tmp_path / "out.h5") == "onnxruntime"


def test_mindir_and_onnx_slices_agree(onnx_matmul, onnx_mlp):
    rows = np.random.default_rng(3).standard_normal((19, 96)).astype(np.float32)
    cases = [(onnx_matmul, MATMUL_RANKS, rows), (onnx_mlp[0], MLP_RANKS, rows[:, :16].copy())]
    for folder, ranks, x in cases:
        for rank in range(ranks):
            ours = open_session(folder / f"slice_{rank}.onnx", CPU, {}).predict([x])
            theirs = backends.open_session("mindspore", folder / f"slice_{rank}.mindir", CPU,
                                           {}).predict([x])
            assert len(ours) == len(theirs) == 1
            np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6)


def test_auto_picks_onnxruntime_for_onnx_files():
    assert backends.resolve("auto", Path("slice_0.onnx")) == "onnxruntime"
    assert backends.resolve("auto", Path("SLICE.ONNX")) == "onnxruntime"


def test_signature_from_ort(onnx_matmul, onnx_mlp):
    session = open_session(onnx_matmul / "slice_0.onnx", CPU, {})
    (x,) = session.inputs()
    assert (x.name, x.shape, x.dtype) == ("x", (None, 96), np.dtype(np.float32))
    assert [o.dtype for o in session.outputs()] == [np.dtype(np.float32)]
    fixed = open_session(onnx_mlp[0] / "slice_0.onnx", CPU, {})
    assert fixed.inputs()[0].shape == (MLP_FIXED_BATCH, 16)


def test_threads_and_no_spinning(onnx_matmul):
    placement = Placement(target="cpu", device_id=None, rank_id=0, threads=3)
    reenabled = {"session_config": {"session.intra_op.allow_spinning": "1"}}
    for options, spinning in (({}, "0"), (reenabled, "1")):
        held = open_session(onnx_matmul / "slice_0.onnx", placement, options).options
        assert (held.intra_op_num_threads, held.inter_op_num_threads) == (3, 1)
        assert held.get_session_config_entry("session.intra_op.allow_spinning") == spinning
        assert held.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_documented_options_reach_ort(onnx_matmul):
    import onnxruntime as ort

    held = open_session(onnx_matmul / "slice_0.onnx", CPU, {
        "graph_optimization_level": "basic", "enable_mem_pattern": False,
        "enable_cpu_mem_arena": False, "log_severity_level": 2}).options
    assert held.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert not held.enable_mem_pattern and not held.enable_cpu_mem_arena
    assert held.log_severity_level == 2


@pytest.mark.parametrize("options, needles", [
    ({"spinning": False}, ["[backend.onnxruntime] spinning", "graph_optimization_level",
                           "session_config"]),
    ({"graph_optimization_level": "max"}, ["graph_optimization_level", "'disable_all'", "'max'"]),
    ({"enable_mem_pattern": "no"}, ["enable_mem_pattern", "true or false"]),
    ({"log_severity_level": True}, ["log_severity_level", "0 (verbose)"]),
    ({"log_severity_level": 7}, ["log_severity_level", "4 (fatal)", "got 7"]),
    ({"session_config": {"session.intra_op.allow_spinning": 1}}, ["allow_spinning", "string"]),
])
def test_bad_options(onnx_matmul, options, needles):
    with pytest.raises(BackendError) as caught:
        open_session(onnx_matmul / "slice_0.onnx", CPU, options)
    for needle in needles:
        assert needle in str(caught.value)


@pytest.mark.mpi
def test_bad_option_key_is_a_clean_error(tmp_path, onnx_matmul):
    write_h5(tmp_path / "in.h5", {"x": np.zeros((5, 96), np.float32)})
    path = job(tmp_path, str(onnx_matmul / "slice_{rank}.onnx"), 2, 4, "concat:-1",
               options={"intra_threads": 2})
    result = run_cli("run", path, "--no-progress", n=2)
    assert_clean_error(result, "[backend.onnxruntime] intra_threads", "valid options")
    assert not (tmp_path / "out.h5").exists()


def test_corrupt_slice_names_the_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf")
    with pytest.raises(BackendError, match="broken.onnx"):
        open_session(path, CPU, {})


def test_gpu_target_uses_cuda_on_the_rank_device(onnx_matmul):
    import onnxruntime as ort

    gpu = Placement(target="gpu", device_id=0, rank_id=0, threads=1)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        # The session refuses to fall back to the CPU silently, so opening at all is the check.
        session = open_session(onnx_matmul / "slice_0.onnx", gpu, {})
        assert session.predict([np.ones((2, 96), np.float32)])[0].shape == (2, 2)
    else:
        with pytest.raises(BackendError, match="CUDAExecutionProvider"):
            open_session(onnx_matmul / "slice_0.onnx", gpu, {})


@pytest.mark.mpi
def test_names_that_do_not_match_bind_by_position_with_one_warning(tmp_path):
    """The job's dataset names differ from the slice's own input and output names: both bind
    by position, and rank 0 says so once for all the ranks (naming both sides)."""
    import mindspore
    from mindspore import onnx

    from tests.cells import MatMulNeg

    for rank in range(2):
        onnx.export(MatMulNeg(MATMUL_WEIGHT[:, 2 * rank:2 * rank + 2]),
                    mindspore.Tensor(np.zeros((4, 96), np.float32)),
                    file_name=str(tmp_path / f"named_{rank}.onnx"), input_names=["x"],
                    output_names=["scores"], dynamic_axes={"x": {0: "batch"}})
    x = np.random.default_rng(5).standard_normal((20, 96)).astype(np.float32)
    write_h5(tmp_path / "in.h5", {"features": x})
    doc = {"model": {"files": "named_{rank}.onnx", "backend": "onnxruntime", "ranks": 2},
           "input": {"file": "in.h5", "batch_size": 8, "datasets": {"features": "/features"}},
           "output": {"file": "out.h5", "datasets": {"y": "/y"}, "combine": {"y": "concat:-1"}}}
    result = run_cli("run", write_job(tmp_path, doc), "--no-progress", n=2)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 2 and all(w.startswith("[rank 0] WARNING") for w in warnings), warnings
    assert "[input.datasets] names features but slice" in warnings[0]
    assert "declares inputs x: bound by position (features -> x)" in warnings[0]
    assert "[output.datasets] names y but slice" in warnings[1]
    assert "declares outputs scores: written by position (scores -> y)" in warnings[1]
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), -(x @ MATMUL_WEIGHT[:, :4]),
                               rtol=1e-5, atol=1e-5)
