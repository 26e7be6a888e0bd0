"""`spmdinfer inspect`: what real MindIR and ONNX slice files declare, as a table or JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spmdinfer.errors import BackendError
from spmdinfer.inspect import format_report, inspect_slice
from tests.conftest import assert_clean_error, dynamic, export_mindir, export_onnx, run_cli


@pytest.fixture(scope="session")
def slices(tmp_path_factory):
    """One matmul slice as MindIR and ONNX, and a MindIR slice with a tuple of outputs."""
    from tests.cells import MatMulNeg, MultiIO

    folder = tmp_path_factory.mktemp("inspect")
    matmul = MatMulNeg(np.full((96, 2), 0.5, np.float32))
    export_mindir(matmul, [dynamic(96)], folder / "matmul.mindir")
    export_onnx(matmul, np.zeros((4, 96), np.float32), folder / "matmul.onnx", free_batch=True)
    export_mindir(MultiIO(np.ones((4, 2), np.float32), 0),
                  [dynamic(4), dynamic(3, dtype="int32")], folder / "multi.mindir")
    return folder


def test_mindir_signature(slices):
    report = inspect_slice(slices / "matmul.mindir")
    assert (report["format"], report["backend"]) == ("mindir", "mindspore")
    assert report["inputs"] == [{"name": "x", "shape": [None, 96], "dtype": "float32"}]
    assert report["outputs"] == [{"name": "output0", "shape": [None, 2], "dtype": "float32"}]


def test_mindir_tuple_outputs_are_not_declared(slices):
    report = inspect_slice(slices / "multi.mindir")
    assert [(t["name"], t["dtype"]) for t in report["inputs"]] == [("x", "float32"), ("k", "int32")]
    assert report["outputs"] is None
    assert "outputs: not declared in the file" in format_report(report)


def test_onnx_signature(slices):
    report = inspect_slice(slices / "matmul.onnx")
    assert (report["format"], report["backend"]) == ("onnx", "onnxruntime")
    assert report["inputs"] == [{"name": "x", "shape": [None, 96], "dtype": "float32"}]
    assert [(len(t["shape"]), t["dtype"]) for t in report["outputs"]] == [(2, "float32")]


@pytest.mark.parametrize("name, mode", [("multi.mindir", "text"), ("matmul.mindir", "json"),
                                        ("matmul.onnx", "text"), ("matmul.onnx", "json")])
def test_cli_prints_the_report(slices, name, mode):
    path = slices / name
    result = run_cli("inspect", path, *(["--json"] if mode == "json" else []))
    assert result.returncode == 0, result.stderr
    report = inspect_slice(path)
    if mode == "json":
        assert json.loads(result.stdout) == report
    else:
        assert result.stdout == format_report(report) + "\n"
        fmt, backend = report["format"], report["backend"]
        assert result.stdout.startswith(f"{path}: {fmt}, read with {backend}")
        assert "  x     float32" in result.stdout


@pytest.mark.parametrize("name, content, needle", [
    ("broken.onnx", b"not a protobuf", "not a readable ONNX file"),
    ("missing.onnx", None, "not found"),
])
def test_cli_unreadable_file_is_a_clean_error(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert_clean_error(run_cli("inspect", path), str(path), needle)


@pytest.mark.parametrize("name, needle", [("broken.mindir", "not a readable MindIR file"),
                                          ("model.pt", "unknown slice format '.pt'")])
def test_unreadable_or_unknown_file(tmp_path, name, needle):
    path = tmp_path / name
    path.write_bytes(b"\x08\xff\xff garbage")
    with pytest.raises(BackendError, match=needle):
        inspect_slice(path)


def test_big_slices_are_read_without_their_weights(tmp_path):
    """A slice's signature and collectives come from its skeleton: the weights (here 16 MiB of
    a 16 MiB file) are skipped, and what is read equals what the whole protobuf says."""
    from spmdinfer import mindir
    from tests.cells import MatMulNeg

    path = export_mindir(MatMulNeg(np.ones((4096, 1024), np.float32)), [dynamic(4096)],
                         tmp_path / "big.mindir")
    data = path.read_bytes()
    assert len(data) > 16 * 2 ** 20 > mindir.SKIM_ABOVE
    skeleton = mindir.skeleton(data)
    assert len(skeleton) < len(data) // 100
    whole = mindir.read_model(path)
    assert len(whole.graph.parameter) == 1  # the weights are there, in the whole file
    assert mindir.read_skeleton(path).graph.input == whole.graph.input
    assert mindir.read_skeleton(path).graph.output == whole.graph.output
    assert [str(t) for t in mindir.read_signature(path)[0]] == ["x float32 (?, 4096)"]
    truncated = tmp_path / "truncated.mindir"
    truncated.write_bytes(data[:len(data) - 1000])
    with pytest.raises(BackendError, match="not a readable MindIR file"):
        mindir.read_signature(truncated)


@pytest.mark.parametrize("options", [{"free_batch": True}, {"free_batch": False},
                                     {"free_batch": True, "keep_initializers_as_inputs": True,
                                      "output_names": ["scores"]}])
def test_onnx_files_are_read_as_onnx_runtime_sees_them(tmp_path, options):
    """The ONNX signature read from the protobuf by hand (no session, weights unread) is what an
    ONNX Runtime session reports: free and fixed batches, named outputs, and initializers
    listed among the graph's inputs (which are not inputs to feed)."""
    import mindspore
    from mindspore import onnx

    from spmdinfer.backends import Placement
    from spmdinfer.backends.onnxruntime import open_session
    from spmdinfer.onnxfile import read_signature
    from tests.cells import MLPShard

    free = options.pop("free_batch")
    path = tmp_path / "mlp.onnx"
    onnx.export(MLPShard(np.ones((16, 32), np.float32), np.ones(32, np.float32),
                    np.ones((32, 8), np.float32), np.ones(8, np.float32)),
                mindspore.Tensor(np.zeros((4, 16), np.float32)), file_name=str(path),
                input_names=["x"], dynamic_axes={"x": {0: "batch"}} if free else None, **options)
    session = open_session(path, Placement("cpu", None, 0, 1), {})
    inputs, outputs = read_signature(path)
    assert inputs == session.inputs() and outputs == session.outputs()
    assert [str(t) for t in inputs] == [f"x float32 ({'?' if free else 4}, 16)"]
