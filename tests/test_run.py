"""Real `mpiexec -n N spmdinfer run` on MindIR slices exported here, against numpy."""

import importlib.util
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from tests.cells import mlp_reference
from tests.conftest import (MPI_TIMEOUT, PYTHON, REPO, matmul_job, mpi_command, mpi_env, read_h5,
                            run_cli, write_h5, write_job)


def ok(result):
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


@pytest.mark.launcher
def test_seed_demo_gives_minus_48(tmp_path):
    demo = tmp_path / "matmul"
    shutil.copytree(REPO / "jobs" / "matmul", demo, ignore=shutil.ignore_patterns("out"))
    result = ok(run_cli("run", demo / "job.toml", n=8))
    y = read_h5(demo / "out" / "result.h5", "/y")
    assert y.shape == (1000, 16) and y.dtype == np.float32
    assert np.all(y == -48)
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("spmdinfer: 1000 rows, 8 batches,") and "(load " in summary and "rows/s" in summary
    assert summary.endswith(str(demo / "out" / "result.h5"))


def test_seed_pipeline_gives_minus_96_and_minus_48(tmp_path):
    """jobs/pipeline as the README runs it: graph 0 on the preprocessed x, graph 1 on y."""
    demo = tmp_path / "pipeline"
    shutil.copytree(REPO / "jobs" / "pipeline", demo, ignore=shutil.ignore_patterns("out"))
    ok(run_cli("run", demo / "job.toml", n=8))
    with h5py.File(demo / "out" / "result.h5", "r") as f:
        assert sorted(f) == ["x", "z"]
        x, z = f["x"][...], f["z"][...]
    assert x.shape == z.shape == (256, 16) and x.dtype == z.dtype == np.float32
    assert np.all(x == -96) and np.all(z == -48)


def test_gpt_job_generates_what_the_whole_model_generates(tmp_path):
    """jobs/gpt as the README runs it, its slices exported anew by its export.py (a MindSpore
    cluster of 2): an init graph, then the step graph repeated with its KV cache and collected
    until the end token; the tokens those of the unsplit model (gpt.generate, numpy)."""
    demo = tmp_path / "gpt"
    shutil.copytree(REPO / "jobs" / "gpt", demo,
                    ignore=shutil.ignore_patterns("out", "model", "prompts.h5", "__pycache__"))
    export = subprocess.run([*mpi_command(2), PYTHON, demo / "export.py"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=MPI_TIMEOUT, env=mpi_env(),
                            stdin=subprocess.DEVNULL)
    ok(export)
    ok(run_cli("run", demo / "job.toml", n=2))
    spec = importlib.util.spec_from_file_location("gpt", demo / "gpt.py")
    gpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpt)
    tokens, length = gpt.generate(read_h5(demo / "prompts.h5", "/prompts"))
    assert (length < gpt.NEW).any() and (length == gpt.NEW).any()  # some rows stop early
    got = read_h5(demo / "out" / "tokens.h5", "/tokens")
    assert got.shape == (256, gpt.NEW) and got.dtype == np.int32
    np.testing.assert_array_equal(got, tokens)
    np.testing.assert_array_equal(read_h5(demo / "out" / "tokens.h5", "/length"), length)


def test_eight_ranks_concat_gzip_input_ragged_batches(tmp_path, matmul_slices):
    template, weight = matmul_slices
    x = np.random.default_rng(2).standard_normal((1001, 96)).astype(np.float32)
    write_h5(tmp_path / "in.h5", {"x": x}, chunks=(50, 96), compression="gzip")
    job = write_job(tmp_path, matmul_job(tmp_path, template, batch_size=96))
    ok(run_cli("run", job, n=8))
    out = tmp_path / "out" / "result.h5"
    np.testing.assert_allclose(read_h5(out, "/y"), -(x @ weight), rtol=1e-5, atol=1e-5)
    with h5py.File(out, "r") as f:
        assert f["y"].chunks[0] == 96
        attrs = f.attrs
        assert attrs["world_size"] == 8 and attrs["rows"] == 1001 and attrs["batches"] == 11
        assert attrs["backend"] == "mindspore" and attrs["backend_version"]
        assert attrs["job_text"] == job.read_text()
        assert len(attrs["slice_sha256"]) == 8 and len(set(attrs["slice_sha256"])) == 8
        assert attrs["start_time"] <= attrs["end_time"]
    assert not (tmp_path / "out" / "result.h5.partial").exists()


