"""Replicas, pipeline stages and multi-graph programs under real mpiexec, against numpy;
every row exactly once and in input order, on row counts not divisible by the batch."""

import json

import h5py
import numpy as np
import pytest

from tests import cells
from tests.conftest import (assert_clean_error, dynamic, export_mindir, read_h5, run_cli, write_h5,
                            write_job)


def ok(result):
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


def job(folder, files, ranks, batch_size, combine="rank0", **model):
    return {
        "model": {"files": files, "ranks": ranks, **model},
        "input": {"file": "in.h5", "batch_size": batch_size, "datasets": {"x": "/x"}},
        "output": {"file": "out.h5", "datasets": {"y": "/y"}, "combine": {"y": combine}},
    }


def rows_input(folder, rows, columns, seed=0):
    # Row i starts with i, so a row out of place or written twice cannot go unnoticed.
    x = np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32)
    x[:, 0] = np.arange(rows)
    write_h5(folder / "in.h5", {"x": x}, chunks=(min(13, rows), columns))
    return x


@pytest.fixture(scope="session")
def dense_slices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    rng = np.random.default_rng(10)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    export_mindir(cells.Dense(w1, relu=True), [dynamic(8)], folder / "pipe1_0.mindir")
    export_mindir(cells.Dense(w2), [dynamic(16)], folder / "pipe1_1.mindir")
    for r in range(2):  # 2 stages x 2 ranks: column halves of each layer
        export_mindir(cells.Dense(w1[:, 8 * r:8 * r + 8], relu=True), [dynamic(8)],
                      folder / f"pipe2_{r}.mindir")
        export_mindir(cells.Dense(w2[:, 2 * r:2 * r + 2]), [dynamic(16)],
                      folder / f"pipe2_{2 + r}.mindir")
    export_mindir(cells.Dense(w1, relu=True), [dynamic(8)], folder / "single_0.mindir")
    return folder, w1, w2


def test_two_replicas_of_one_rank(tmp_path, dense_slices):
    folder, w1, _ = dense_slices
    x = rows_input(tmp_path, 1001, 8)
    path = write_job(tmp_path, job(tmp_path, str(folder / "single_{rank}.mindir"), 1, 64))
    ok(run_cli("run", path, n=2))
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), np.maximum(x @ w1, 0),
                               rtol=1e-5, atol=1e-5)
    with h5py.File(tmp_path / "out.h5") as f:
        assert f.attrs["replicas"] == 2 and f.attrs["world_size"] == 2 and f.attrs["batches"] == 16


def test_two_replicas_of_four_ranks_with_sum(tmp_path, mlp_slices):
    template, weights = mlp_slices
    x = rows_input(tmp_path, 203, 16)
    path = write_job(tmp_path, job(tmp_path, str(template), 4, 16, "sum"))
    ok(run_cli("run", path, n=8))
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), cells.mlp_reference(x, *weights),
                               rtol=1e-5, atol=1e-5)


def test_two_stages_of_one_rank(tmp_path, dense_slices):
    folder, w1, w2 = dense_slices
    x = rows_input(tmp_path, 150, 8)
    path = write_job(tmp_path, job(tmp_path, str(folder / "pipe1_{rank}.mindir"), 2, 16, stages=2))
    ok(run_cli("run", path, n=2))
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), np.maximum(x @ w1, 0) @ w2,
                               rtol=1e-4, atol=1e-4)


def test_two_stages_of_two_ranks_concat_inside_a_stage(tmp_path, dense_slices):
    folder, w1, w2 = dense_slices
    x = rows_input(tmp_path, 99, 8)
    path = write_job(tmp_path, job(tmp_path, str(folder / "pipe2_{rank}.mindir"), 4, 10,
                                   "concat:-1", stages=2, stage_combine="concat:-1"))
    ok(run_cli("run", path, n=4))
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), np.maximum(x @ w1, 0) @ w2,
                               rtol=1e-4, atol=1e-4)


def test_two_replicas_of_two_stages(tmp_path, dense_slices):
    folder, w1, w2 = dense_slices
    x = rows_input(tmp_path, 77, 8)
    path = write_job(tmp_path, job(tmp_path, str(folder / "pipe1_{rank}.mindir"), 2, 8, stages=2))
    ok(run_cli("run", path, n=4))
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), np.maximum(x @ w1, 0) @ w2,
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="session")
def program_slices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("program")
    a = np.random.default_rng(11).standard_normal((6, 4)).astype(np.float32)
    export_mindir(cells.InitGraph(a), [dynamic(6)], folder / "init_0.mindir")
    export_mindir(cells.StepGraph(), [dynamic(4), dynamic(6)], folder / "step_0.mindir")
    return folder, a


