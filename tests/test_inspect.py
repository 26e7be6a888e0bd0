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
    ("broken.onnx", b"not a protobuf", "ONNX Runtime cannot load"),
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