def test_four_way_row_parallel_mlp_sum(tmp_path, mlp_slices):
    template, weights = mlp_slices
    x = np.random.default_rng(3).standard_normal((301, 16)).astype(np.float32)
    write_h5(tmp_path / "in.h5", {"data/x": x}, chunks=(64, 16))
    job = write_job(tmp_path, {
        "model": {"files": str(template), "ranks": 4},
        "input": {"file": "in.h5", "batch_size": 64, "datasets": {"x": "data/x"}},
        "output": {"file": "scores.h5", "datasets": {"y": "/deep/group/y"}, "combine": {"y": "sum"}},
    })
    ok(run_cli("run", job, n=4))
    y = read_h5(tmp_path / "scores.h5", "/deep/group/y")
    np.testing.assert_allclose(y, mlp_reference(x, *weights), rtol=1e-5, atol=1e-5)


def test_several_inputs_and_outputs_int_and_float(tmp_path, multi_io_slices):
    template, weight = multi_io_slices
    rng = np.random.default_rng(5)
    x = rng.standard_normal((77, 4)).astype(np.float32)
    k = rng.integers(-1000, 1000, (77, 3)).astype(np.int32)
    write_h5(tmp_path / "in.h5", {"x": x, "ids/k": k}, compression="gzip", chunks=True)
    job = write_job(tmp_path, {
        "model": {"files": str(template), "ranks": 2},
        # Listed in the other order than the slice declares them: bound by name.
        "input": {"file": "in.h5", "batch_size": 10, "datasets": {"k": "/ids/k", "x": "/x"}},
        "output": {"file": "out.h5", "datasets": {"scores": "/scores", "shifted": "/shifted",
                                                  "part": "/part"},
                   "combine": {"scores": "concat:1", "part": "sum"}},
    })
    ok(run_cli("run", job, n=2))
    out = tmp_path / "out.h5"
    scores, shifted, part = (read_h5(out, p) for p in ("/scores", "/shifted", "/part"))
    np.testing.assert_allclose(scores, x @ weight, rtol=1e-5, atol=1e-5)
    assert shifted.dtype == np.int32 and np.array_equal(shifted, k + 1)
    assert part.dtype == np.int32 and np.array_equal(part, k * 3)


@pytest.mark.launcher
def test_single_rank_runs_without_mpiexec(tmp_path, matmul_slices):
    template, weight = matmul_slices
    x = np.random.default_rng(6).standard_normal((20, 96)).astype(np.float32)
    write_h5(tmp_path / "in.h5", {"x": x})
    job = write_job(tmp_path, matmul_job(tmp_path, str(template).replace("{rank}", "3"), ranks=1,
                                         batch_size=7))
    ok(run_cli("run", job))
    np.testing.assert_allclose(read_h5(tmp_path / "out" / "result.h5", "/y"),
                               -(x @ weight[:, 6:8]), rtol=1e-5, atol=1e-5)


def test_empty_input_gives_empty_outputs(tmp_path, onnx_matmul_slices):
    template, _ = onnx_matmul_slices
    write_h5(tmp_path / "in.h5", {"x": np.zeros((0, 96), np.float32)})
    job = write_job(tmp_path, matmul_job(tmp_path, template, ranks=2))
    ok(run_cli("run", job, n=2))
    y = read_h5(tmp_path / "out" / "result.h5", "/y")
    assert y.shape == (0, 4) and y.dtype == np.float32


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path, onnx_matmul_slices):
    template, weight = onnx_matmul_slices
    x = np.ones((5, 96), np.float32)
    write_h5(tmp_path / "in.h5", {"x": x})
    job = write_job(tmp_path, matmul_job(tmp_path, template, ranks=2))
    out = tmp_path / "out" / "result.h5"
    out.parent.mkdir()
    out.write_bytes(b"precious")
    result = run_cli("run", job, n=2)
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr
    assert out.read_bytes() == b"precious"
    ok(run_cli("run", job, "--overwrite", n=2))
    np.testing.assert_allclose(read_h5(out, "/y"), -(x @ weight[:, :4]), rtol=1e-5, atol=1e-5)