def test_two_graph_program_with_repeat_and_feed(tmp_path, program_slices):
    folder, a = program_slices
    x = rows_input(tmp_path, 45, 6)
    doc = job(tmp_path, [str(folder / "init_{rank}.mindir"), str(folder / "step_{rank}.mindir")], 1, 8)
    doc["steps"] = [{"graph": 0}, {"graph": 1, "repeat": 10, "feed": {"h": "output0"}}]
    ok(run_cli("run", write_job(tmp_path, doc), n=2))  # 2 replicas of the program
    h = x @ a
    for _ in range(10):
        h = 0.5 * h + x[:, :4]
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), h, rtol=1e-4, atol=1e-4)


def test_feed_that_names_no_input_is_refused(tmp_path, program_slices):
    folder, _ = program_slices
    rows_input(tmp_path, 5, 6)
    doc = job(tmp_path, [str(folder / "init_{rank}.mindir"), str(folder / "step_{rank}.mindir")], 1, 8)
    doc["steps"] = [{"graph": 0}, {"graph": 1, "feed": {"hidden": "output0"}}]
    assert_clean_error(run_cli("run", write_job(tmp_path, doc), n=1), "feed names input 'hidden'",
                       "has inputs h, x")
    assert not (tmp_path / "out.h5").exists()


@pytest.fixture(scope="session")
def graph_handoff_slices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("handoff")
    w = np.random.default_rng(12).standard_normal((8, 3)).astype(np.float32)
    value = np.arange(24, dtype=np.float32).reshape(8, 3)
    export_mindir(cells.Dense(w), [dynamic(8)], folder / "g_0.mindir")
    export_mindir(cells.Constant(value), [], folder / "g_1.mindir")
    return folder, value


def test_graph_handoff_takes_the_last_stage_outputs(tmp_path, graph_handoff_slices):
    folder, value = graph_handoff_slices
    rows_input(tmp_path, 20, 8)  # batches of 8: the last stage's fixed batch, trimmed to 4 at the end
    path = write_job(tmp_path, job(tmp_path, str(folder / "g_{rank}.mindir"), 2, 8, stages=2,
                                   handoff="graph"))
    ok(run_cli("run", path, n=2))
    expected = np.concatenate([value, value, value[:4]])
    np.testing.assert_array_equal(read_h5(tmp_path / "out.h5", "/y"), expected)


def test_world_size_not_a_multiple_of_ranks(tmp_path, mlp_slices):
    template, _ = mlp_slices
    rows_input(tmp_path, 10, 16)
    path = write_job(tmp_path, job(tmp_path, str(template), 4, 16, "sum"))
    assert_clean_error(run_cli("run", path, n=6), "world size 6 is not a multiple of [model] ranks = 4")


def test_plan_shows_where_each_slice_runs(tmp_path, dense_slices):
    folder, _, _ = dense_slices
    doc = job(tmp_path, str(folder / "pipe2_{rank}.mindir"), 4, 10, stages=2)
    doc["device"] = {"target": "gpu"}
    path = write_job(tmp_path, doc)
    result = run_cli("plan", path, "-n", 8, "--per-node", 4, "--json")
    assert result.returncode == 0, result.stderr
    ranks = json.loads(result.stdout)["ranks"]
    assert [(r["replica"], r["stage"], r["model_rank"], r["node"], r["device_id"]) for r in ranks] == [
        (0, 0, 0, 0, 0), (0, 0, 1, 0, 1), (0, 1, 2, 0, 2), (0, 1, 3, 0, 3),
        (1, 0, 0, 1, 0), (1, 0, 1, 1, 1), (1, 1, 2, 1, 2), (1, 1, 3, 1, 3)]
    assert all(r["exists"] for r in ranks) and ranks[6]["files"] == [str(folder / "pipe2_2.mindir")]
    doc["device"] = {"target": "gpu", "device_id": 0}
    result = run_cli("plan", write_job(tmp_path, doc), "-n", 4)
    assert result.returncode == 2 and "ranks 0 and 1 would share a device" in result.stderr
    doc["model"]["files"] = str(folder / "missing_{rank}.mindir")
    result = run_cli("plan", write_job(tmp_path, doc), "-n", 4)
    assert result.returncode == 2 and "missing for rank(s) [0, 1, 2, 3]" in result.stderr
    assert "NO" in result.stdout