def test_metrics_trace_and_plain_progress(tmp_path, matmul_slices):
    import json

    template, _ = matmul_slices
    write_h5(tmp_path / "in.h5", {"x": np.ones((50, 96), np.float32)})
    job = write_job(tmp_path, matmul_job(tmp_path, template, ranks=2, batch_size=5))
    result = ok(run_cli("run", job, "--metrics", tmp_path / "m.json", "--trace", tmp_path / "t.json",
                        n=4, env={"SPMDINFER_PROGRESS_INTERVAL": "0", "SPMDINFER_LOG_LEVEL": "INFO"}))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["rows"] == 50 and metrics["batches"] == 10 and metrics["outcome"] == "complete"
    assert metrics["rows_per_second"] > 0 and metrics["load_seconds"] > 0
    assert [r["rank"] for r in metrics["ranks"]] == [0, 1, 2, 3]
    for r in metrics["ranks"]:
        assert set(r["seconds"]) == {"load", "read", "bcast", "predict", "combine", "write", "wait"}
        assert r["seconds"]["predict"] > 0 and r["peak_rss_bytes"] > 10_000_000
        assert 0 < r["loop_cpu_seconds"] < 2 * metrics["wall_seconds"]  # at most 2 cores here
        phases = r["startup_seconds"]
        assert list(phases) == ["launch", "discover", "preflight", "check_devices", "form_cluster",
                                "load", "schedule", "start_collector", "assemble"]
        assert phases["launch"] > 0 and phases["load"] > 0 and min(phases.values()) >= 0
        # Rank 0's phases add up to at most its start-up (`load_seconds`); another rank's
        # start-up may end later than rank 0's (replica 1 starts on its own), never after the run.
        limit = metrics["load_seconds"] if r["rank"] == 0 else metrics["wall_seconds"]
        assert sum(phases.values()) - phases["launch"] <= limit + 0.01
    assert metrics["ranks"][0]["seconds"]["write"] > 0 and metrics["ranks"][1]["seconds"]["write"] == 0
    assert metrics["ranks"][2]["seconds"]["read"] > 0  # replica 1's leader reads its own batches
    trace = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    tracks = {e["pid"] for e in trace if e["ph"] == "X"}
    assert tracks == {0, 1, 2, 3}
    assert {e["name"] for e in trace if e["ph"] == "X" and e["pid"] == 0} >= {"load", "predict", "write"}
    # Not a terminal: plain progress lines instead of a bar, and the log prefixed by rank.
    assert "spmdinfer: 50/50 rows (100.0%)" in result.stderr
    assert "[rank 3] INFO" in result.stderr and "\r" not in result.stderr


def test_output_compression_is_optional(tmp_path, onnx_matmul_slices):
    template, weight = onnx_matmul_slices
    x = np.random.default_rng(9).standard_normal((30, 96)).astype(np.float32)
    write_h5(tmp_path / "in.h5", {"x": x})
    doc = matmul_job(tmp_path, template, ranks=2, batch_size=8)
    doc["output"]["compression"] = "gzip:4"
    ok(run_cli("run", write_job(tmp_path, doc), n=2))
    with h5py.File(tmp_path / "out" / "result.h5") as f:
        assert f["y"].compression == "gzip" and f["y"].compression_opts == 4
        assert f["y"].chunks == (8, 4)
        np.testing.assert_allclose(f["y"][()], -(x @ weight[:, :4]), rtol=1e-5, atol=1e-5)


@pytest.mark.launcher
def test_shared_memory_and_messages_give_the_same_outputs(tmp_path, multi_io_slices):
    """A group on one node passes batches through shared memory; with `[run] shared_memory =
    false` through messages (as a group spread over nodes does). Same bytes either way,
    ragged last batch included, every combine mode."""
    template, weight = multi_io_slices
    rng = np.random.default_rng(15)
    x = rng.standard_normal((53, 4)).astype(np.float32)
    k = rng.integers(-1000, 1000, (53, 3)).astype(np.int32)
    write_h5(tmp_path / "in.h5", {"x": x, "k": k})
    outputs = {}
    for shared in (True, False):
        job = write_job(tmp_path, {
            "model": {"files": str(template), "ranks": 2},
            "input": {"file": "in.h5", "batch_size": 8, "datasets": {"k": "/k", "x": "/x"}},
            "output": {"file": f"out-{shared}.h5",
                       "datasets": {"scores": "/scores", "shifted": "/shifted", "part": "/part"},
                       "combine": {"scores": "concat:1", "part": "sum"}},
            "run": {"shared_memory": shared},
        }, name=f"job-{shared}.toml")
        ok(run_cli("run", job, "--metrics", tmp_path / f"m-{shared}.json", n=2))
        outputs[shared] = [read_h5(tmp_path / f"out-{shared}.h5", p)
                           for p in ("/scores", "/shifted", "/part")]
    for a, b in zip(outputs[True], outputs[False]):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    np.testing.assert_allclose(outputs[True][0], x @ weight, rtol=1e-5, atol=1e-5)
    assert np.array_equal(outputs[True][1], k + 1)


@pytest.mark.launcher
def test_many_small_batches_on_eight_ranks_in_shared_memory(tmp_path, onnx_matmul_slices):
    """Many batches through the shared slots, ranks racing each other on 2 cores: every row
    once, in place (a slot reused too early, or a batch missed, changes the output)."""
    template, weight = onnx_matmul_slices
    x = np.random.default_rng(17).standard_normal((1203, 96)).astype(np.float32)
    write_h5(tmp_path / "in.h5", {"x": x}, chunks=(64, 96))
    job = write_job(tmp_path, matmul_job(tmp_path, template, batch_size=5))
    for _ in range(2):
        ok(run_cli("run", job, "--overwrite", n=8))
        np.testing.assert_allclose(read_h5(tmp_path / "out" / "result.h5", "/y"), -(x @ weight),
                                   rtol=1e-5, atol=1e-5)


def test_a_big_endian_input_gives_the_native_orders_output(tmp_path, onnx_matmul_slices):
    """`>f4` (as some tools write) holds the same numbers as float32: validate says it converts,
    and the run's output is the native-order file's, byte for byte (contiguous, chunked, gzip)."""
    template, weight = onnx_matmul_slices
    x = np.random.default_rng(21).standard_normal((29, 96)).astype(np.float32)
    outputs = []
    for name, dtype, options in (("native", "<f4", {}), ("big", ">f4", {}),
                                 ("big-chunked", ">f4", {"chunks": (4, 96)}),
                                 ("big-gzip", ">f4", {"chunks": (5, 96), "compression": "gzip"})):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f.create_dataset("x", data=x.astype(dtype), dtype=dtype, **options)
        doc = matmul_job(tmp_path, template, ranks=2, batch_size=8)
        doc["input"]["file"] = f"{name}.h5"
        doc["output"]["file"] = f"out/{name}.h5"
        job = write_job(tmp_path, doc, name=f"{name}.toml")
        checked = run_cli("validate", job)
        assert checked.returncode == 0, checked.stderr
        assert ("stored big-endian (>f4): converted while reading" in checked.stdout) == \
            (dtype == ">f4")
        ok(run_cli("run", job, n=2))
        outputs.append(read_h5(tmp_path / "out" / f"{name}.h5", "/y"))
    assert all(o.dtype == np.float32 and o.tobytes() == outputs[0].tobytes() for o in outputs)
    np.testing.assert_allclose(outputs[0], -(x @ weight[:, :4]), rtol=1e-5, atol=1e-5)
